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


def resolve_rows(methods: str, model: str, task: str, batch: int, seq: int, sets: list[str],
                 references: bool = True) -> list[RowSpec]:
    """The rows to profile: the requested methods (`all` = every registered method plus the aliases whose method is
    registered) and, with `references`, the full fine-tuning reference and the no-grad floor(s). `sets` are overrides
    for every row (train.loss_chunk_size=1024) or for one label or method (lora.r=16 applies to lora and qlora rows;
    qlora.train.gradient_checkpointing=true to the qlora row only)."""
    from sidetune.config import load_config
    from sidetune.methods import METHODS

    available = {**{m: (m, None) for m in METHODS}, **{a: v for a, v in ALIASES.items() if v[0] in METHODS}}
    names = list(available) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        if name not in available:
            raise SidetuneError(f"--methods: unknown method {name!r}; choose from {', '.join(available)} or all")
    if references and "full" not in names and "full" in METHODS:
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
                # qlora.r=16 sets the method's field; qlora.train.gradient_checkpointing=true a section's, one row only
                overrides.append(rest if rest.split(".")[0] in ("model", "data", "train") else f"method.{rest}")
        rows.append(RowSpec(name, method, overrides))
        quantized.add(load_config(None, overrides).model.quantize)  # validates every override now
    floors = [RowSpec("floor" if q is None else f"floor-{q}", None,
                      [*common, *global_sets, *([f"model.quantize={q}"] if q else [])])
              for q in sorted(quantized, key=lambda q: q or "")]
    return floors + rows if references else rows


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
    if target != "cuda":
        return "no"
    import torch

    # As train.py decides: bf16 where the GPU has it; a GPU-less prediction assumes one that has.
    return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "no"


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


def measure(cfg, train: bool, target: str, fake: bool, timed_steps: int = 0, apply=None) -> dict[str, Any]:
    """One steady-state training step (or no-grad forward when not `train`) of `cfg` on `target` under the trackers,
    then `timed_steps` untracked steps for the clock. With `fake` the step runs on fake tensors: a prediction.
    `apply(model) -> module` replaces the method's apply (bench/memory.py profiles PEFT's models this way)."""
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
        method = build_method(cfg.method) if train and apply is None else None
        trained = (apply or method.apply)(model) if train else model
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
            torch.cuda.empty_cache()  # a 4-bit load passes through the full-precision weights: drop that cache
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


# ---------------------------------------------------------------------------------------------------------------------
# A row: prediction on fake tensors, then (on a real device) the measured step


def profile_row(spec: RowSpec, device: str, target: str, steps: int) -> dict[str, Any]:
    """Everything profile.json says about one row (see the module docstring for the fields)."""
    from sidetune.config import load_config

    cfg = load_config(None, spec.overrides)
    train = spec.method is not None
    row: dict[str, Any] = {
        "label": spec.label, "method": spec.method, "model": cfg.model.name, "task": cfg.data.task,
        "batch": cfg.train.batch_size, "seq": cfg.data.max_length, "device": device, "target": target,
        "quantize": cfg.model.quantize, "loss_chunk_size": cfg.train.loss_chunk_size,
        "gradient_checkpointing": cfg.train.gradient_checkpointing if train else False,
        "error": None,
    }
    pred = real = None
    try:
        pred = measure(cfg, train, target, fake=True)
    except Exception as e:  # a method or model the fake step cannot run: say so, still measure it
        row["prediction_failed"] = f"{type(e).__name__}: {e}"
    if device != "meta":
        try:
            real = measure(cfg, train, device, fake=False, timed_steps=steps)
        except Exception as e:
            if "out of memory" not in str(e).lower():
                raise
            row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
    source = real or pred
    if source is None:
        row["error"] = row.get("error") or row.get("prediction_failed")
        return row
    row.update({k: v for k, v in source.items() if k not in ("peak_bytes", "peak_phase", "peak_breakdown")})
    if real is not None:
        row.update(tracked_peak_bytes=real["peak_bytes"], peak_phase=real["peak_phase"],
                   peak_breakdown=real["peak_breakdown"])
        if device == "cuda":
            row.update(measured_peak_bytes=real["cuda_max_allocated_bytes"],
                       measured_peak_source="torch.cuda.max_memory_allocated")
        else:
            row.update(measured_peak_bytes=real["cpu_allocated_peak_bytes"],
                       measured_peak_source="CPU allocator peak (torch.profiler profile_memory)")
    if pred is not None:
        row.update(predicted_peak_bytes=pred["peak_bytes"], predicted_peak_phase=pred["peak_phase"],
                   predicted_breakdown=pred["peak_breakdown"],
                   predicted_on="fake tensors on " + str(_sim_device(target)) + f" for {target}")
        if row.get("measured_peak_bytes"):
            row["prediction_error"] = pred["peak_bytes"] / row["measured_peak_bytes"] - 1
    return {k: row.get(k) for k in FIELDS} | {k: v for k, v in row.items() if k not in FIELDS}


