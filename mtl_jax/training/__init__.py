"""Training: the pure steps, optimizer and freezing, loss weighting, the loop, checkpoints, devices."""
