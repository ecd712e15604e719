"""Competition files -> ``Table`` (formats), augmentation, folds, demo data and train/test shift."""
