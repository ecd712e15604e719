"""Errors, files, logging, config keys, devices, metrics and the one Registry class: what every stage uses."""