FIELDS = (
    "label", "method", "model", "task", "batch", "seq", "device", "target", "quantize", "dtype", "mixed_precision",
    "loss_chunk_size", "gradient_checkpointing", "optimizer", "params_total", "params_trainable",
    "weights_bytes", "grads_bytes", "optimizer_bytes",
    "act_backbone_bytes", "act_method_bytes", "act_head_bytes", "act_total_bytes", "fwd_flops",
    "bwd_dx_flops_backbone", "bwd_dx_flops_method", "bwd_dx_flops_head",
    "bwd_dw_flops_backbone", "bwd_dw_flops_method", "bwd_dw_flops_head", "bwd_dx_flops", "bwd_dw_flops",
    "recompute_flops", "step_time_s", "tokens_per_s", "tracked_peak_bytes", "peak_phase", "peak_breakdown",
    "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "measured_peak_bytes", "measured_peak_source",
    "predicted_peak_bytes", "predicted_peak_phase", "predicted_breakdown", "predicted_on", "prediction_error", "error",
)


def run_isolated(spec: RowSpec, device: str, target: str, steps: int) -> dict[str, Any]:
    """`profile_row` in a fresh Python process, so that the row's peak is its own."""
    import sidetune

    root = str(Path(sidetune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="sidetune-profile-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        spec_path.write_text(json.dumps({"spec": spec.__dict__, "device": device, "target": target, "steps": steps}))
        proc = subprocess.run([sys.executable, "-m", "sidetune.profile", str(spec_path), str(out_path)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"label": spec.label, "method": spec.method, "error": f"worker failed: {tail[0][:300]}"}
        return json.loads(out_path.read_text())


def _worker(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    job = json.loads(Path(spec_path).read_text())
    row = profile_row(RowSpec(**job["spec"]), job["device"], job["target"], job["steps"])
    Path(out_path).write_text(json.dumps(row))


# ---------------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (tiny-llama, llama-1b, llama-8b, llama-70b, ...), alias or "
                                                  "local model directory")
    p.add_argument("--methods", default="all", help="comma-separated METHODS keys and aliases (qlora, qlst), or all; "
                                                    "the floor and full fine-tuning are always added")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--task", choices=["causal_lm", "classification"], default="causal_lm")
    p.add_argument("--device", choices=["cuda", "cpu", "meta"], default=None,
                   help="where the steps run; meta predicts only, allocating nothing (default: cuda if available)")
    p.add_argument("--target", choices=["cuda", "cpu"], default=None,
                   help="the device a --device meta prediction is for (default cuda: bf16 weights and autocast)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row after the tracked one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="config override for every row (train.loss_chunk_size=1024, model.dtype=bfloat16) or for one "
                        "method or alias (lora.r=16, qlora.targets=[all-linear], qlora.train.gradient_checkpointing=true); "
                        "repeatable")
    p.add_argument("--vram", default=None, help="memory budget the reading judges against, e.g. 24GiB (default on "
                                                "CUDA: the GPU's memory)")
    p.add_argument("--out", required=True, help="directory for profile.json, profile.md, profile.png")


def parse_bytes(text: str) -> int:
    """'8GiB', '8G', '7.5 GB', '512MiB', '1e9' -> bytes (G/GB/GiB all mean 2**30: GPUs are sold in GiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    size = int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")) if m else 0
    if size <= 0:
        raise SidetuneError(f"memory size {text!r} is not understood; write a positive size like 8GiB, 24G or 512MiB")
    return size


def check_model(name: str) -> None:
    from sidetune.models import PRESETS, resolve_path

    if name not in PRESETS:
        resolve_path(name)  # raises the one-line error for a missing directory or an alias's missing package


def run(args: argparse.Namespace) -> int:
    import torch

    if args.batch < 1 or args.seq < 2:
        raise SidetuneError(f"--batch must be >= 1 and --seq >= 2, got {args.batch} and {args.seq}")
    if args.steps < 0:
        raise SidetuneError(f"--steps must be >= 0, got {args.steps}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SidetuneError("--device cuda but torch sees no CUDA GPU; use --device cpu, or --device meta to predict")
    if args.target and device != "meta" and args.target != device:
        raise SidetuneError(f"--target {args.target} applies to --device meta only (a {device} run profiles {device})")
    target = args.target or (device if device != "meta" else "cuda")
    vram = parse_bytes(args.vram) if args.vram else None
    if vram is None and device == "cuda":
        vram = torch.cuda.get_device_properties(0).total_memory  # judge against the GPU it runs on
    check_model(args.model)
    specs = resolve_rows(args.methods, args.model, args.task, args.batch, args.seq, args.sets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(specs, 1):
        print(f"sidetune: profile {i}/{len(specs)}: {spec.label}", flush=True)
        # A prediction allocates nothing, so meta rows share this process; real rows each get their own.
        rows.append(profile_row(spec, device, target, args.steps) if device == "meta"
                    else run_isolated(spec, device, target, args.steps))
        if rows[-1].get("error"):
            print(f"sidetune:   {spec.label}: {rows[-1]['error']}", flush=True)
    write_reports(rows, out, vram)
    print(markdown_table(rows))
    print(f"sidetune: wrote {out / 'profile.json'}, {out / 'profile.md'}, {out / 'profile.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def peak_of(row: dict) -> int | None:
    """The row's peak as the report shows it: measured where measured, else predicted."""
    return row.get("measured_peak_bytes") or row.get("predicted_peak_bytes")


def _unit(rows: list[dict]) -> tuple[float, str]:
    biggest = max((peak_of(r) or 0 for r in rows), default=0)
    return (GiB, "GiB") if biggest >= GiB else (MiB, "MiB")


def _fmt(value, scale: float) -> str:
    return "–" if value is None else f"{value / scale:.2f}" if scale > MiB else f"{value / scale:.1f}"


def _flops(value) -> str:
    if value is None:
        return "–"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def markdown_table(rows: list[dict]) -> str:
    scale, unit = _unit(rows)
    floors = {r.get("quantize"): r for r in rows if r.get("method") is None and peak_of(r)}
    head = ("| row | trainable params | weights | grads + optim | act: backbone (grad-to-input) | act: method | "
            "act: head | bwd dL/dx backbone | bwd dL/dW | measured peak | predicted peak | error | step ms | "
            "tokens/s | x floor |")
    lines = [f"Memory in {unit}; FLOPs per step.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error") and not peak_of(r):
            lines.append(f"| {r['label']} | {r['error']} |" + " |" * (head.count("|") - 3))
            continue
        floor = floors.get(r.get("quantize"))
        ratio = f"{peak_of(r) / peak_of(floor):.2f}" if floor and peak_of(r) else "–"
        err = r.get("prediction_error")
        lines.append("| " + " | ".join([
            r["label"], f"{r['params_trainable']:,}",
            _fmt(r["weights_bytes"], scale), _fmt(r["grads_bytes"] + r["optimizer_bytes"], scale),
            _fmt(r["act_backbone_bytes"], scale), _fmt(r["act_method_bytes"], scale), _fmt(r["act_head_bytes"], scale),
            _flops(r["bwd_dx_flops_backbone"]), _flops(r["bwd_dw_flops"]),
            _fmt(r.get("measured_peak_bytes"), scale), _fmt(r.get("predicted_peak_bytes"), scale),
            "–" if err is None else f"{100 * err:+.1f}%",
            "–" if r.get("step_time_s") is None else f"{1000 * r['step_time_s']:.1f}",
            "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}", ratio,
        ]) + " |")
    return "\n".join(lines)


def reading(rows: list[dict], vram: int | None) -> str:
    """One paragraph: which method fits and why, from the numbers in the rows."""
    scale, unit = _unit(rows)
    methods = [r for r in rows if r.get("method") is not None and peak_of(r)]
    if not methods:
        return "No method row has a peak to read."
    gib = lambda b: f"{b / scale:.2f} {unit}"  # noqa: E731
    best = min(methods, key=peak_of)
    floors = {r.get("quantize"): r for r in rows if r.get("method") is None and peak_of(r)}
    full = next((r for r in methods if r["label"] == "full"), None)
    source = next((r["measured_peak_source"] for r in methods if r.get("measured_peak_source")), None)
    parts = [f"Peaks are {'measured (' + source + ')' if source else 'predicted on fake tensors'}."]
    if vram is not None:
        fit = [r["label"] for r in methods if peak_of(r) <= vram]
        parts.append(f"Within {gib(vram)}: {', '.join(fit) if fit else 'no method'} fits"
                     + ("" if len(fit) == len(methods) else
                        f"; {', '.join(r['label'] for r in methods if peak_of(r) > vram)} does not") + ".")
    floor = floors.get(best.get("quantize"))
    ratio = f", {peak_of(best) / peak_of(floor):.2f}x the no-grad forward of the same batch" if floor else ""
    parts.append(f"{best['label']} needs the least: {gib(peak_of(best))}{ratio}"
                 + (f", {peak_of(best) / peak_of(full):.2f}x full fine-tuning" if full and full is not best else "")
                 + ".")
    paying = sorted((r for r in methods if r["act_backbone_bytes"]), key=lambda r: -r["act_backbone_bytes"])
    free = [r["label"] for r in methods if not r["act_backbone_bytes"] and not r["bwd_dx_flops_backbone"]]
    pefts = [r for r in paying if r["label"] != "full"]
    if pefts:
        worst = pefts[0]
        share = worst["act_backbone_bytes"] / peak_of(worst)
        counts = sorted(r["params_trainable"] for r in pefts)
        trained = f"{counts[0]:,}" + (f" to {counts[-1]:,}" if counts[-1] != counts[0] else "")
        parts.append(f"The gradient-to-input cost is what separates them: {', '.join(r['label'] for r in pefts)} "
                     f"train {trained} parameters yet backpropagate through the frozen backbone, which keeps up to "
                     f"{gib(worst['act_backbone_bytes'])} of activations for backward ({100 * share:.0f}% of "
                     f"{worst['label']}'s peak) and spends {_flops(worst['bwd_dx_flops_backbone'])} backward FLOPs "
                     f"on dL/dx.")
    if free:
        parts.append(f"{', '.join(free)} keep{'s' if len(free) == 1 else ''} no backbone activation and run no "
                     f"backbone dL/dx: only {'its' if len(free) == 1 else 'their'} own modules and the head are "
                     f"backpropagated.")
    elif not pefts and paying:
        parts.append("Every method here backpropagates through the backbone.")
    return " ".join(parts)


def write_reports(rows: list[dict], out: Path, vram: int | None = None) -> None:
    (out / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    first = next((r for r in rows if r.get("model")), rows[0])
    title = (f"# Memory profile: {first.get('model')}, {first.get('task')}, batch {first.get('batch')} x seq "
             f"{first.get('seq')}, device {first.get('device')} (prediction for {first.get('target')})")
    notes = ("Activations are the tensors autograd saves for backward, each storage counted once at its full size, "
             "weights excluded: backbone = the gradient-to-input cost, method = the method's own modules, head = task "
             "head, output embedding and loss. The measured peak is `torch.cuda.max_memory_allocated` on CUDA "
             "(reserved memory and nvidia-smi read higher) and the CPU allocator's peak on CPU; the predicted peak "
             "follows the live storages of the same step on fake tensors. `x floor` divides by the no-grad forward of "
             "the same batch on the same base (4-bit rows by the 4-bit floor).")
    text = "\n\n".join([title, reading(rows, vram), markdown_table(rows), notes, "![profile](profile.png)"])
    (out / "profile.md").write_text(text + "\n")
    plot(rows, out / "profile.png")


SEGMENTS = (  # (label, color, hatch, bytes of a row)
    ("weights", "#9e9e9e", "", lambda r: r["weights_bytes"]),
    ("grads + optimizer state", "#5b8bd0", "", lambda r: r["grads_bytes"] + r["optimizer_bytes"]),
    ("backbone activations = gradient-to-input cost", "#d62728", "//", lambda r: r["act_backbone_bytes"]),
    ("method activations", "#2ca02c", "", lambda r: r["act_method_bytes"]),
    ("head + loss activations", "#ff9f1c", "", lambda r: r["act_head_bytes"]),
    ("rest of the peak: transients (logits, loss, dequantized weights, backward buffers)", "#e8e8e8", "..",
     lambda r: max(0, (peak_of(r) or 0) - sum(g(r) for *_, g in SEGMENTS[:5]))),
)


def plot(rows: list[dict], path: Path) -> None:
    """Stacked horizontal bars per row: what the step holds by kind, then the rest of its peak (transients); the
    measured and predicted peaks as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("weights_bytes") is not None]
    scale, unit = _unit(rows)
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.62 * max(len(rows), 1)), dpi=120)
    ys = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for label, color, hatch, get in SEGMENTS:
        widths = [get(r) / scale for r in rows]
        ax.barh(ys, widths, left=left, color=color, hatch=hatch, linewidth=0.6, height=0.62, label=label,
                edgecolor="#7f0000" if hatch == "//" else "#b0b0b0" if hatch else "white")
        left = [a + b for a, b in zip(left, widths)]
    xmax = max(left + [(r.get("predicted_peak_bytes") or 0) / scale for r in rows] + [1e-9])
    for y, r, end in zip(ys, rows, left):
        if r.get("measured_peak_bytes"):
            ax.plot(r["measured_peak_bytes"] / scale, y, marker="|", color="black", markersize=22, mew=2.5)
        if r.get("predicted_peak_bytes"):
            ax.plot(r["predicted_peak_bytes"] / scale, y, marker="D", markersize=7, mfc="none", mec="black", mew=1.4)
        x = max(end, (r.get("predicted_peak_bytes") or 0) / scale) + xmax * 0.02
        peak = peak_of(r)
        text = f"{peak / scale:.2f} {unit}" if peak else ""
        if r.get("method") is not None and peak:
            share = r["act_backbone_bytes"] / peak
            text += f"   grad-to-input {100 * share:.0f}%" if share else "   no grad-to-input"
        ax.text(x, y, text, va="center", ha="left", fontsize=9,
                color="#b00000" if r.get("act_backbone_bytes") else "#1f5f1f" if r.get("method") else "black")
    if any(r.get("measured_peak_bytes") for r in rows):
        ax.plot([], [], marker="|", color="black", ls="none", markersize=12, mew=2.5, label="measured peak")
    if any(r.get("predicted_peak_bytes") for r in rows):
        ax.plot([], [], marker="D", mfc="none", mec="black", ls="none", label="predicted peak")
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=11)
    ax.set_xlim(0, xmax * 1.45)
    ax.set_xlabel(f"{unit} per training step (grad-to-input = backbone activations / peak)", fontsize=10)
    first = rows[0] if rows else {}
    where = first.get("device") if first.get("device") != "meta" else f"predicted for {first.get('target')}"
    ax.set_title(f"Where the memory goes: {first.get('model')} {first.get('task')}, batch {first.get('batch')} x "
                 f"seq {first.get('seq')}, {where}", fontsize=12)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.5 / max(len(rows), 1)), ncol=3, fontsize=9,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
