"""Memory accounting, measurement and prediction.

- `peak_memory`: the numbers the trainer logs next to the loss. On CUDA the measured peak is
  `torch.cuda.max_memory_allocated` (bytes handed out by PyTorch's caching allocator, what the model really used) and
  `max_memory_reserved` (what the allocator holds from the driver, closer to what nvidia-smi shows). On CPU only the
  process's peak resident set size is available, which includes Python, the libraries and the dataset.
- `SavedTensorTracker` + `module_roles`: bytes saved for backward, by role (backbone / method / head).
- `weight_tensors`, `storage_bytes`, ...: bytes of weights, grads and optimizer state, from the tensors.
- `LiveTracker`: the live storages op by op, their peak, and the backward FLOPs split into dL/dx and dL/dW.
- `CPUAllocatorPeak`: the CPU allocator's own peak, the independent measurement on CPU.
- `AllTrueMasks`, `fake_as_data` (and `models.fake_quantize_linears`): what it takes to run the same step on fake
  tensors.
`sidetune.profile` puts them together.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from sidetune.losses import ChunkedLMLoss
from sidetune.preference import PreferenceModule

GiB = 1024**3


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far, in GiB, under names that say what was measured."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return {"peak_rss_gib": rss / (GiB if sys.platform == "darwin" else 1024**2)}


class TrainingPeak:
    """The peak the trainer logs, covering the training steps only: on CUDA the allocator's peak is reset when the
    steps start (`start`: after the model was built, loaded and sharded, where a 4-bit load passes through larger
    transients), set aside before an evaluation (`pause`) and reset after it (`resume`), so that a row's peak is the
    largest of the training steps so far, not of the build or of an eval. On the CPU the process's peak RSS cannot be
    reset: it covers the whole process, as the key peak_rss_gib says."""


    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.allocated = self.reserved = 0

    @property
    def covers(self) -> str:
        if self.cuda:
            return "the training steps (reset after the build; evaluations left out)"
        return "the whole process (peak RSS cannot be reset)"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def pause(self) -> None:
        if self.cuda:
            self.allocated = max(self.allocated, torch.cuda.max_memory_allocated(self.device))
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))

    def resume(self) -> None:
        self.start()

    def row(self) -> dict[str, float]:
        """The logged numbers, in GiB (peak_memory's keys)."""
        stats = peak_memory(self.device)
        if self.cuda:
            stats["peak_allocated_gib"] = max(stats["peak_allocated_gib"], self.allocated / GiB)
            stats["peak_reserved_gib"] = max(stats["peak_reserved_gib"], self.reserved / GiB)
        return stats


def short(stats: dict[str, float]) -> str:
    """The one number for a progress bar."""
    key = "peak_allocated_gib" if "peak_allocated_gib" in stats else "peak_rss_gib"
    return f"{stats[key]:.2f}G"


# ---------------------------------------------------------------------------------------------------------------------
# Activations saved for backward, attributed to backbone / method / head
#
# Roles are structural, not by trainability (full fine-tuning trains the backbone, and it is still the backbone):
# - "backbone": a module of the pretrained model as loaded, before the method touched it;
# - "method":   a module the method created (LoRA's A/B and its wrapper, adapters, prefix encoders, LST's side
#               network and ladders, a method's own top-level module);
# - "head":     the task head and output embedding, the chunked-loss wrapper, and the loaded model's top-level module
#               itself, whose own ops are pooling, logits and the loss.
# A saved tensor belongs to the innermost module running when autograd saved it. Parameters saved for backward (a
# frozen weight kept for dL/dx) are weights, counted once as weights, never as activations.

ROLES = ("backbone", "method", "head")


def snapshot_modules(model: torch.nn.Module) -> set[int]:
    """Ids of the modules of a freshly loaded model: call before `method.apply`, pass to `module_roles`."""
    return {id(m) for m in model.modules()}


def module_roles(module: torch.nn.Module, backbone_ids: set[int], loaded_root: torch.nn.Module,
                 head_modules: list[torch.nn.Module] = ()) -> dict[int, str]:
    """Role of every module under `module` (the module that trains), keyed by id. `head_modules` are the method's
    own modules that compute logits and loss (`Method.head_modules`: LST's task head)."""
    head = {id(loaded_root)}
    for m in head_modules:
        head |= {id(x) for x in m.modules()}
    for name in getattr(loaded_root, "sidetune_head", ()):
        head |= {id(m) for m in loaded_root.get_submodule(name).modules()}
    out_emb = loaded_root.get_output_embeddings() if hasattr(loaded_root, "get_output_embeddings") else None
    if out_emb is not None:
        head |= {id(m) for m in out_emb.modules()}
    roles = {}
    for m in module.modules():
        # The chunked LM loss and a preference objective (log-probs from the logits) are the loss: "head".
        if id(m) in head or isinstance(m, (ChunkedLMLoss, PreferenceModule)):
            roles[id(m)] = "head"
        else:
            roles[id(m)] = "backbone" if id(m) in backbone_ids else "method"
    return roles


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it); works for real, meta and fake tensors."""
    return t.untyped_storage()._cdata


class SavedTensorTracker:
    """Context manager recording every tensor autograd saves during a forward, with the role of the module that ran.

    `by_role()` sums bytes per role, each storage counted once (views and re-saves of one storage are one cost).
    """

    def __init__(self, module: torch.nn.Module, roles: dict[int, str]) -> None:
        self.module, self.roles = module, roles
        self.stack: list[torch.nn.Module] = []
        self.grad_modes: list[bool] = []  # grad mode at each running module's entry
        self.records: list[tuple[str, str, int, tuple[int, ...], torch.dtype]] = []  # role, module, storage, shape, dtype
        self.nbytes: dict[int, int] = {}
        self.names = {id(m): n or "<root>" for n, m in module.named_modules()}
        self.weights = {storage_key(p) for p in module.parameters()} | {storage_key(b) for b in module.buffers()}

    def _role(self) -> tuple[str, str]:
        for m in reversed(self.stack):
            role = self.roles.get(id(m))
            if role is not None:
                return role, self.names.get(id(m), type(m).__name__)
        return "head", "<outside>"

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self.weights and key not in self.nbytes:
            role, name = self._role()
            self.nbytes[key] = t.untyped_storage().nbytes()
            self.records.append((role, name, key, tuple(t.shape), t.dtype))
        return t

    def _enter(self, module: torch.nn.Module, args) -> None:
        self.stack.append(module)
        self.grad_modes.append(torch.is_grad_enabled())

    def _exit(self, module: torch.nn.Module, args, output) -> None:
        self.stack.pop()  # returns None: a forward hook's return value would replace the module's output
        self.grad_modes.pop()

    def __enter__(self) -> SavedTensorTracker:
        self.handles = []
        for m in self.module.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._exit, always_call=True))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def by_role(self) -> dict[str, int]:
        totals = dict.fromkeys(ROLES, 0)
        for role, _, key, _, _ in self.records:
            totals[role] += self.nbytes[key]
        return totals

    def by_module(self, role: str | None = None) -> dict[str, int]:
        totals: dict[str, int] = {}
        for r, name, key, _, _ in self.records:
            if role is None or r == role:
                totals[name] = totals.get(name, 0) + self.nbytes[key]
        return totals


# ---------------------------------------------------------------------------------------------------------------------
# Bytes read from the tensors themselves: weights (with 4-bit quantization state), gradients, optimizer state


def quant_state_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit weight's quantization state (absmax, code, offset, nested state): they are
    weights too, but no `parameters()` or `buffers()` lists them."""
    out, qs = [], getattr(p, "quant_state", None)
    while qs is not None:
        out += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
                if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out


