"""launcher: DDP or FSDP2 training with an EMA of the weights and validation that never blocks training."""
import os as _os

__version__ = "0.1.0"

# The shipped jobs are the package `launcher.jobs`: a wheel installs the repository's top-level jobs/
# folder there. In a source checkout (no launcher/jobs beside this file) the checkout's own jobs/ is
# found through the repository root on this package's path, so a checkout always runs its own jobs.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "jobs")) and _os.path.isfile(_os.path.join(_root, "jobs", "__init__.py")):
    __path__.append(_root)
