"""`sidetune profile`: where each method's training memory goes, measured and predicted, as JSON, Markdown and PNG.

Every row is one training step of one method through sidetune's own code path (`models.load_model`, the method's
`apply`, `train.training_module` for gradient checkpointing and the chunked loss, `train.make_optimizer`, the autocast
and fp32-output wrapping accelerate applies in mixed precision) on a random token batch that pads nothing and labels
every token. Each row runs in its own process, so every CUDA peak is clean. Two reference rows come with every
profile: `floor`, a no-grad forward of the same batch on the same base (`floor-nf4` too when a 4-bit row is present),
and `full` fine-tuning.

How each number is taken (memory.py has the machinery):
- weights / grads / optimizer state: bytes of the distinct storages of the tensors themselves (4-bit weights count
  their packed bytes and quantization state).
- activations: every tensor autograd saves for backward in the profiled step, each storage counted once at its full
  storage size, weights excluded, attributed to the innermost running module: backbone (the gradient-to-input cost),
  method (modules the method created), head (task head, output embedding, loss).
- FLOPs: matmul and attention FLOPs of the forward; backward FLOPs split into dL/dx and dL/dW per role.
- peaks: `tracked_peak_bytes` follows every live storage op by op on the real tensors; on CUDA the measured peak is
  `torch.cuda.max_memory_allocated` (reserved is reported beside it; nvidia-smi shows more: the CUDA context and the
  allocator's cache). `predicted_peak_bytes` is the same tracker on fake tensors (no memory, no GPU).

profile.json holds a list of rows with these fields (null where a number does not apply):

    label                 row name: a method, an alias (qlora = lora + nf4, qlst = lst + nf4), floor, floor-nf4
    method                METHODS key, or null for a floor row
    model task batch seq  what ran; tokens = batch * seq
    device                cuda, cpu or meta (meta: prediction only)
    target                the device the prediction is for (cuda or cpu)
    quantize dtype mixed_precision loss_chunk_size gradient_checkpointing optimizer   the resolved config
    params_total params_trainable       parameter counts (a 4-bit weight counts its logical N x K)
    weights_bytes grads_bytes optimizer_bytes
    act_backbone_bytes act_method_bytes act_head_bytes act_total_bytes   saved for backward, by role
    fwd_flops             forward matmul + attention FLOPs
    bwd_dx_flops_{backbone,method,head} bwd_dw_flops_{backbone,method,head} bwd_dx_flops bwd_dw_flops
    recompute_flops       forward FLOPs run again in backward (activation checkpointing, chunked loss)
    step_time_s tokens_per_s            median of the timed steps (real devices)
    tracked_peak_bytes peak_phase peak_breakdown   live-storage peak of the real run, the phase it happened in
                                                   (forward, backward, optimizer) and its split by category
    cuda_max_allocated_bytes cuda_max_reserved_bytes
    measured_peak_bytes measured_peak_source   the number the prediction is judged against
    predicted_peak_bytes predicted_peak_phase predicted_breakdown predicted_on
    prediction_error      predicted / measured - 1
    error                 why a row has no numbers (e.g. CUDA out of memory), else null
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError

ALIASES = {"qlora": ("lora", "nf4"), "qlst": ("lst", "nf4")}  # alias -> (method, model.quantize)
GiB, MiB = 1024**3, 1024**2


# ---------------------------------------------------------------------------------------------------------------------
# Rows: which methods, with which config overrides


@dataclass
class RowSpec:
    label: str
    method: str | None  # None: the no-grad forward floor
    overrides: list[str] = field(default_factory=list)  # section.key=value, as `sidetune train` takes them


def resolve_rows(methods: str, model: str, task: str, batch: int, seq: int, sets: list[str]) -> list[RowSpec]:
    """The rows to profile: the requested methods (`all` = every registered method plus the aliases whose method is
    registered), the full fine-tuning reference and the no-grad floor(s). `sets` are overrides for every row
    (train.loss_chunk_size=1024) or for one label or method (lora.r=16 applies to lora and qlora rows)."""
    from sidetune.config import load_config
    from sidetune.methods import METHODS

    available = {**{m: (m, None) for m in METHODS}, **{a: v for a, v in ALIASES.items() if v[0] in METHODS}}
    names = list(available) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        if name not in available:
            raise SidetuneError(f"--methods: unknown method {name!r}; choose from {', '.join(available)} or all")
    if "full" not in names and "full" in METHODS:
        names.append("full")  # the reference every profile carries
    common = [f"model.name={model}", f"data.task={task}", f"train.batch_size={batch}", f"data.max_length={seq}"]
    if task == "classification":
        common.append("data.num_labels=2")
    global_sets, scoped = [], []
    for item in sets:
        key = item.partition("=")[0]
        if "=" not in item or "." not in key:
            raise SidetuneError(f"--set {item!r} must look like section.key=value or method.key=value")
        (global_sets if key.split(".")[0] in ("model", "data", "train") else scoped).append(item)
    for item in scoped:
        scope = item.split(".")[0]
        if scope not in available and scope not in METHODS and scope != "method":
            raise SidetuneError(f"--set {item!r}: {scope!r} is no config section, method or alias")
    rows = []
    quantized = set()
    for name in names:
        method, quantize = available[name]
        overrides = [*common, *global_sets, f"method.name={method}"]
        if quantize:
            overrides.append(f"model.quantize={quantize}")
        for item in scoped:
            scope, _, rest = item.partition(".")
            if scope in (name, method, "method"):
                overrides.append(f"method.{rest}")
        rows.append(RowSpec(name, method, overrides))
        quantized.add(load_config(None, overrides).model.quantize)  # validates every override now
    floors = [RowSpec("floor" if q is None else f"floor-{q}", None,
                      [*common, *global_sets, *([f"model.quantize={q}"] if q else [])])
              for q in sorted(quantized, key=lambda q: q or "")]
    return floors + rows


# ---------------------------------------------------------------------------------------------------------------------
# One row: a real step and/or a fake (predicted) step


def _random_batch(config, task: str, batch: int, seq: int, device, num_labels: int | None) -> dict:
    import torch

    ids = torch.randint(3, min(config.vocab_size, 32000), (batch, seq), device=device)
    # No attention_mask: nothing is padded. transformers skips building the mask for an all-ones mask on real tensors
    # but not on fake ones (it reads them as tracing), so passing none keeps the prediction on the real path.
    out = {"input_ids": ids}
    if task == "causal_lm":
        out["labels"] = ids.clone()  # every token labelled, as the chunked loss's masks assume on fake tensors
    else:
        out["labels"] = torch.randint(0, num_labels or 2, (batch,), device=device)
    return out


def _mixed_precision(cfg, target: str, real: bool) -> str:
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    if real:
        from sidetune.train import _mixed_precision

        return _mixed_precision(cfg.train)
    return "bf16" if target == "cuda" else "no"


def _autocast(module, mp: str, device_type: str):
    """What `Accelerator.prepare` does to a module in mixed precision: autocast around its forward, outputs
    converted to fp32 (for a causal LM without the chunked loss that is a B x T x V fp32 copy of the logits)."""
    if mp == "no":
        return module
    import torch
    from accelerate.utils import convert_outputs_to_fp32

    dtype = torch.bfloat16 if mp == "bf16" else torch.float16

    def forward(**batch):
        with torch.autocast(device_type, dtype=dtype):
            return module(**batch)

    return convert_outputs_to_fp32(forward)


def _sim_device(target: str):
    """Where fake tensors can live: the target itself, or the CPU standing in for CUDA on a CPU-only torch build
    (its fake CUDA tensors cannot even be viewed there); dtypes and autocast still follow the target."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    if target == "cpu":
        return torch.device("cpu")
    try:
        with FakeTensorMode():
            torch.empty(2, 2, device=target)[0].t()
        return torch.device(target)
    except RuntimeError:
        return torch.device("cpu")


