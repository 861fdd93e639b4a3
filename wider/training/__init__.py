"""The training loop, checkpoints, preemption handling and reporting."""
