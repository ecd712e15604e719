"""Metrics, calibration, the report, adversarial validation and the experiment log."""
