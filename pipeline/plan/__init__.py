"""``auto`` values and the time budget resolved once per run, kept in ``plan.json``."""
