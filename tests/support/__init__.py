"""Test-only helpers that stand in for hardware (never for torch.distributed, Hydra, wandb or Slurm)."""
