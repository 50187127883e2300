"""The README's custom-job example, extracted verbatim and trained."""
import json
import re

import pytest

from conftest import ROOT, launch


@pytest.mark.slow
def test_readme_custom_job_trains(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- custom-job -->\s*```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_job.py").write_text(code)
    launch(["train", "job=custom", "job.target=my_job:Spirals", "+job.params.width=32", "job.batch_size=128",
            "batch.size=auto", "train.epochs=3", "logger.wandb.mode=disabled", "logger.progress=plain",
            "validation.mode=inline", f"run.dir={tmp_path}/run"], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["micro_batch"] == 128 and summary["best_value"] > 0.6
