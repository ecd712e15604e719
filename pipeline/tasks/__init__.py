"""The target kind of a competition: one owner per kind."""
