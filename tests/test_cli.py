"""Bad input at the command line: one line naming the problem and the fix, non-zero exit, no traceback, no run dir."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_cli


@pytest.mark.parametrize("overrides,needle", [
    (["train.lrr=1e-3"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["data.train=/nonexistent/train.tsv"], "data.train='/nonexistent/train.tsv': no such data file"),
    (["model.name=/nonexistent/model"], "model.name='/nonexistent/model' does not exist"),
    (["method.targets=[nope]"], "matched no linear layer"),
    (["data.text_field=review"], "data.train has no column 'review'"),
])
def test_bad_input(tmp_path, overrides, needle):
    out = tmp_path / "run"
    result = run_cli("train", str(ROOT / "recipes" / "sst2_lora.yaml"), f"train.output_dir={out}", *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("sidetune: error: ") and needle in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_config_and_run_dir(tmp_path):
    result = run_cli("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", str(tmp_path))
    assert result.returncode == 2 and "is not a finished sidetune run" in result.stderr
