"""The layout of ``runs/<competition>/<experiment>/`` and the prediction files in it."""
