"""The GPU-only paths, run here (issue 23): FSDP2's gradient norm in the trainer's own guard, the fp16 scaler's single
unscale, fp32 master weights under a 16-bit model, the bf16/fp16 choice on GPUs without native bf16, FSDP2's wrap
groups on every wrapper module, the CUDA autocast policy of predictions, the refusals, and the OOM agreement of a
multi-process run. Each runs on the CPU: 2 gloo processes, or the CUDA device mocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


def _data(tmp_path: Path, n: int = 32) -> Path:
    lines = ["sentence\tlabel"] + [f"{'good fine great' if i % 2 else 'bad awful poor'} movie number {i}\t{i % 2}"
                                   for i in range(n)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _torchrun(tmp_path: Path, script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(worker), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# 1. FSDP2: the trainer's guard (clip, finite check, reduce) and optimizer step on fully_shard-ed parameters

_FSDP_STEP = '''
import json, sys
import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from sidetune.config import load_config
from sidetune.session import build, make_optimizer, train_step
from sidetune.train import _FiniteGuard

data, out, max_norm = sys.argv[1], sys.argv[2], float(sys.argv[3])
acc = Accelerator(cpu=True)  # under torchrun: two processes over gloo, as the trainer runs without CUDA
rank = acc.process_index
cfg = load_config(None, ["model.name=tiny-llama", "data.task=classification", f"data.train={data}",
                         "method.name=lora", "train.lr=1e-2", f"train.max_grad_norm={max_norm}"])
torch.manual_seed(0)
s = build(cfg, "cpu")
for m in list(s.model.modules()):
    if type(m).__name__.endswith("DecoderLayer"):
        fully_shard(m)
fully_shard(s.model)
opt = make_optimizer(s.model, s.method, cfg.train, torch.device("cpu"))
guard = _FiniteGuard(s.trainable, cfg.train, acc)
collate = s.task.collator(s.tokenizer)
report = {"losses": [], "clipped_norms": []}
for step in range(1, 4):
    batch = collate([s.data.train[i] for i in range(8 * step + 4 * rank, 8 * step + 4 * rank + 4)])
    # The trainer's own step: backward through the guard, which clips and checks before the optimizer step.
    grads = {}
    def backward(loss, _inner=guard.backward(step)):
        _inner(loss)
        grads["norm"] = float(sum(p.grad.full_tensor().pow(2).sum() for p in s.trainable if p.grad is not None) ** 0.5)
    train_step(s.module, batch, opt, s.trainable, cfg.train.max_grad_norm, backward=backward, clip=None)
    window, n = guard.take_window()
    report["losses"].append(acc.reduce(window / n, reduction="mean").item())
    report["clipped_norms"].append(grads["norm"])
report["weights"] = float(sum(p.detach().full_tensor().double().sum() for p in s.trainable))
if rank == 0:
    with open(out, "w") as f:
        json.dump(report, f)
'''


def test_fsdp2_runs_the_trainers_guard_clip_and_reduce(tmp_path):
    """Before the fix the first step raised (the guard added FSDP2's DTensor norm to the loss window, and
    accelerator.reduce has no sharding rule for it). After: the clip uses the global norm (clipped gradients have
    exactly max_norm), and both processes step."""
    out = tmp_path / "report.json"
    proc = _torchrun(tmp_path, _FSDP_STEP, str(_data(tmp_path)), str(out), "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert len(r["losses"]) == 3 and all(map(lambda x: x == x, r["losses"]))
    # The whole (all-gathered) gradient norm after clipping is max_grad_norm: the norm clipped by was the global one.
    for norm in r["clipped_norms"]:
        assert norm == pytest.approx(0.01, rel=1e-4)


def test_fp16_scaler_unscales_once_when_clipping_the_trainable_set(monkeypatch):
    """accelerate's clip_grad_norm_ under FSDP, given the trainable parameters (not the whole model's), unscaled
    the fp16 gradients, found no matching model and unscaled again: GradScaler refuses the second. The guard now
    unscales once; the clipped gradients are the unscaled ones."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from sidetune.config import TrainConfig
    from sidetune.train import _FiniteGuard

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    frozen = torch.nn.Linear(4, 1)
    frozen.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    monkeypatch.setattr(type(acc), "distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr(type(acc), "mixed_precision", property(lambda self: "fp16"))
    monkeypatch.setattr(acc, "native_amp", True)
    monkeypatch.setattr(acc, "scaler", scaler)
    monkeypatch.setattr(acc, "_optimizers", [opt])
    monkeypatch.setattr(acc, "_models", [torch.nn.Sequential(model, frozen)])
    x = torch.randn(3, 4)
    loss = frozen(model(x)).sum()
    scaler.scale(loss).backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()]) / 1024.0
    t = TrainConfig(max_grad_norm=1e6)
    guard = _FiniteGuard(list(model.parameters()), t, acc)
    guard.window, guard.n = loss.detach(), 1
    guard._check(1)  # before the fix: RuntimeError: unscale_() has already been called on this optimizer
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, reference)


