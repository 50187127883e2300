"""launcher: DDP or FSDP2 training with an EMA of the weights and validation that never blocks training.

The shipped jobs are the package `launcher.jobs` and the configs `launcher.conf`: the repository's
top-level jobs/ and conf/ folders, mapped there by pyproject.toml's package-dir (a wheel copies them;
`pip install -e .` maps them in place). Run a checkout through that install, not from a bare path.
"""

__version__ = "0.1.0"
