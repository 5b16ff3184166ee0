"""What the training loop needs to stay correct on more than one process and on a GPU, kept out of the loop itself:
the gradient norm as one plain number under FSDP2, the agreement that stops every process when one runs out of
memory, and the peak-memory reset before the training steps.

Each helper is tested on the CPU (2 gloo processes, or the device mocked): tests/test_gpu_paths.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor made whole on this process (`full_tensor`: a collective, every process must call it), else `t`.

    FSDP2 shards every parameter, so a norm computed from its gradients is a DTensor with a pending (Partial)
    reduction. Mixed with plain tensors, or handed to `accelerator.reduce` (c10d has no sharding rule for
    allreduce_), it fails; made whole first it is the true global norm on every process."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(accelerator, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Unscale (fp16) once, clip the trainable parameters' gradients to `max_norm`, return the total norm as a plain
    tensor.

    Not `accelerator.clip_grad_norm_`: under FSDP with a parameter list that is not the whole model's (sidetune hands
    it the trainable set) it unscales, finds no matching model, falls through and unscales again, which the fp16
    GradScaler refuses ("unscale_() has already been called"); and it returns FSDP2's norm as a DTensor."""
    params = [p for p in params if p.grad is not None]
    accelerator.unscale_gradients()  # a no-op unless fp16 with a scaler
    if not params:
        return torch.zeros((), device=accelerator.device)
    from torch.distributed.tensor import DTensor

    if len({type(p.grad) is DTensor for p in params}) > 1 or _meshes(params) > 1:
        # Sharded and plain gradients (or two meshes) cannot be stacked into one norm: each group's norm is made
        # whole, then combined; clipping uses the combined norm.
        groups: dict[object, list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        norms = [local_tensor(torch.nn.utils.get_total_norm([p.grad for p in g])) for g in groups.values()]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        for mesh, g in groups.items():
            norm = total if mesh is None else DTensor.from_local(total, mesh)
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, norm)
        return total
    return local_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))


def total_grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """The gradients' total norm without clipping (train.max_grad_norm=0), as a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return local_tensor(torch.nn.utils.get_total_norm(grads))


def _meshes(params: list[nn.Parameter]) -> int:
    from torch.distributed.tensor import DTensor

    return len({id(p.grad.device_mesh) for p in params if isinstance(p.grad, DTensor)})


class ShardsLikeInner:
    """A mixin for the modules that wrap a transformers model (LST, soft prompts, prefixes, PET, the chunked LM
    loss): what FSDP2's auto-wrap reads from the module handed to `accelerator.prepare`, forwarded to the model inside
    (`_inner()`).

    accelerate builds its transformer wrap policy from `_no_split_modules` (without it, no decoder layer gets a group
    of its own and the whole backbone is one unsharded root group), and puts the input and output embeddings in one
    group when `get_input_embeddings().weight is get_output_embeddings().weight` (without the input side it would
    split a tied embedding across two groups: an error on torch >= 2.13, a silent duplicate before)."""

    def _inner(self) -> nn.Module:
        raise NotImplementedError

    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self._inner(), "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module | None:
        return self._inner().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self._inner().get_output_embeddings()
