"""Training engine: the loop, optimisers and schedules, checkpoints."""
