"""The config schema, its loader and the rules that resolve ``auto`` from the config alone."""
