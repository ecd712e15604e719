"""Optuna search over the CV objective."""
