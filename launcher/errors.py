"""The errors that cross layers, each with one meaning for the command line (cli.py):

- `ConfigError`: bad input. One line, exit status 2, raised before anything is created.
- `SaveError`: a checkpoint could not be written. One line, exit status 1; the previous
  checkpoints are intact.
- `OutOfMemory`: no micro-batch fits, or runtime recovery gave up: a clear end instead of a hang.

`EXIT_RESTART` (75, EX_TEMPFAIL): an OOM inside the last backward on 2+ ranks recorded a halved
micro-batch; a restart resumes with it (batch/recovery.py), and the rank leaves at once (Dist.close).
"""

EXIT_RESTART = 75


class ConfigError(ValueError):
    """Bad input: the CLI prints it as one line and exits with status 2."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous ones are untouched."""


class OutOfMemory(RuntimeError):
    """No micro-batch fits, or runtime recovery gave up."""