def weight_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and quantization state: everything the model holds before a step starts."""
    params = list(module.parameters())
    return [*params, *module.buffers(), *(t for p in params for t in quant_state_tensors(p))]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen.setdefault(storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def grad_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------------------------------------------------------
# The allocation timeline: live storages op by op (real, meta or fake tensors alike)
#
# Adding up weights + grads + optimizer state + saved activations misses the real peak by -27%..+20% (DESIGN.md):
# weights saved for backward are counted twice, transients (the no-grad forward's largest intermediate, a loss chunk's
# logits, a 4-bit layer's dequantized weight) are missed, and optimizer state only exists from the first step on. So
# the tracker follows every storage from the op that creates it to the moment it is freed, as
# torch.distributed._tools.mem_tracker.MemTracker does. Unlike MemTracker it registers gradient hooks only on
# parameters that require grad (MemTracker hooks every parameter and fails on a frozen backbone in torch 2.13), and it
# is driven by explicit phases set by the caller's training step rather than by module hooks.

CATEGORIES = ("weights", "inputs", "activations", "grads", "temporaries", "optimizer", "other")
PHASE_CATEGORY = {"setup": "other", "forward": "activations", "backward": "temporaries", "optimizer": "optimizer"}
CUDA_BLOCK = 512  # the CUDA caching allocator hands out multiples of 512 bytes


def _dequantized_weight_bytes(args, kwargs) -> int:
    """bitsandbytes' gemm_4bit dequantizes the whole weight into the input's dtype before its matmul (the CPU kernel
    and the CUDA fallback for more than a few hundred rows both do): a weight-sized transient the op never returns."""
    a, shape = args[0], args[2]
    if a.device.type == "cuda" and a.numel() // a.shape[-1] <= 256:
        return 0  # CUDA runs a fused kernel on at most a few hundred rows: no dequantized copy
    blocks = -(-shape[0] * shape[1] // args[4])
    nested = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None) is not None
    return shape[0] * shape[1] * a.element_size() + (4 * blocks if nested else 0)


# Ops whose kernels allocate scratch memory the dispatcher never sees: name -> bytes of the scratch.
OP_SCRATCH = {"bitsandbytes::gemm_4bit": _dequantized_weight_bytes}

_MATMULS = {"aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2), "aten::baddbmm": (1, 2)}


class _Storage:
    __slots__ = ("category", "nbytes", "ref", "weightlike")


# Host offload (LST's ladder_offload): tensors a step keeps in host memory instead of on the device. The code that
# offloads makes its host copies inside `host_memory()`; every LiveTracker running then files the storages made
# there as host bytes, outside the device's count. A prediction for a CUDA step runs on fake tensors on the CPU,
# where nothing can move: `simulating("cuda")` says so, and the offloading code makes a copy there instead.
_SIMULATED: list[str] = []
_HOST: list[bool] = []


@contextlib.contextmanager
def simulating(target: str):
    """Inside: the step runs on stand-in tensors for a `target` step (a fake CUDA step on the CPU)."""
    _SIMULATED.append(target)
    try:
        yield
    finally:
        _SIMULATED.pop()


def simulated_target() -> str | None:
    return _SIMULATED[-1] if _SIMULATED else None


@contextlib.contextmanager
def host_memory():
    """Inside: the tensors made are host memory, not the step's device memory (a tracker counts them apart)."""
    _HOST.append(True)
    try:
        yield
    finally:
        _HOST.pop()


