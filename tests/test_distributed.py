"""Multi-process runs under `accelerate launch`: two CPU processes (gloo) against one process with the same global
batch. Over more than two epochs (a per-rank epoch boundary used to hang the loop) the loss curves agree; a
two-process run stopped in the middle (SIGTERM to one rank: both save, both stop) and resumed with
train.resume=latest ends with the same weights and losses as the uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics
from safetensors.torch import load_file

ACCELERATE_2 = ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"
STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(tmp_path: Path) -> Path:
    lines = ["sentence\tlabel"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} movie number {i}\t{i % 2}"
                                   for i in range(40)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _command(tmp_path: Path, out: Path, processes: int, batch: int, *extra: str) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    args = ["train", str(config), "model.name=tiny-llama", "data.task=classification", f"data.train={_data(tmp_path)}",
            "data.eval=null", f"train.batch_size={batch}", f"train.max_steps={STEPS}", "train.log_every=1",
            "train.lr=1e-2", "train.warmup_steps=0", "train.progress=false", f"train.output_dir={out}",
            "method.name=lora", *extra]
    if processes == 1:
        return [sys.executable, "-m", "sidetune", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_2),
            "--main_process_port", str(_free_port()), "-m", "sidetune", *args]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


def _train(tmp_path: Path, name: str, processes: int, batch: int, *extra: str):
    out = tmp_path / name
    proc = subprocess.run(_command(tmp_path, out, processes, batch, *extra), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _curve(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def _worker(launcher: int, rank: int) -> int | None:
    """The pid of the training process with LOCAL_RANK=`rank` under the `accelerate launch` process `launcher`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"LOCAL_RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.parametrize("method", ["lora", "lst"])
def test_two_processes_match_one_process_and_resume_exactly(tmp_path, method):
    extra = [f"method.name={method}"]
    one, _ = _train(tmp_path, f"one-{method}", 1, 8, *extra)
    two, proc = _train(tmp_path, f"two-{method}", 2, 4, *extra)
    said = proc.stdout + proc.stderr
    assert "global batch 8 = batch_size 4 x grad_accum 1 x 2 process(es)" in said
    a, b = _curve(one), _curve(two)
    assert len(a) == len(b) == STEPS  # 40 rows / global batch 8 = 5 steps an epoch: 12 steps cross two boundaries
    assert a[-1] < a[0]
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)
    assert (two / "final" / "trainable.safetensors").is_file()
    # The run records its global batch (train.py's run manifest).
    run = json.loads((two / "sidetune-run.json").read_text())
    assert (run["num_processes"], run["global_batch"]) == (2, 8)
    assert json.loads((one / "sidetune-run.json").read_text())["global_batch"] == 8

    # Stopped in the middle: SIGTERM to rank 1 alone once the step-4 checkpoint is complete (saves are slowed so
    # that the signal lands before the end). Both ranks stop at the same step, each writes its RNG state, rank 0
    # the rest.
    out = tmp_path / f"stopped-{method}"
    cmd = _command(tmp_path, out, 2, 4, *extra, "train.save_every=2")
    first = subprocess.Popen(cmd, env=_env(SIDETUNE_TEST_SAVE_DELAY="0.3"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline, signalled = time.monotonic() + 300, False
    while first.poll() is None and time.monotonic() < deadline:
        if (out / "checkpoints" / "step-0000004" / "manifest.json").is_file():
            pid = _worker(first.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                signalled = True
                break
        time.sleep(0.05)
    stdout, stderr = first.communicate(timeout=300)
    assert signalled and first.returncode != 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout + stderr, stderr[-3000:]
    assert not (out / "final").exists()
    stopped_at = max(r["step"] for r in read_metrics(out) if "loss" in r)
    assert 4 <= stopped_at < STEPS
    ckpt = out / "checkpoints" / f"step-{stopped_at:07d}"
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "state.json").read_text())["num_processes"] == 2

    again = subprocess.run(cmd + ["train.resume=latest"], env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt} at step {stopped_at}" in again.stdout + again.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    assert _curve(out) == pytest.approx(b, rel=1e-6, abs=1e-7)
    ref, got = load_file(two / "final" / "trainable.safetensors"), load_file(out / "final" / "trainable.safetensors")
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-7, msg=key)
    # And the single process with the same global batch, within float tolerance.
    single = load_file(one / "final" / "trainable.safetensors")
    for key in ref:
        torch.testing.assert_close(got[key], single[key], rtol=1e-3, atol=1e-4, msg=key)
