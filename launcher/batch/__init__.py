"""The batch: its geometry, the probe that picks the micro-batch, and runtime OOM recovery."""
