"""The engine: the run session (loaders, wrapped model, optimiser, the training step), the loop,
evaluation, the bench and the cost of a step."""
