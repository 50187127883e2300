"""Checkpoints: the Checkpointer (what a training state holds, when to save), the snapshot it takes (staging) and
the thread that writes it (background), the on-disk formats (store: .pt, dcp: sharded), export."""
