"""Memory: the numbers the trainer logs next to the loss.

On CUDA the measured peak is `torch.cuda.max_memory_allocated` (bytes handed out by PyTorch's caching allocator,
what the model really used) and `max_memory_reserved` (what the allocator holds from the driver, closer to what
nvidia-smi shows). On CPU only the process's peak resident set size is available, which includes Python, the
libraries and the dataset.
"""

from __future__ import annotations

import resource
import sys

import torch

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


def module_roles(module: torch.nn.Module, backbone_ids: set[int], loaded_root: torch.nn.Module) -> dict[int, str]:
    """Role of every module under `module` (the module that trains), keyed by id."""
    head = {id(loaded_root)}
    for name in getattr(loaded_root, "sidetune_head", ()):
        head |= {id(m) for m in loaded_root.get_submodule(name).modules()}
    out_emb = loaded_root.get_output_embeddings() if hasattr(loaded_root, "get_output_embeddings") else None
    if out_emb is not None:
        head |= {id(m) for m in out_emb.modules()}
    roles = {}
    for m in module.modules():
        # A method's module may declare `sidetune_role = "head"` (LST's task head computes logits and loss).
        if id(m) in head or type(m).__name__ == "ChunkedLMLoss" or getattr(m, "sidetune_role", None) == "head":
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

    def _exit(self, module: torch.nn.Module, args, output) -> None:
        self.stack.pop()  # returns None: a forward hook's return value would replace the module's output

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
