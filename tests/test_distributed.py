"""Multi-process runs under `accelerate launch`: two CPU processes (gloo) against one process with the same global
batch. Over more than two epochs (a per-rank epoch boundary used to hang the loop) the loss curves agree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, read_metrics

ACCELERATE_2 = ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(tmp_path):
    lines = ["sentence\tlabel"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} movie number {i}\t{i % 2}"
                                   for i in range(40)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tmp_path, name, processes, batch, *extra):
    out = tmp_path / name
    args = ["train", "-", "model.name=tiny-llama", "data.task=classification", f"data.train={_data(tmp_path)}",
            "data.eval=null", f"train.batch_size={batch}", "train.max_steps=12", "train.log_every=1",
            "train.lr=1e-2", "train.warmup_steps=0", "train.progress=false", f"train.output_dir={out}",
            "method.name=lora", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    args[1] = str(config)
    if processes == 1:
        cmd = [sys.executable, "-m", "sidetune", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_2),
               "--main_process_port", str(_free_port()), "-m", "sidetune", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.parametrize("method", ["lora", "lst"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, method):
    extra = [f"method.name={method}"]
    one, _ = _train(tmp_path, f"one-{method}", 1, 8, *extra)
    two, proc = _train(tmp_path, f"two-{method}", 2, 4, *extra)
    assert "global batch 8 = batch_size 4 x grad_accum 1 x 2 process(es)" in proc.stdout + proc.stderr
    curve = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    a, b = curve(one), curve(two)
    assert len(a) == len(b) == 12  # 40 rows / global batch 8 = 5 steps an epoch: 12 steps cross two boundaries
    assert a[-1] < a[0]
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)
    assert (two / "final" / "trainable.safetensors").is_file()
