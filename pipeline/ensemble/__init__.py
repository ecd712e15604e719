"""Blends of experiments, second stages over their predictions."""
