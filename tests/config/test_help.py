"""What the help and the README say holds (issue 27, item 8): `--cfg job` explains every key, the usage
line names every command, and the README's claims about these commands match what they do."""
import re

import yaml

from conftest import ROOT, launch


def test_cfg_job_gives_every_key_its_meaning_as_a_comment():
    from launcher.config.meanings import meanings
    from launcher.config.schema import Config
    from launcher.jobs.synthetic import SyntheticJob

    out = launch(["train", "job=synthetic", "--cfg", "job"], timeout=120).stdout
    keys, path = {}, []
    for line in out.splitlines():  # every `key: value` leaf line, with its comment
        m = re.match(r"^( *)(\w+):(.*)$", line)
        if m:
            path = path[: len(m.group(1)) // 2] + [m.group(2)]
            value, _, comment = m.group(3).partition("  # ")
            if value.strip() or comment:  # a leaf (a list's key carries its comment too)
                keys[".".join(path)] = comment
    expected = {**meanings(Config), **meanings(SyntheticJob, "job.")}
    expected.pop("job")
    assert keys.keys() == expected.keys()
    assert all(keys[k] == expected[k] != "" for k in keys), {k: v for k, v in keys.items() if not v}
    assert keys["train.precision"].endswith("one of auto, fp32, bf16, fp16")
    config = yaml.safe_load(out)  # still the same YAML: comments only
    assert config["job"]["name"] == "synthetic" and config["optim"]["lr"] == 0.003


def test_the_usage_line_names_every_command():
    from launcher.config.completion import COMMANDS

    out = launch(["--help"], timeout=60).stdout
    assert out.splitlines()[0] == f"usage: python -m launcher {{{','.join(COMMANDS)}}} [args]"


def test_readme_claims_that_were_wrong():
    readme = (ROOT / "README.md").read_text()
    assert "not supported yet" not in readme  # sweeps are (README "Sweeps")
    usage = readme.split("## Usage")[1].split("##")[0]
    two = next(line for line in usage.splitlines() if "--nproc_per_node=2" in line)
    assert "DDP" not in two and "1 training rank + 1 validator rank" in two  # one trainer: no DDP
    custom = next(line for line in readme.splitlines() if line.startswith("python -m launcher train job=custom"))
    assert "job.batch_size" not in custom  # no effect with a fixed batch.size
    assert "torchrun itself then exits with status 1" in readme
    assert "3720 steps, 60 validations)" not in readme and "6200 steps" in readme.split("## Speed")[1]
