"""Training: the loop over megatron-core schedules, optimizer and schedule, checkpoints, metrics."""
