"""One profile row: a steady-state training step (or the floor's no-grad forward) built by `session.build` and run
by `session.train_step` under the trackers of `sidetune.memory`, on a real device and/or on fake tensors.

How each number is taken:
- weights / grads / optimizer state: bytes of the distinct storages of the tensors themselves (4-bit weights count
  their packed bytes and quantization state).
- activations: every tensor autograd saves for backward in the profiled step, each storage counted once at its full
  storage size, weights excluded, attributed to the innermost running module: backbone (the gradient-to-input cost),
  method (modules the method created), head (task head, output embedding, loss).
- FLOPs: matmul and attention FLOPs of the forward; backward FLOPs split into dL/dx and dL/dW per role.
- peaks: `tracked_peak_bytes` follows every live storage op by op on the real tensors; on CUDA the measured peak is
  `torch.cuda.max_memory_allocated` (reserved is reported beside it; nvidia-smi shows more: the CUDA context and the
  allocator's cache). `predicted_peak_bytes` is the same tracker on fake tensors (no memory, no GPU).

Each real row runs in its own process (`run_isolated`), so every CUDA peak is clean.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sidetune.profiling.rows import Row, RowSpec


def _random_batch(config, task, batch: int, seq: int, device, num_labels: int | None) -> dict:
    import torch

    ids = torch.randint(3, min(config.vocab_size, 32000), (batch, seq), device=device)
    # No attention_mask: nothing is padded. transformers skips building the mask for an all-ones mask on real tensors
    # but not on fake ones (it reads them as tracing), so passing none keeps the prediction on the real path.
    out = {"input_ids": ids}
    if task.pairs:  # `batch` preference pairs: 2 x batch rows (chosen, then rejected), one forward
        ids = torch.randint(3, min(config.vocab_size, 32000), (2 * batch, seq), device=device)
        return {"input_ids": ids, "labels": ids.clone(), "pair_index": torch.arange(batch, device=device)}
    if task.classifies:
        out["labels"] = torch.randint(0, num_labels or 2, (batch,), device=device)
    else:
        out["labels"] = ids.clone()  # every token labelled, as the chunked loss's masks assume on fake tensors
    return out


def _autocast(module, mp: str, device_type: str, target: str | None = None):
    """What `Accelerator.prepare` does to a module in mixed precision: autocast around its forward, outputs
    converted to fp32 (for a causal LM without the chunked loss that is a B x T x V fp32 copy of the logits). The
    prediction runs on fake tensors outside an Accelerator, so it applies the same two wrappers itself. A prediction
    for CUDA whose fake tensors stand on the CPU (`sim_device`) runs CPU autocast under CUDA's float32 policy
    (`cuda_autocast_policy`): the ops CUDA autocast runs in float32 (LayerNorm, softmax, pow, ...) stay bf16 under the
    CPU's, and their saved activations would be under-predicted."""
    import torch

    emulate = target == "cuda" and device_type == "cpu"
    if mp == "no" and not emulate:
        return module
    dtype = torch.bfloat16 if mp == "bf16" else torch.float16

    def forward(**batch):
        with torch.autocast(device_type, dtype=dtype, enabled=mp != "no"), \
                (cuda_autocast_policy() if emulate else contextlib.nullcontext()):
            return module(**batch)

    if mp == "no":
        return forward
    from accelerate.utils import convert_outputs_to_fp32

    return convert_outputs_to_fp32(forward)


# The ops CUDA autocast runs in float32 (torch's "Automatic Mixed Precision" reference, "CUDA Ops that can autocast
# to float32"), by the name torch's Python API gives each (functions, Tensor methods and operators).
CUDA_FP32_OPS = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss"})


