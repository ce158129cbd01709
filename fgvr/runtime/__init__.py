"""The bottom layer: what every other part uses (errors, atomic files, the run dir, the config
schema, devices and ranks, signals, checkpoints, the run's metric files)."""
