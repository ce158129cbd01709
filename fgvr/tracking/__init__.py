"""Run files (the source of truth) and their W&B mirror."""
