"""The errors that cross layers, each with one meaning for the command line (cli.py), and how a line
reaches the person at the console, once, also under torchrun (`say`, `report_error`):

- `ConfigError`: bad input. One line, exit status 2, raised before anything is created.
- `SaveError`: a checkpoint could not be written. One line, exit status 1; the previous
  checkpoints are intact.
- `OutOfMemory`: no micro-batch fits, or runtime recovery gave up: a clear end instead of a hang.
- `NothingToDo`: a finished run relaunched without asking for more steps. One line, exit status 0,
  nothing in the run directory touched.

`EXIT_RESTART` (75, EX_TEMPFAIL): an OOM inside the last backward on 2+ ranks recorded a halved
micro-batch; a restart resumes with it (batch/recovery.py), and the rank leaves at once (Dist.close).
"""
import json
import os
import sys
import time

WAIT_FOR_RANK_0_S = 2.0  # under torchrun, how long a worker that fails quietly lets rank 0 fail first

EXIT_RESTART = 75


class ConfigError(ValueError):
    """Bad input: the CLI prints it as one line and exits with status 2."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous ones are untouched."""


class OutOfMemory(RuntimeError):
    """No micro-batch fits, or runtime recovery gave up."""


class NothingToDo(Exception):
    """The run is already finished: the CLI prints the line and exits 0, having changed nothing."""


def say(line: str) -> None:
    """A line for the person at the console, on stderr: global rank 0 (or a lone process) alone prints it, so
    torchrun's N workers say it once."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def report_error(message: str, status: int = 2) -> int:
    """Bad input (status 2) or a failed save (1): `launcher: error: <message>`, said once. Under torchrun every
    worker also writes it to its error file ($TORCHELASTIC_ERROR_FILE), which torchrun's failure summary
    shows as the root cause (else: "To enable traceback see ..."). A worker other than rank 0 then waits a
    moment before it exits, so that rank 0, failing on the same input, prints the line before torchrun
    stops the group."""
    line = f"launcher: error: {message}"
    say(line)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the line was said (or rank 0 says it); the summary falls back to its own text
        if os.environ.get("RANK", "0") != "0":
            time.sleep(WAIT_FOR_RANK_0_S)
    return status
