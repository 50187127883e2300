"""launcher: DDP training with an EMA on rank 0 and validation that never blocks training."""
__version__ = "0.1.0"
