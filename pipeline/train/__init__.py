"""Training: one job (trainer), the CV driver over an executor, optimisers, precision, pseudo-labels."""
