"""Generate docs/config.md, the config reference, from launcher/schema.py.

Every key, its type, its default and the comment written next to it in the
schema, plus the allowed choices of every Enum-typed key. The doc cannot drift: a
test runs `--check`, which fails when docs/config.md differs from what this prints.

    python scripts/config_reference.py          # rewrite docs/config.md
    python scripts/config_reference.py --check  # exit 1 if docs/config.md is stale
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from dataclasses import MISSING as DC_MISSING, fields, is_dataclass
from enum import Enum
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.jobs.base import CustomJob  # noqa: E402
from launcher.jobs.images import ImagesJob  # noqa: E402
from launcher.jobs.mnist1d import Mnist1dJob  # noqa: E402
from launcher.jobs.synthetic import SyntheticJob  # noqa: E402
from launcher.config import schema

OUT = ROOT / "docs" / "config.md"
# Meanings for keys whose schema line has no comment (the schema's own comment wins when it has one).
NOTES = {
    "run.root": "parent folder of run directories when run.dir is not set",
    "run.seed": "global seed: same initial weights on every rank, per-rank seed = seed + rank",
    "train.epochs": "passes over the training set (train.max_steps caps it when > 0)",
    "train.log_every": "optimizer steps between metrics.jsonl rows / progress lines / wandb points",
    "train.compile": "torch.compile the model",
    "train.channels_last": "channels_last memory format for 4-D inputs (convnets on GPU)",
    "data.workers": "DataLoader worker processes per rank",
    "autobatch.max": "largest micro-batch the probe tries",
    "autobatch.max_probes": "most probe steps before choosing",
    "optim.lr": "peak learning rate (after warmup)",
    "optim.beta2": "adamw beta2",
    "optim.nesterov": "sgd: Nesterov momentum",
    "optim.eps": "adamw epsilon",
    "sched.warmup_steps": "linear warmup length in optimizer steps, then cosine decay",
    "ema.enabled": "keep an EMA of the weights on rank 0",
    "ema.decay": "target decay d",
    "ema.tau": "ramp time constant (in EMA updates) for ramp=exp",
    "validation.every_epochs": "validate at the end of every k-th epoch (when every_steps is 0)",
    "validation.metric": "the job metric that decides best/ and early stopping",
    "validation.drain_timeout_s": "at the end, how long training waits for the validator to finish",
    "validation.device": "validator device: auto | cpu | cuda",
    "early_stop.min_delta": "smallest change that counts as an improvement",
    "checkpoint.keep_last": "checkpoints kept (plus the best)",
    "logger.wandb.project": "wandb project",
    "logger.wandb.entity": "wandb entity (team or user); null = your default",
    "logger.wandb.name": "wandb run name; null = the run directory's name",
    "logger.wandb.group": "wandb group, e.g. to gather the runs of a sweep",
    "logger.wandb.tags": "wandb tags, e.g. [baseline,ema]",
    "debug.simulate_oom_at_step": "raise one OOM at this step, to test runtime recovery",
    "debug.val_delay_s": "sleep this long in every validation, to test asynchrony",
    "job.name": "the job's name (set by the group)",
    "job.target": "`module:Class` of the job; any importable path",
    "job.batch_size": "the job's default micro-batch (batch.size=auto without a GPU)",
    "job.hidden": "mlp hidden width",
    "job.channels": "cnn channels",
    "job.data_seed": "seed of the generated data set",
    "job.image_size": "input resolution",
    "job.num_classes": "number of classes",
    "job.train_samples": "synthetic training samples",
    "job.val_samples": "synthetic validation samples",
    "job.params": "free-form parameters handed to your job: +job.params.<name>=<value>",
}
FIELD = re.compile(r"^\s+(\w+):[^=#]*(?:=.*?)?(?:#\s*(.*))?$")


def comments(cls) -> dict:
    """field name -> the `# comment` on its line in the schema source (class docstring for nested groups)."""
    out = {}
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = FIELD.match(line)
        if m and m.group(2):
            out[m.group(1)] = m.group(2).strip()
    return out


def show(value) -> str:
    if value == "???" or value is DC_MISSING:
        return "*required*"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def rows(cls, prefix: str = "") -> list:
    notes, hints = comments(cls), typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        key = prefix + f.name
        default = f.default_factory() if f.default_factory is not DC_MISSING else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out += rows(type(default), key + ".")
            continue
        note = notes.get(f.name) or NOTES.get(key, "")
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Enum):
            note = (note + "; " if note else "") + "one of " + ", ".join(f"`{c.value}`" for c in kind)
            kind = "str"
        type_, note = (t.replace("|", "\\|") for t in (str(f.type) if kind != "str" else "str", note))
        out.append(f"| `{key}` | {type_} | {show(default)} | {note} |")
    return out


def render() -> str:
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    jobs = [("mnist1d", Mnist1dJob), ("synthetic", SyntheticJob), ("custom", CustomJob), ("images", ImagesJob)]
    text = [
        "# Config reference",
        "",
        "<!-- generated by `python scripts/config_reference.py` from launcher/schema.py; do not edit by hand -->",
        "",
        "Every key the launcher accepts, with its default. Set any of them on the command line as a Hydra",
        "override (`python -m launcher train optim.lr=1e-3 batch.size=auto`). The schema is typed: an unknown key,",
        "a wrong type or a value outside the listed choices exits with status 2 and one line naming the key.",
        "Rules a type cannot express (ranges, combinations) are in `launcher/schema.py::check`.",
        "",
        "## Training, validation, logging",
        "",
        *head,
        *[r for r in rows(schema.Config) if not r.startswith("| `job` ")],
        "",
        "## Jobs (`job=<name>`, then `job.<key>=...`)",
        "",
        "The `job` group picks the task; each job has its own keys under `job.`.",
    ]
    for name, cls in jobs:
        text += ["", f"### `job={name}`", ""]
        doc = cls.__dict__.get("__doc__") or ""
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
            text += [inspect.cleandoc(doc), ""]
        text += [*head, *rows(cls, "job.")]
    return "\n".join(text) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is out of date")
    args = p.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
