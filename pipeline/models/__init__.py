"""Backbones (timm), offline weights, batched inference, TTA transforms and Grad-CAM."""
