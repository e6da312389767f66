"""Training: config defaults, optimizer, train state, the pure train step, checkpoints, the loop."""
