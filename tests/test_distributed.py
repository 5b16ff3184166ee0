"""Multi-process runs under `accelerate launch`: two CPU processes (gloo) against one process with the same global
batch. Over more than two epochs (a per-rank epoch boundary used to hang the loop) the loss curves agree; a
two-process run stopped in the middle (SIGTERM to one rank: both save, both stop) and resumed with
train.resume=latest ends with the one-process run's losses and weights (float tolerance)."""

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


def _train_here(tmp_path: Path, name: str, *extra: str) -> Path:
    """The one-process reference, trained in this process (no interpreter start-up and imports to pay again)."""
    from sidetune.config import load_config
    from sidetune.train import train

    out = tmp_path / name
    train(load_config(None, _command(tmp_path, out, 1, 8, *extra)[5:]))  # after "-m sidetune train CONFIG"
    return out


@pytest.mark.parametrize("method", ["lora", "lst"])
def test_two_processes_match_one_process_and_resume(tmp_path, method):
    """A two-process run, stopped in the middle and resumed, against a one-process run of the same global batch.
    SIGTERM goes to rank 1 alone once the step-4 checkpoint is complete (saves are slowed so that the signal lands
    before the end): both ranks stop at the same step, each writes its RNG state, rank 0 the rest. The resumed run
    logs each step once, and its curve and weights agree with the uninterrupted one-process run within float
    tolerance (the reductions differ; a lost optimizer state, a shifted schedule or a repeated batch moves the loss
    far more than 1e-4). Bit-exact resume is tests/test_reliability.py's, on one process."""
    extra = [f"method.name={method}"]
    one = _train_here(tmp_path, f"one-{method}", *extra)
    single = _curve(one)
    assert len(single) == STEPS  # 40 rows / global batch 8 = 5 steps an epoch: 12 steps cross two boundaries
    assert single[-1] < single[0]

    out = tmp_path / f"stopped-{method}"
    cmd = _command(tmp_path, out, 2, 4, *extra, "train.save_every=2")
    first = subprocess.Popen(cmd, env=_env(SIDETUNE_TEST_SAVE_DELAY="0.1"), stdout=subprocess.PIPE,
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
    said = stdout + stderr
    assert "global batch 8 = batch_size 4 x grad_accum 1 x 2 process(es)" in said
    assert "stopped by SIGTERM" in said, stderr[-3000:]
    assert not (out / "final").exists()
    stopped_at = max(r["step"] for r in read_metrics(out) if "loss" in r)
    assert 4 <= stopped_at < STEPS
    ckpt = out / "checkpoints" / f"step-{stopped_at:07d}"
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "state.json").read_text())["num_processes"] == 2
    # The run records its global batch (train.py's run manifest).
    run = json.loads((out / "sidetune-run.json").read_text())
    assert (run["num_processes"], run["global_batch"]) == (2, 8)
    assert json.loads((one / "sidetune-run.json").read_text())["global_batch"] == 8

    again = subprocess.run([*cmd, "train.resume=latest"], env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt} at step {stopped_at}" in again.stdout + again.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    resumed = _curve(out)
    for x, y in zip(single, resumed):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (single, resumed)
    got, ref = load_file(out / "final" / "trainable.safetensors"), load_file(one / "final" / "trainable.safetensors")
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=1e-4, msg=key)



# ---------------------------------------------------------------------------------------------------------------------
# FSDP2 on the CPU. accelerate runs FSDP only on accelerators (on a CPU machine it would quietly run DDP, so sidetune
# refuses that launch), but torch's own fully_shard runs over gloo: two processes shard a sidetune model the way
# accelerate's FSDP2 does (each decoder layer, then the root) and check what sidetune's loop relies on.