def measure(cfg, train: bool, target: str, fake: bool, timed_steps: int = 0) -> dict[str, Any]:
    """One steady-state training step (or no-grad forward when not `train`) of `cfg` on `target` under the trackers,
    then `timed_steps` untracked steps for the clock. With `fake` the step runs on fake tensors: a prediction."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sidetune import memory as mem
    from sidetune.methods import build_method
    from sidetune.models import load_model, resolve_dtype
    from sidetune.train import make_optimizer, training_module

    cfg = copy.deepcopy(cfg)
    device = _sim_device(target) if fake else torch.device(target)
    # Resolve "auto" dtypes for the target, not for the device the fake tensors stand on.
    cfg.model.dtype = str(resolve_dtype(cfg.model.dtype, target)).removeprefix("torch.")
    cfg.model.compute_dtype = str(resolve_dtype(cfg.model.compute_dtype, target, torch.bfloat16)).removeprefix("torch.")
    mp = _mixed_precision(cfg, target, real=not fake)
    task, n_labels = cfg.data.task, cfg.data.num_labels
    quantize = cfg.model.quantize
    out: dict[str, Any] = {"dtype": cfg.model.dtype, "mixed_precision": mp}

    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
            stack.enter_context(mem.AllTrueMasks())
            stack.enter_context(mem.fake_as_data())
            model_cfg = _no_quant(cfg.model)  # fake_quantize_linears below stands in for bitsandbytes
        else:
            model_cfg = cfg.model
        torch.manual_seed(0)
        model = load_model(model_cfg, task, n_labels, device)
        if fake and quantize:
            mem.fake_quantize_linears(model, quantize, cfg.model.double_quant, getattr(torch, cfg.model.compute_dtype),
                                      device)
        backbone = mem.snapshot_modules(model)
        method = build_method(cfg.method) if train else None
        trained = method.apply(model) if train else model
        if not train:
            for p in trained.parameters():
                p.requires_grad_(False)
        module = training_module(trained, cfg) if train else _floor_module(trained, cfg)
        roles = mem.module_roles(module, backbone, model)
        batch = _random_batch(model.config, task, cfg.train.batch_size, cfg.data.max_length, device, n_labels)
        optimizer = make_optimizer(trained, method, cfg.train, torch.device(target)) if train else None
        forward = _autocast(module, mp, device.type)
        module.train(train)
        trainable = [p for p in trained.parameters() if p.requires_grad]

        cuda = device.type == "cuda" and not fake
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if train:
            # The optimizer state exists from the first step on; creating it with a zero-gradient step makes the
            # one tracked step a steady-state step (the second step's peak) without a forward and backward more.
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tracker = mem.LiveTracker(block=mem.CUDA_BLOCK if target == "cuda" else 1)
        tracker.track_model(module)
        tracker.track(batch.values(), "inputs")
        if optimizer is not None:
            tracker.track(mem.optimizer_state_tensors(optimizer), "optimizer")

        def step(saved=None, times=None):
            start = time.perf_counter()
            tracker.flops_from = saved
            tracker.phase = "forward"
            with saved or contextlib.nullcontext(), torch.set_grad_enabled(train):
                loss = forward(**batch).loss
            if train:
                tracker.phase = "backward"
                loss.backward()
                if saved is not None:
                    out["grads_bytes"] = mem.storage_bytes(mem.grad_tensors(trained))
                if cfg.train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                tracker.phase = "optimizer"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tracker.flops_from = None
            tracker.phase = "setup"
            del loss
            if cuda:
                torch.cuda.synchronize()
            if times is not None:
                times.append(time.perf_counter() - start)

        baseline = tracker.live_bytes()  # weights and batch: allocated before, alive throughout
        allocator = mem.CPUAllocatorPeak() if device.type == "cpu" and not fake else contextlib.nullcontext()
        saved = mem.SavedTensorTracker(module, roles)
        with allocator, tracker:
            step(saved)
        tracker.remove_hooks()
        if isinstance(allocator, mem.CPUAllocatorPeak):
            out["cpu_allocated_peak_bytes"] = baseline + allocator.peak

        times: list[float] = []
        for _ in range(0 if fake else timed_steps):
            step(times=times)

        acts = saved.by_role()
        out.update(
            params_total=mem.param_count(trained), params_trainable=mem.param_count(trained, trainable=True),
            weights_bytes=mem.storage_bytes(mem.weight_tensors(module)),
            grads_bytes=out.get("grads_bytes", 0),
            optimizer_bytes=mem.storage_bytes(mem.optimizer_state_tensors(optimizer)) if optimizer else 0,
            **{f"act_{r}_bytes": acts[r] for r in mem.ROLES}, act_total_bytes=sum(acts.values()),
            fwd_flops=tracker.fwd_flops,
            **{f"bwd_{k}_flops_{r}": tracker.bwd_flops[(r, k)] for k in ("dx", "dw") for r in mem.ROLES},
            bwd_dx_flops=sum(tracker.bwd_flops[(r, "dx")] for r in mem.ROLES),
            bwd_dw_flops=sum(tracker.bwd_flops[(r, "dw")] for r in mem.ROLES),
            recompute_flops=tracker.recompute_flops,
            peak_bytes=tracker.peak, peak_phase=tracker.peak_phase, peak_breakdown=tracker.peak_breakdown,
            optimizer=cfg.train.optimizer if train else None,
        )
        if times:
            out["step_time_s"] = statistics.median(times)
            out["tokens_per_s"] = cfg.train.batch_size * cfg.data.max_length / out["step_time_s"]
        if cuda:
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def _no_quant(model_cfg):
    import dataclasses

    return dataclasses.replace(model_cfg, quantize=None)


def _floor_module(model, cfg):
    """The floor's forward: the same loss computation as training (chunked when asked), no gradient checkpointing."""
    from sidetune.train import forward_module

    return forward_module(model, cfg)
