"""The run folder: its lock and config, checkpoints, and plots."""
