"""Checkpoints: the Checkpointer (what a training state holds, when to save), the on-disk formats, export."""