class LiveTracker(TorchDispatchMode):
    """Follow the live tensor storages through forward, backward and optimizer steps; record the peak.

    `track(tensors, category)` registers storages that exist before the mode is entered (weights, the batch); every op
    output made inside is registered with the category of the current `phase` ("forward" -> activations, "backward"
    -> temporaries, "optimizer" -> optimizer state); gradients are re-labelled "grads" when autograd accumulates them.
    A storage leaves the count when Python frees it (a weak reference per storage). With `block` = 512 every storage
    is rounded up as the CUDA caching allocator rounds it.

    In the forward it also splits the backward FLOPs that autograd will spend: every matmul whose operand requires
    grad costs as many FLOPs again in backward for that operand, dL/dW when the operand is a weight (a parameter or
    a cast / view / dequantization of one) and dL/dx otherwise, filed under the role of the module running it as
    the SavedTensorTracker in `flops_from` sees it (set it for the one step whose FLOPs you want). Weights are
    the storages registered with `track_model`.
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        # While set (the profiled step's forward and backward), FLOPs are counted and filed under the roles of the
        # modules this SavedTensorTracker sees running.
        self.flops_from: SavedTensorTracker | None = None
        self._storages = WeakIdKeyDictionary()
        self.phase = "setup"
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = 0
        self.peak_phase = "setup"
        self.peak_breakdown = dict(self.current)
        self.timeline: list[tuple[str, int]] = []  # (phase, live bytes) after each op that allocated
        self.fwd_flops = 0
        self.bwd_flops = {(r, k): 0 for r in ROLES for k in ("dx", "dw")}
        self.recompute_flops = 0  # forward FLOPs run again in backward (activation checkpointing)
        self.host = self.host_peak = 0  # bytes made in `host_memory()` and alive, outside the device's count
        self._hooks: list = []

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def _nbytes(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        return -(-n // self.block) * self.block if n else 0

    def _add(self, t: torch.Tensor, category: str, weightlike: bool = False) -> _Storage | None:
        st = t.untyped_storage()
        rec = self._storages.get(st)
        if rec is not None:
            return rec
        rec = _Storage()
        rec.category, rec.nbytes, rec.weightlike = category, self._nbytes(st), weightlike
        rec.ref = weakref.ref(st, lambda _, rec=rec: self._free(rec))
        self._storages[st] = rec
        if category == "host":
            self.host += rec.nbytes
            self.host_peak = max(self.host_peak, self.host)
            return rec
        self.current[category] += rec.nbytes
        self.total += rec.nbytes
        return rec

    def _free(self, rec: _Storage) -> None:
        if rec.category == "host":
            self.host -= rec.nbytes
            return
        self.current[rec.category] -= rec.nbytes
        self.total -= rec.nbytes

    def _relabel(self, t: torch.Tensor, category: str) -> None:
        rec = self._storages.get(t.untyped_storage())
        if rec is not None and rec.category not in (category, "host"):
            self.current[rec.category] -= rec.nbytes
            self.current[category] += rec.nbytes
            rec.category = category

    def _check_peak(self, extra: int = 0) -> None:
        if self.total + extra > self.peak:
            self.peak = self.total + extra
            self.peak_phase = self.phase
            self.peak_breakdown = dict(self.current)
            if extra:
                self.peak_breakdown["temporaries"] += extra

    def track(self, tensors, category: str, weightlike: bool = False) -> None:
        """Register storages that already exist (weights, the batch)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t, category, weightlike)
        self._check_peak()

    def track_model(self, model: torch.nn.Module) -> None:
        """Register the model's weights, and relabel each trainable parameter's gradient as "grads" when autograd
        accumulates it (hooks only on parameters that require grad)."""
        self.track(weight_tensors(model), "weights", weightlike=True)
        for p in model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda p: self._relabel(p.grad, "grads")))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def live_bytes(self) -> int:
        return self.total

    # -- dispatch ------------------------------------------------------------------------------------------------
    def _weightlike(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        rec = self._storages.get(t.untyped_storage())
        return rec is not None and rec.weightlike

    def _grad_on(self) -> bool:
        # Inside a custom autograd Function's forward (bitsandbytes' MatMul4Bit) grad mode is off even though autograd
        # will differentiate it; the grad mode at the entry of the innermost running module says what the caller did.
        modes = self.flops_from.grad_modes if self.flops_from is not None else []
        return torch.is_grad_enabled() or bool(modes and modes[-1])

    def _count_flops(self, func, args, kwargs, out) -> None:
        name = func._schema.name
        operands = None
        if name in _MATMULS:
            from torch.utils.flop_counter import flop_registry

            flops = flop_registry[func._overloadpacket](*args, out_val=out, **kwargs)
            operands = [args[i] for i in _MATMULS[name]]
            per_operand = [flops] * 2
        elif name == "bitsandbytes::gemm_4bit":
            a, shape = args[0], args[2]
            flops = 2 * (a.numel() // a.shape[-1]) * shape[0] * shape[1]
            operands, per_operand = [a], [flops]
        elif "scaled_dot_product" in name and "backward" not in name:
            from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

            q, k, v = args[:3]
            # Grouped-query attention (enable_gqa, which CUDA's flash / efficient kernels take as is) hands k and v
            # with fewer heads than q; each query head still attends over the full sequence, so count k and v at
            # q's head count (torch's formulas assert equal heads: seen on an H200 with torch 2.11).
            k_shape, v_shape = ((*t.shape[:-3], q.shape[-3], *t.shape[-2:]) for t in (k, v))
            flops = sdpa_flop_count(q.shape, k_shape, v_shape)
            grad_out = (*q.shape[:-1], v.shape[-1])
            # Flash / memory-efficient backward recomputes the scores and returns dq, dk, dv together.
            bwd = sdpa_backward_flop_count(grad_out, q.shape, k_shape, v_shape)
            operands, per_operand = [q], [bwd if any(t.requires_grad for t in (q, k, v)) else 0]
        if operands is None:
            return
        if self.phase == "backward":
            self.recompute_flops += flops
            return
        self.fwd_flops += flops
        if not self._grad_on():
            return
        role = self.flops_from._role()[0]
        for t, f in zip(operands, per_operand):
            if f and isinstance(t, torch.Tensor) and t.requires_grad:
                weight = self._weightlike(t)
                # Grad mode off inside a module that runs with it on: either a custom autograd Function's forward
                # (bitsandbytes' MatMul4Bit, differentiated for its input: dL/dx) or a no_grad block on weights
                # (DoRA's detached norm, B A: never differentiated). Its forward FLOPs count either way.
                if weight and not torch.is_grad_enabled():
                    continue
                self.bwd_flops[(role, "dw" if weight else "dx")] += f

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.flops_from is not None:
            self._count_flops(func, args, kwargs, out)

        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outs:
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            # A cast, view or dequantization of weights only is itself a weight (autocast's bf16 copy of a LoRA
            # matrix, a transposed or dequantized 4-bit weight): its gradient is dL/dW.
            weightlike = self.phase == "forward" and bool(ins) and all(self._weightlike(t) for t in ins)
            before = self.total
            category = "host" if _HOST else PHASE_CATEGORY[self.phase]
            for t in outs:
                self._add(t, category, weightlike)
            scratch = OP_SCRATCH.get(func._schema.name)
            self._check_peak(scratch(args, kwargs) if scratch else 0)
            if self.total != before:
                self.timeline.append((self.phase, self.total))
        return out


class CPUAllocatorPeak:
    """The CPU allocator's own peak: bytes allocated inside the context and still live, at their maximum.

    An independent measurement of a CPU step (it sees what no dispatch mode sees: scratch buffers inside kernels,
    bitsandbytes' dequantized weights). torch's profiler with profile_memory reports every c10 CPU allocation with
    the running total of the allocations it has seen; add whatever was allocated before (weights, the batch).
    """

    def __enter__(self) -> CPUAllocatorPeak:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from torch._C._profiler import _EventType

        self._prof.__exit__(*exc)
        events, stack = [], list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
            stack.extend(e.children)
        events.sort()
        # The running total is process-wide and keeps blocks a previous profiling session saw allocated but not
        # freed; measure from where this session started.
        start = events[0][2] - events[0][1] if events else 0
        self.peak = max((total for _, _, total in events), default=start) - start


# ---------------------------------------------------------------------------------------------------------------------
# Prediction: the same step on fake tensors (shapes, dtypes and storages, no memory)


class AllTrueMasks(TorchDispatchMode):
    """Answers the data-dependent questions fake tensors cannot: `if mask.all()`, a boolean mask's `nonzero`, indexing
    with a boolean mask. The profile's batches pad nothing and label every token, so every mask there is all-true, and
    this mode answers as such (push it above a FakeTensorMode; real tensors never reach it)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::_local_scalar_dense":
            t = args[0]
            if t.dtype == torch.bool:
                return True
            if t.is_floating_point():
                return 1.0  # a counter read on the host (Adam's step count); no shape depends on it
            raise NotImplementedError("a fake-tensor prediction met .item() on an integer tensor: the step reads a "
                                      "value that only real data has")
        if name == "aten::nonzero":
            m = args[0]
            return torch.empty((m.numel(), m.dim()), dtype=torch.long, device=m.device)
        if name in _INDEX_OPS and any(_is_mask(i) for i in args[1]):
            indices = []
            for i in args[1]:
                # An all-true mask of k dims selects every element: k long index tensors of mask.numel() entries.
                indices += [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim() if _is_mask(i) else [i]
            return func(args[0], indices, *args[2:], **kwargs)
        return func(*args, **kwargs)


_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})


@contextlib.contextmanager
def fake_as_data():
    """Make transformers treat fake tensors as data, not as a trace. It skips its data-dependent shortcuts on fake
    tensors (no causal mask for an unpadded batch, no packed-sequence mask), so a prediction would build masks the
    real step never builds; with AllTrueMasks answering the reads, the fake step takes the real step's path."""
    from transformers.utils import import_utils

    original = import_utils.is_fake_tensor
    import_utils.is_fake_tensor = lambda x: False
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def param_count(module: torch.nn.Module, trainable: bool = False) -> int:
    """Parameters as the model defines them: a 4-bit weight counts its logical N x K, not its packed bytes."""
    n = 0
    for p in module.parameters():
        if trainable and not p.requires_grad:
            continue
        qs = getattr(p, "quant_state", None)
        n += math.prod(qs.shape) if qs is not None and qs.shape is not None else p.numel()
    return n