_FSDP_WORKER = '''
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from sidetune.config import load_config
from sidetune.methods import trainable_parameters
from sidetune.session import build, make_optimizer
from sidetune.rundir import load_optimizer_state, load_trainable, optimizer_state, trainable_state

method, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = load_config(None, ["model.name=tiny-llama", "data.task=classification", f"data.train={data}",
                         f"method.name={method}", "train.lr=1e-2"])

def sharded():
    torch.manual_seed(0)
    s = build(cfg, "cpu")
    for m in list(s.model.modules()):
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(s.model)
    return s, make_optimizer(s.model, s.method, cfg.train, torch.device("cpu"))

s, opt = sharded()
collate = s.task.collator(s.tokenizer)
batches = [collate([s.data.train[i] for i in range(8 * k + 4 * rank, 8 * k + 4 * rank + 4)]) for k in range(3)]
trainable = trainable_parameters(s.model)
frozen = {n: p for n, p in s.model.named_parameters() if not p.requires_grad}
report = {"frozen_sharded": all(isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                                for p in frozen.values() if p.shape[0] >= 2),
          "frozen": len(frozen), "trainable": len(trainable)}

def step(s, opt, batch):
    loss = s.module(**batch).loss
    loss.backward()
    grads = ([n for n, p in s.model.named_parameters() if p.grad is not None],
             all(p.grad is not None for p in trainable_parameters(s.model).values()))
    opt.step()
    opt.zero_grad()
    return loss.item(), grads

losses = []
for b in batches[:2]:
    loss, (with_grad, all_trainable) = step(s, opt, b)
    losses.append(loss)
report["grads_only_trainable"] = set(with_grad) == set(trainable) and all_trainable
weights, optim = trainable_state(s.model), optimizer_state(s.model, opt)
report["optimizer_state_params"] = len(optim["state"])
if rank == 0:
    save_file(weights, str(out / "trainable.safetensors"))
    torch.save(optim, out / "optimizer.pt")
dist.barrier()
report["loss3"] = step(s, opt, batches[2])[0]
after = trainable_state(s.model)

s2, opt2 = sharded()  # a fresh sharded model, resumed from the gathered state
load_trainable(s2.model, out / "trainable.safetensors")
load_optimizer_state(s2.model, opt2, torch.load(out / "optimizer.pt", weights_only=True))
loaded = trainable_state(s2.model)
report["loaded_equal"] = all(torch.equal(loaded[k], weights[k]) for k in weights)
report["resumed_loss3"] = step(s2, opt2, batches[2])[0]
resumed = trainable_state(s2.model)
report["resumed_equal"] = all(torch.equal(resumed[k], after[k]) for k in after)
report["losses"] = losses
if rank == 0:
    (out / "report.json").write_text(json.dumps(report))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("method", ["lora", "lst"])
def test_fsdp2_shards_the_frozen_backbone_and_resumes_the_trainable_state(tmp_path, method):
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(_FSDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(worker), method, str(_data(tmp_path)), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["frozen"] > 0 and r["frozen_sharded"]  # every frozen matrix is split over the two processes
    assert r["grads_only_trainable"]
    assert r["optimizer_state_params"] == r["trainable"]  # AdamW state exists for the trainable set only
    assert r["loaded_equal"] and r["resumed_equal"]  # gathered to one file, re-sharded, the same to the bit
    assert r["resumed_loss3"] == r["loss3"]
    assert r["losses"][1] < r["losses"][0] or r["loss3"] < r["losses"][0]


@pytest.mark.parametrize("env, needle", [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed launches are not supported"),
                                         ({"ACCELERATE_USE_FSDP": "true"}, "FSDP needs CUDA GPUs")])
def test_unsupported_launches_are_one_line(tmp_path, monkeypatch, env, needle):
    from sidetune.config import load_config
    from sidetune.errors import SidetuneError
    from sidetune.train import train

    if "ACCELERATE_USE_FSDP" in env and torch.cuda.is_available():
        pytest.skip("on a GPU machine FSDP is a real launch")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=classification", f"data.train={_data(tmp_path)}",
                             f"train.output_dir={out}"])
    with pytest.raises(SidetuneError, match=needle) as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not out.exists()  # refused before anything was written


def test_fsdp_packs_4bit_weights_into_the_compute_dtype(monkeypatch):
    """bitsandbytes' FSDP-QLoRA storage: the same packed bytes in a float dtype FSDP can shard, the same outputs."""
    from conftest import batch_for, tiny

    def run():
        model = tiny("tiny-llama", "classification", quantize="nf4")
        model.eval()
        weights = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]
        with torch.no_grad():
            return model(**batch_for(model, "classification")).logits, weights

    ref, packed = run()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out, floats = run()
    assert packed and {w.dtype for w in packed} == {torch.uint8}
    assert {w.dtype for w in floats} == {torch.float32}  # the compute dtype on the CPU
    assert sum(w.numel() * w.element_size() for w in floats) == sum(w.numel() for w in packed)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