def _cuda_autocast_mode():
    from torch.overrides import TorchFunctionMode

    class Policy(TorchFunctionMode):
        """Under CPU autocast, run CUDA autocast's float32 ops as CUDA does: their 16-bit floating inputs cast to
        float32 (so their outputs, and what autograd saves of them, are float32). Everything else is left to CPU
        autocast, whose lower-precision list (linear, matmul, bmm, SDPA, ...) matches CUDA's for what a transformer
        runs."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            import torch
            from torch.utils._pytree import tree_map

            kwargs = kwargs or {}
            name = getattr(func, "__name__", None)
            if name == "scaled_dot_product_attention" and args[0].shape[-1] % 8 and (
                    args[0].dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")):
                # CUDA's flash, memory-efficient and cuDNN kernels need a head dim that is a multiple of 8; below it
                # SDPA runs the math kernel, which holds the B x heads x T x T scores (LST side blocks at a large
                # method.r). The CPU's flash kernel takes any head dim: predict the kernel CUDA will run.
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.MATH):
                    return func(*args, **kwargs)
            if name in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
                def up(x):
                    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
                        return x.float()
                    return x
                args, kwargs = tree_map(up, args), tree_map(up, kwargs)
            return func(*args, **kwargs)

    return Policy


def cuda_autocast_policy():
    """A context in which CPU autocast follows CUDA autocast's float32 policy, and attention CUDA's kernel choice (see
    `_cuda_autocast_mode`)."""
    return _cuda_autocast_mode()()


def sim_device(target: str):
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
    from sidetune.models import resolve_dtype
    from sidetune.session import build, forward_module, mixed_precision, train_step

    cfg = copy.deepcopy(cfg)
    device = sim_device(target) if fake else torch.device(target)
    # Resolve "auto" dtypes for the target, not for the device the fake tensors stand on.
    cfg.model.dtype = str(resolve_dtype(cfg.model.dtype, target)).removeprefix("torch.")
    cfg.model.compute_dtype = str(resolve_dtype(cfg.model.compute_dtype, target, torch.bfloat16)).removeprefix("torch.")
    mp = mixed_precision(cfg.train, target, cfg.model.dtype) or "no"
    if not train:
        cfg.train.gradient_checkpointing = False  # the floor is a plain forward
        cfg.train.objective = "supervised"  # ... of every row of the batch (a preference floor: the 2B rows)
    out: dict[str, Any] = {"dtype": cfg.model.dtype, "mixed_precision": mp}

    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
            stack.enter_context(mem.AllTrueMasks())
            stack.enter_context(mem.fake_as_data())
        # The floor builds the bare model (every weight then frozen); a method row builds exactly what `train` does.
        init = InitWatch(device, fake)
        s = build(cfg, device, with_data=False, with_optimizer=train and apply is None, fake=fake,
                  apply=(lambda m: m) if not train else apply, watch_apply=init)
        if train:
            out["init_peak_bytes"] = init.peak
            if not fake:
                out["init_s"] = init.seconds
        trained = s.model
        if train:
            module, optimizer = s.module, s.optimizer
            if optimizer is None:  # a replaced apply (PEFT): the same optimizer construction, no method groups
                from sidetune.session import make_optimizer

                optimizer = make_optimizer(trained, None, cfg.train, torch.device(target))
        else:
            trained.requires_grad_(False)
            module, optimizer = forward_module(trained, cfg), None
        roles = mem.module_roles(module, s.base_modules, s.base, s.method.head_modules(trained) if apply is None
                                 else [])
        batch = _random_batch(s.base.config, s.task, cfg.train.batch_size, cfg.data.max_length, device,
                              cfg.data.num_labels)
        if not train:
            batch.pop("pair_index", None)
        elif s.preference is not None and s.preference.needs_table:
            # Precomputed reference log-probs: a lookup of B x 2 numbers (their one pass happens before training).
            s.preference.table = torch.zeros(cfg.train.batch_size, 2, device=device)
        forward = _autocast(module, mp, device.type, target)
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

            @contextlib.contextmanager
            def phase(name):
                tracker.phase = name
                tracker.flops_from = saved
                with saved if (saved is not None and name == "forward") else contextlib.nullcontext():
                    yield
                if name == "backward" and saved is not None:
                    out["grads_bytes"] = mem.storage_bytes(mem.grad_tensors(trained))

            if train:
                train_step(forward, batch, optimizer, trainable, cfg.train.max_grad_norm, phase=phase)
            else:
                with phase("forward"), torch.no_grad():
                    forward(**batch)
            tracker.flops_from = None
            tracker.phase = "setup"
            if cuda:
                torch.cuda.synchronize()
            if times is not None:
                times.append(time.perf_counter() - start)

        baseline = tracker.live_bytes()  # weights and batch: allocated before, alive throughout
        allocator = mem.CPUAllocatorPeak() if device.type == "cpu" and not fake else contextlib.nullcontext()
        saved = mem.SavedTensorTracker(module, roles)
        # A fake step on the CPU for a CUDA target: what a CUDA step would move to host memory is marked so.
        stand_in = mem.simulating(target) if fake and device.type != target else contextlib.nullcontext()
        with allocator, tracker, stand_in:
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
            block_bytes=max((mem.storage_bytes(mem.weight_tensors(b)) for b in _blocks(s.base)), default=0),
            grads_bytes=out.get("grads_bytes", 0),
            optimizer_bytes=mem.storage_bytes(mem.optimizer_state_tensors(optimizer)) if optimizer else 0,
            **{f"act_{r}_bytes": acts[r] for r in mem.ROLES}, act_total_bytes=sum(acts.values()),
            fwd_flops=tracker.fwd_flops,
            **{f"bwd_{k}_flops_{r}": tracker.bwd_flops[(r, k)] for k in ("dx", "dw") for r in mem.ROLES},
            bwd_dx_flops=sum(tracker.bwd_flops[(r, "dx")] for r in mem.ROLES),
            bwd_dw_flops=sum(tracker.bwd_flops[(r, "dw")] for r in mem.ROLES),
            recompute_flops=tracker.recompute_flops,
            peak_bytes=tracker.peak, peak_phase=tracker.peak_phase, peak_breakdown=tracker.peak_breakdown,
            host_bytes=tracker.host_peak,
            optimizer=cfg.train.optimizer if train else None,
        )
        if times:
            out["step_time_s"] = statistics.median(times)
            out["tokens_per_s"] = cfg.train.batch_size * cfg.data.max_length / out["step_time_s"]
        if cuda:
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


class InitWatch:
    """Around `Method.apply`: its one-time cost (PiSSA's SVD, OLoRA's QR, LoftQ's alternating fit, LoRA-GA's
    calibration gradients; for other methods, creating the trainable parts). `peak`: the most bytes it allocated
    that were live at once (what it adds to the build's peak), from the CPU allocator or CUDA's peak counter on a
    real device, from the live-storage tracker on fake tensors (a prediction); `seconds`: its wall time."""

    def __init__(self, device, fake: bool) -> None:
        self.device, self.fake = device, fake
        self.peak, self.seconds = 0, 0.0
        self._model = None

    def __call__(self, model) -> InitWatch:
        self._model = model  # its weights exist before: a view or detached alias of one allocates nothing
        return self

    def __enter__(self) -> InitWatch:
        import torch

        from sidetune import memory as mem

        self._inner = None
        if self.fake:
            self._inner = mem.LiveTracker()
            self._inner.track(mem.weight_tensors(self._model) if self._model is not None else [], "weights")
            self._baseline = self._inner.live_bytes()
        elif self.device.type == "cpu":
            self._inner = mem.CPUAllocatorPeak()
        elif self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        if self._inner is not None:
            self._inner.__enter__()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda" and not self.fake:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        self.seconds = time.perf_counter() - self._t
        if self._inner is not None:
            self._inner.__exit__(*exc)
            self.peak = self._inner.peak - (self._baseline if self.fake else 0)


def _blocks(model) -> list:
    """The transformer blocks of a model: the longest ModuleList (what FSDP wraps one unit each)."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def profile_row(spec: RowSpec, device: str, target: str, steps: int) -> dict[str, Any]:
    """Everything profile.json says about one row (`Row` documents the fields)."""
    from sidetune.config import load_config

    cfg = load_config(None, spec.overrides)
    train = spec.method is not None
    row: dict[str, Any] = {
        "label": spec.label, "method": spec.method, "model": cfg.model.name, "task": cfg.data.task,
        "batch": cfg.train.batch_size, "seq": cfg.data.max_length, "device": device, "target": target,
        "quantize": cfg.model.quantize, "loss_chunk_size": cfg.train.loss_chunk_size,
        "objective": cfg.train.objective if train else None,
        "reference": _reference(cfg) if train and cfg.train.objective == "dpo" else None,
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
        return Row.from_dict(row).to_dict()
    row.update({k: v for k, v in source.items() if k not in ("peak_bytes", "peak_phase", "peak_breakdown",
                                                             "init_peak_bytes")})
    if real is not None and "init_peak_bytes" in real:
        row.update(init_peak_bytes=real["init_peak_bytes"], init_s=real["init_s"])
    if pred is not None and "init_peak_bytes" in pred:
        row["predicted_init_peak_bytes"] = pred["init_peak_bytes"]
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
                   predicted_on="fake tensors on " + str(sim_device(target)) + f" for {target}")
        if row.get("measured_peak_bytes"):
            row["prediction_error"] = pred["peak_bytes"] / row["measured_peak_bytes"] - 1
    return Row.from_dict(row).to_dict()


def _reference(cfg) -> str:
    from sidetune.methods import build_method

    return build_method(cfg.method).reference(bool(cfg.model.init_from))


def run_isolated(spec: RowSpec, device: str, target: str, steps: int) -> dict[str, Any]:
    """`profile_row` in a fresh Python process, so that the row's peak is its own."""
    import sidetune

    root = str(Path(sidetune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="sidetune-profile-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        spec_path.write_text(json.dumps({"spec": spec.__dict__, "device": device, "target": target, "steps": steps}))
        proc = subprocess.run([sys.executable, "-m", "sidetune.profiling.measure", str(spec_path), str(out_path)],
                              env=env, capture_output=True, text=True)
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


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