# ---------------------------------------------------------------------------------------------------------------------
# 8. bitsandbytes' 8-bit and paged optimizers under FSDP2: refused in one line, by the trainer and the planner


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_fsdp_refuses_bitsandbytes_optimizers(tmp_path, monkeypatch, optimizer):
    from sidetune.config import load_config
    from sidetune.errors import SidetuneError
    from sidetune.profiling.shard import Sharding
    from sidetune.train import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an FSDP launch on GPUs
    out = tmp_path / "run"
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=classification", f"data.train={_data(tmp_path)}",
                             f"train.output_dir={out}", f"train.optimizer={optimizer}"])
    with pytest.raises(SidetuneError, match="bitsandbytes issue #1633") as e:
        train(cfg)
    assert "\n" not in str(e.value) and "train.optimizer=adamw" in str(e.value)
    assert not out.exists()
    assert Sharding(2, "fsdp").refusal(None, optimizer) == str(e.value)
    assert Sharding(2, "ddp").refusal(None, optimizer) is None and Sharding(2, "fsdp").refusal(None) is None


# ---------------------------------------------------------------------------------------------------------------------
# 3. Trainable parameters are float32 masters on a 16-bit model; 4. auto picks fp16 where bf16 is only emulated


def _cfg(tmp_path: Path, *extra: str):
    from sidetune.config import load_config

    return load_config(None, ["model.name=tiny-llama", "data.task=classification", f"data.train={_data(tmp_path)}",
                              *extra])


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_trainable_parameters_are_float32_masters_and_keep_small_updates(tmp_path, method):
    """A bf16 weight rounds an update below |w| * 2^-9 back to itself: with bf16 trainable parameters (the new
    head, full, BitFit's biases) an lr-1e-5 AdamW step changed almost nothing. Now every trainable parameter is a
    float32 master and the step moves every one of them; the frozen weights stay bf16."""
    from sidetune.session import build, train_step

    s = build(_cfg(tmp_path, f"method.name={method}", "model.dtype=bfloat16", "train.lr=1e-5",
                   "train.weight_decay=0"), "cpu", with_optimizer=True)
    assert {p.dtype for p in s.trainable} == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in s.model.parameters() if not p.requires_grad)
    before = [p.detach().clone() for p in s.trainable]
    batch = s.task.collator(s.tokenizer)([s.data.train[i] for i in range(8)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_step(s.module, batch, s.optimizer, s.trainable, 1.0)
    small = moved = 0
    for p, b in zip(s.trainable, before):
        delta = (p.detach() - b).abs()
        assert delta.max() > 0  # every trainable tensor moved (embedding rows of unseen tokens have no gradient)
        small += int(((delta > 0) & (delta < b.abs() * 2**-9)).sum())  # an update bf16 would have rounded away
        moved += int((delta > 0).sum())
    assert small > 0.02 * moved  # AdamW's 1e-5 steps below |w| * 2^-9 (lost in bf16) were kept


def test_bf16_full_fine_tuning_matches_float32(tmp_path):
    """The trainer, full fine-tuning at lr 1e-5 for 30 steps: model.dtype=bfloat16 (fp32 masters, bf16 autocast)
    ends where model.dtype=float32 does. Without masters the bf16 run stayed near its start (eval loss 0.777,
    accuracy 0.09 against 0.591 and 1.0)."""
    from accelerate.state import AcceleratorState

    from sidetune.train import train

    results = {}
    for dtype in ("float32", "bfloat16"):
        AcceleratorState._reset_state(True)  # each run its own mixed precision (no autocast / bf16)
        cfg = _cfg(tmp_path, "method.name=full", f"model.dtype={dtype}", f"data.eval={_data(tmp_path)}",
                   "train.lr=1e-5", "train.max_steps=30", "train.batch_size=8", "train.warmup_steps=0",
                   "train.scheduler=constant", "train.progress=false", f"train.output_dir={tmp_path / dtype}")
        results[dtype] = train(cfg)
    AcceleratorState._reset_state(True)
    f32, bf16 = results["float32"], results["bfloat16"]
    assert f32["eval_loss"] < 0.65  # it learned (from about 0.78)
    assert bf16["eval_loss"] == pytest.approx(f32["eval_loss"], abs=0.02)
    assert bf16["eval_accuracy"] == f32["eval_accuracy"]


def test_fp16_model_with_loss_scaling_unscales_float32_gradients(tmp_path):
    """fp16 weights + fp16 mixed precision: the scaler refused the fp16 gradients of the trainable parameters
    ("Attempting to unscale FP16 gradients") at the first clip. They are float32 masters now."""
    from sidetune.errors import SidetuneError
    from sidetune.session import build, make_optimizer

    cfg = _cfg(tmp_path, "method.name=bitfit", "model.dtype=float16", "train.mixed_precision=fp16")
    s = build(cfg, "cpu")
    optimizer = make_optimizer(s.model, s.method, cfg.train, torch.device("cuda"))  # what build makes for a GPU
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # initialises the scale, as the first scaled backward does
    for p in s.trainable:
        p.grad = torch.full_like(p, 8.0)
    scaler.unscale_(optimizer)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in s.trainable)
    # On the CPU accelerate has no fp16 autocast to run the float32 masters beside fp16 weights: one line (the
    # precision check of sidetune.checks says it first, before any weight is loaded).
    with pytest.raises(SidetuneError, match=r"fp16 needs a CUDA GPU|no fp16 autocast there") as e:
        build(cfg, "cpu", with_optimizer=True)
    assert "\n" not in str(e.value)


def test_mixed_precision_off_with_16bit_frozen_weights_is_one_line(tmp_path):
    from sidetune.errors import SidetuneError
    from sidetune.session import build

    with pytest.raises(SidetuneError, match=r"train\.mixed_precision=auto") as e:
        build(_cfg(tmp_path, "method.name=bitfit", "model.dtype=bfloat16", "train.mixed_precision='no'"), "cpu",
              with_optimizer=True)
    assert "\n" not in str(e.value)
    build(_cfg(tmp_path, "method.name=full", "model.dtype=bfloat16", "train.mixed_precision='no'"), "cpu",
          with_optimizer=True)  # nothing stays 16-bit: plain float32


def _gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """A CUDA device of `capability` as torch would describe it (is_bf16_supported counts emulation)."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))


@pytest.mark.parametrize("capability, dtype, mp", [((7, 5), torch.float16, "fp16"), ((7, 0), torch.float16, "fp16"),
                                                   ((8, 0), torch.bfloat16, "bf16"), ((9, 0), torch.bfloat16, "bf16")])
def test_auto_dtype_is_fp16_where_bf16_is_only_emulated(monkeypatch, capability, dtype, mp):
    """T4 (7.5) and V100 (7.0) emulate bf16, and torch.cuda.is_bf16_supported() said yes: auto picked bf16. Now fp16
    weights (float32 masters) with fp16 autocast and loss scaling; Ampere and later keep bf16."""
    from sidetune.config import TrainConfig
    from sidetune.models import resolve_dtype
    from sidetune.session import mixed_precision

    _gpu(monkeypatch, capability)
    assert resolve_dtype("auto", "cuda") == dtype
    assert resolve_dtype("auto", "cuda", torch.bfloat16) == dtype  # a bf16 checkpoint
    assert resolve_dtype("auto", "cuda", torch.float32) == torch.float32
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16  # asked for by name: as asked
    assert mixed_precision(TrainConfig()) == mp
    assert mixed_precision(TrainConfig(), model_dtype=str(dtype).removeprefix("torch.")) == mp


# ---------------------------------------------------------------------------------------------------------------------
# 2. FSDP2 through accelerate: every wrapper module shards its backbone by decoder layer, tied embeddings in one group

_WRAP_GROUPS = '''
import json, sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import FSDPModule
from sidetune.config import load_config
from sidetune.session import build

dist.init_process_group("gloo")
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
# accelerate's own FSDP2 preparation (what Accelerator.prepare runs under an fsdp.yaml launch), on the CPU
acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=True,
                      device=torch.device("cpu"))
report = {}
for row in sys.argv[2:]:
    name, *extra = row.split("+")
    task = "classification" if name == "pet" else "causal_lm"
    cfg = load_config(None, ["model.name=tiny-llama", f"data.task={task}", f"method.name={name}", *extra])
    torch.manual_seed(0)
    s = build(cfg, "cpu", with_data=False)
    tied = s.base.get_input_embeddings().weight is s.base.get_output_embeddings().weight
    embed, head = s.base.get_input_embeddings(), s.base.get_output_embeddings()
    module = fsdp2_prepare_model(acc, s.module)
    groups = [type(m).__name__ for m in module.modules() if isinstance(m, FSDPModule)]
    ids = torch.randint(3, 1000, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([0, 1]) if task == "classification" else ids.clone()}
    loss = module(**batch).loss
    loss.backward()  # tied embedding and head in one group: a shared parameter seen by two groups would raise
    report[row] = {"tied": tied, "groups": groups, "layers": sum(g.endswith("DecoderLayer") for g in groups),
                   "same_group": embed._get_fsdp_state() is head._get_fsdp_state(),
                   "grads": all(p.grad is not None for p in s.model.parameters() if p.requires_grad)}
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
dist.destroy_process_group()
'''


def test_fsdp2_wrap_policy_groups_every_wrapper_by_decoder_layer(tmp_path):
    """accelerate's transformer wrap policy reads `_no_split_modules` and the input/output embeddings from the module
    handed to prepare. The LST, soft-prompt, prefix and PET modules and the chunked-loss wrapper forwarded neither:
    no decoder layer got a group (the whole backbone was one unsharded root group) and a tied embedding was split
    from its head. Now each of tiny-llama's 4 layers is a group, and embedding + head share one."""
    out = tmp_path / "groups.json"
    rows = ["lst", "prompt_tuning", "prefix_tuning", "lora+train.loss_chunk_size=8",
            "pet+method.verbalizer=[bad,good]"]
    proc = _torchrun(tmp_path, _WRAP_GROUPS, str(out), *rows)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for row in rows:
        r = report[row]
        assert r["tied"] and r["layers"] == 4, (row, r)
        assert r["same_group"] and r["grads"], (row, r)


def test_fsdp_launch_builds_in_host_memory_and_shards_onto_the_gpu(tmp_path, monkeypatch):
    """Every rank built the whole 16-bit model on its GPU before FSDP2 sharded it. Under an FSDP launch on CUDA the
    model is built on the CPU (fully_shard then moves each rank's shard); the optimizer is still made for CUDA."""
    from sidetune import session

    _gpu(monkeypatch, (9, 0))
    assert session.build_device(torch.device("cuda")) == torch.device("cuda")  # one GPU, DDP: built in place
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert session.build_device(torch.device("cuda")) == torch.device("cpu")
    assert session.build_device(torch.device("cpu")) == torch.device("cpu")
    seen = {}
    real_load = session.load_model

    def load_model(cfg, task, num_labels, device, *args, **kwargs):
        seen["load"] = torch.device(device)
        return real_load(cfg, task, num_labels, device, *args, **kwargs)

    def make_optimizer(model, method, t, device):
        seen["optimizer"] = device
        return None

    monkeypatch.setattr(session, "load_model", load_model)
    monkeypatch.setattr(session, "make_optimizer", make_optimizer)
    s = session.build(_cfg(tmp_path, "method.name=lst"), "cuda", with_optimizer=True)
    assert seen == {"load": torch.device("cpu"), "optimizer": torch.device("cuda")}
    assert {p.device.type for p in s.module.parameters()} == {"cpu"}  # side network included


# ---------------------------------------------------------------------------------------------------------------------
# 7. Quantized presets are built in host memory; the logged peak covers the training steps


def test_quantized_presets_are_built_in_host_memory_unless_the_gpu_has_room(monkeypatch):
    from sidetune.config import ModelConfig
    from sidetune.models import preset_build_device

    cuda = torch.device("cuda")
    full = 16 * 2**30  # llama-8b's 16-bit weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (22 * 2**30, 24 * 2**30))  # a 24 GB card
    assert preset_build_device(ModelConfig(name="llama-8b", quantize="nf4"), cuda, full_bytes=full) == torch.device("cpu")
    assert preset_build_device(ModelConfig(name="llama-8b", quantize="int8"), cuda, full_bytes=full) == torch.device("cpu")
    assert preset_build_device(ModelConfig(name="llama-8b", quantize="nf4"), cuda) == torch.device("cpu")  # size unknown
    assert preset_build_device(ModelConfig(name="llama-8b"), cuda) == cuda  # 16-bit: built where it runs
    assert preset_build_device(ModelConfig(name="llama-8b", quantize="nf4"), cuda, fake=True) == cuda
    # An 80 GB card: the 16 GB transient fits in half its free memory, and a GPU initialises 8B weights in seconds.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (78 * 2**30, 80 * 2**30))
    assert preset_build_device(ModelConfig(name="llama-8b", quantize="nf4"), cuda, full_bytes=full) == cuda


def test_logged_peak_covers_the_training_steps_only(monkeypatch):
    """The trainer logged torch.cuda.max_memory_allocated as it stood: the build's transients (a 4-bit load) and the
    evaluations were in it. A mocked CUDA allocator: 10 GiB at build, 3 then 4 GiB in training, 5 GiB in an eval."""
    from sidetune.memory import GiB, TrainingPeak

    state = {"now": 0, "peak": 0}

    def allocate(gib):
        state["now"] = gib * GiB
        state["peak"] = max(state["peak"], state["now"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["peak"])
    allocate(10)  # the build
    allocate(1)
    peak = TrainingPeak(torch.device("cuda"))
    peak.start()
    allocate(3)
    allocate(1)
    peak.pause()
    allocate(5)  # an evaluation
    allocate(1)
    peak.resume()
    allocate(4)
    allocate(1)
    assert peak.row()["peak_allocated_gib"] == 4.0
    assert "training steps" in peak.covers


# ---------------------------------------------------------------------------------------------------------------------
# 9. Out of memory on one of two DDP processes: both stop with the one-line message, neither waits

_OOM_WORKER = '''
import os, sys
import torch
import sidetune.train as train_mod
from sidetune.cli import main

real_step, calls = train_mod.train_step, [0]

def train_step(module, batch, *args, backward, **kwargs):
    calls[0] += 1
    if os.environ["LOCAL_RANK"] == "1" and calls[0] == 3:
        module(**batch)  # forward done; the other process is already in backward, in DDP's gradient all-reduce
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real_step(module, batch, *args, backward=backward, **kwargs)

train_mod.train_step = train_step
sys.exit(main(sys.argv[1:]))
'''


def test_out_of_memory_on_one_ddp_process_stops_both_with_its_message(tmp_path):
    """An injected CUDA OOM on rank 1 in its third step, after the forward. Before: rank 1 printed the OOM line and
    left; rank 0, inside DDP's gradient all-reduce, died with a gloo traceback (with NCCL it waited for the
    collective timeout). Now rank 0 stops with rank 1's one-line message too, at once."""
    import time

    worker = tmp_path / "oom_worker.py"
    worker.write_text(_OOM_WORKER)
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(_free_port()),
           str(worker), "train", str(config), "model.name=tiny-llama", "data.task=classification",
           f"data.train={_data(tmp_path)}", "data.eval=null", "train.batch_size=2", "train.max_steps=6",
           "train.progress=false", f"train.output_dir={out}", "method.name=lora"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    took = time.monotonic() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("sidetune: error:")]
    assert any(line.startswith("sidetune: error: out of memory at step 3") for line in errors), text[-3000:]
    assert any(line.startswith("sidetune: error: another process 1: out of memory at step 3") for line in errors), \
        text[-3000:]
    # The one traceback is the launcher's own report of a failed child (torch.distributed.elastic), no worker's.
    assert text.count("Traceback (most recent call last)") <= 1 and "sidetune/" not in text.split("Traceback")[-1]
    assert "gloo" not in text.lower(), text[-3000:]
    assert took < 120


_AGREE = '''
import sys, time
import torch, torch.distributed as dist
from sidetune.distributed import agree, announce_failure
from sidetune.errors import SidetuneError

dist.init_process_group("gloo")
assert agree(torch.tensor(1)).item() == 2  # both join: a plain sum
if dist.get_rank() == 1:
    announce_failure("out of memory at step 7")
    time.sleep(4)  # alive and silent, as a process whose collectives are stuck on its GPU: no connection closes
else:
    start = time.monotonic()
    try:
        agree(torch.tensor(0))
        print("RESULT joined")
    except SidetuneError as e:
        print(f"RESULT {e} after {time.monotonic() - start:.1f} s")
sys.stdout.flush()
import os
os._exit(0)
'''


def test_agreement_stops_on_an_announced_failure_without_the_collective(tmp_path):
    """The NCCL case, where the failed process's collectives never fail on the others' side: the agreement watches
    the store and stops in well under a second instead of waiting for the collective timeout."""
    proc = _torchrun(tmp_path, _AGREE, timeout=120)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result and result[0].startswith("RESULT another process 1: out of memory at step 7 after"), \
        proc.stdout + proc.stderr[-2000:]
    assert float(result[0].split(" after ")[1].split()[0]) < 2


# ---------------------------------------------------------------------------------------------------------------------
# 6. Predictions for CUDA made on the CPU follow CUDA's autocast policy

# torch's AMP reference, "CUDA Ops that can autocast to float32", each called as a model would call it.
_X = lambda: torch.rand(4, 8) + 0.5  # noqa: E731 (positive: log, rsqrt, pow)
_T = lambda: torch.randint(0, 8, (4,))  # noqa: E731
CUDA_FLOAT32_TABLE = {
    "__pow__": lambda x: x ** 2, "__rpow__": lambda x: 2 ** x, "__rtruediv__": lambda x: 1 / x,
    "acos": lambda x: torch.acos(x - 0.5), "asin": lambda x: torch.asin(x - 0.5), "cosh": torch.cosh,
    "binary_cross_entropy_with_logits": lambda x: torch.nn.functional.binary_cross_entropy_with_logits(x, x),
    "cdist": lambda x: torch.cdist(x, x), "cosine_similarity": lambda x: torch.nn.functional.cosine_similarity(x, x),
    "cross_entropy": lambda x: torch.nn.functional.cross_entropy(x, _T()), "cumprod": lambda x: x.cumprod(-1),
    "cumsum": lambda x: x.cumsum(-1), "dist": lambda x: torch.dist(x, x), "erfinv": lambda x: torch.erfinv(x - 0.9),
    "exp": torch.exp, "expm1": torch.expm1, "group_norm": lambda x: torch.nn.functional.group_norm(x, 2),
    "kl_div": lambda x: torch.nn.functional.kl_div(x, x, reduction="batchmean"),
    "l1_loss": lambda x: torch.nn.functional.l1_loss(x, x), "log": torch.log,
    "layer_norm": lambda x: torch.nn.functional.layer_norm(x, (8,)),
    "log_softmax": lambda x: torch.log_softmax(x, -1), "log10": torch.log10, "log1p": torch.log1p,
    "log2": torch.log2, "mse_loss": lambda x: torch.nn.functional.mse_loss(x, x),
    "nll_loss": lambda x: torch.nn.functional.nll_loss(x, _T()), "norm": lambda x: x.norm(),
    "normalize": lambda x: torch.nn.functional.normalize(x), "pdist": lambda x: torch.pdist(x),
    "pow": lambda x: x.pow(3), "prod": lambda x: x.prod(), "reciprocal": torch.reciprocal, "rsqrt": torch.rsqrt,
    "sinh": torch.sinh, "smooth_l1_loss": lambda x: torch.nn.functional.smooth_l1_loss(x, x),
    "softmax": lambda x: torch.softmax(x, -1), "softmin": lambda x: torch.nn.functional.softmin(x, -1),
    "softplus": torch.nn.functional.softplus, "sum": lambda x: x.sum(), "tan": torch.tan,
    "renorm": lambda x: x.renorm(2, 0, 1.0),
}


def _dtype_of(op, x):
    try:
        return op(x).dtype
    except (NotImplementedError, RuntimeError):  # no bf16 CPU kernel (pdist): CUDA's policy never asks for one
        return None


def test_cuda_autocast_policy_runs_cudas_float32_ops_in_float32():
    """Every op of the table gives float32 from a bf16 input under CPU autocast + the CUDA policy; the matmuls stay
    bf16. Under the CPU's own policy layer_norm, softmax and pow stay bf16: the predictions under-counted them."""
    from sidetune.profiling.measure import cuda_autocast_policy

    x = _X().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_rules = {name: _dtype_of(op, x) for name, op in CUDA_FLOAT32_TABLE.items()}
        with cuda_autocast_policy():
            cuda_rules = {name: op(x).dtype for name, op in CUDA_FLOAT32_TABLE.items()}
            linear = torch.nn.functional.linear(_X(), _X())
            matmul = _X() @ _X().T
    assert {n: d for n, d in cuda_rules.items() if d != torch.float32} == {}
    assert {cpu_rules[n] for n in ("layer_norm", "softmax", "pow", "exp", "rsqrt", "sum")} == {torch.bfloat16}
    assert linear.dtype == matmul.dtype == torch.bfloat16


def test_cuda_prediction_on_the_cpu_counts_float32_layer_norm_and_softmax():
    """tiny-gpt2 (LayerNorm, eager softmax attention), LoRA, bf16: predicted for CUDA, its saved activations exceed
    those of the same bf16 step under CPU rules (they were equal: the CUDA prediction ran CPU autocast)."""
    from sidetune.config import load_config
    from sidetune.profiling.measure import measure

    common = ["model.name=tiny-gpt2", "data.task=causal_lm", "method.name=lora", "train.batch_size=2",
              "data.max_length=16", "model.attn_implementation=eager"]
    cuda = measure(load_config(None, common), True, "cuda", fake=True)
    cpu = measure(load_config(None, [*common, "model.dtype=bfloat16", "train.mixed_precision=bf16"]), True, "cpu",
                  fake=True)
    assert cuda["dtype"] == cpu["dtype"] == "bfloat16" and cuda["mixed_precision"] == cpu["mixed_precision"] == "bf16"
    assert cuda["act_backbone_bytes"] > 1.2 * cpu["act_backbone_bytes"]


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("head_dim, math", [(4, True), (8, False)])
def test_cuda_prediction_runs_attention_below_head_dim_8_in_the_math_kernel(head_dim, math):
    """10. CUDA's fused SDPA kernels need a head dim that is a multiple of 8 (LST side blocks at a large method.r
    have 2 or 4): CUDA runs the math kernel, which saves the B x heads x T x T probabilities; the CPU's flash kernel,
    on which a CUDA prediction ran, saves none."""
    from sidetune.profiling.measure import cuda_autocast_policy

    q = torch.randn(2, 3, 16, head_dim, requires_grad=True)

    def attend():
        with torch.autocast("cpu", dtype=torch.bfloat16), cuda_autocast_policy():
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    assert ((2, 3, 16, 16) in _saved_shapes(attend)) == math


def test_int8_ladder_input_under_autocast_matches_the_plain_ladder():
    """11. The int8-saved ladder input under autocast (recipes/llama8b_qlst.yaml: ladder_grad_input=int8 with bf16
    mixed precision; on a GPU this is the only branch it takes): the forward is the autocast linear's to the bit, the
    weight gradient within the int8 rounding, both in the dtypes autocast gives."""
    from sidetune.methods._lst_blocks import ladder

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    x = torch.randn(3, 5, 32)  # a backbone activation: no gradient of its own
    grads, outs = {}, {}
    for int8 in (False, True):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ladder(lin, x, int8)
        y.float().pow(2).sum().backward()
        outs[int8], grads[int8] = y, (lin.weight.grad.clone(), lin.bias.grad.clone())
    assert outs[True].dtype == outs[False].dtype == torch.bfloat16
    assert torch.equal(outs[True], outs[False])
    assert grads[True][0].dtype == torch.float32 and grads[True][1].dtype == torch.float32
    for got, ref in zip(grads[True], grads[False]):
        assert (got - ref).norm() <= 0.03 * ref.norm()
