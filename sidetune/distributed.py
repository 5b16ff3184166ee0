"""What the training loop needs to stay correct on more than one process and on a GPU, kept out of the loop itself:
the gradient norm as one plain number under FSDP2, the agreement that stops every process when one runs out of
memory, and the peak-memory reset before the training steps.

Each helper is tested on the CPU (2 gloo processes, or the device mocked): tests/test_gpu_paths.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import torch
from torch import nn

from sidetune.errors import SidetuneError

# The key under which a process that stops on an error (out of memory) leaves its one-line message in the process
# group's store, for the others to read and stop with.
_FAILED = "sidetune/failed"


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


# ---------------------------------------------------------------------------------------------------------------------
# One process fails (CUDA out of memory): every process stops with its message, none waits for a collective timeout
#
# The failing process cannot simply join the step's remaining collectives (it may have stopped inside DDP's backward,
# halfway through the gradient buckets), and the others would otherwise wait in them for NCCL's timeout (30 minutes).
# So it leaves its message in the store every process of the group already shares (the rendezvous TCPStore) and
# exits. The others learn it in one of two ways: at the step's agreement (`agree`: the guard's finite check and the
# stop-signal vote poll their all-reduce and the store, so a process whose collectives were queued on the GPU, as
# NCCL's are, does not block on them), or when a collective they are in fails because the process left (gloo: the
# connection closes), through `peer_failure`.


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def announce_failure(message: str) -> str:
    """Leave this process's one-line error for the others (a no-op in one process); returns `message`."""
    import torch.distributed as dist

    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):  # the store is gone (the launcher is shutting down): no one to tell
            store.set(_FAILED, f"process {dist.get_rank()}: {message}")
    return message


def announced_failure(wait_s: float = 0.0) -> str | None:
    """The message another process left, waiting up to `wait_s` for one; None without one."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_FAILED]):
                return store.get(_FAILED).decode()
        except Exception:
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def peer_failure(error: BaseException) -> None:
    """Called with an exception raised inside the training loop: when another process announced its failure (a
    collective broke because it left), stop with that message instead (one line); otherwise return, and the caller
    re-raises `error`."""
    if isinstance(error, SidetuneError):
        return
    message = announced_failure(wait_s=2.0)
    if message is not None:
        raise SidetuneError(f"another {message}") from None


def agree(flag: torch.Tensor, poll_s: float = 0.0005) -> torch.Tensor:
    """All-reduce (sum) `flag` over the processes, watching the store while it runs: if another process announced a
    failure, stop with its message rather than wait for a collective it will never join."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    work = dist.all_reduce(flag, op=dist.ReduceOp.SUM, async_op=True)
    next_check = 0.0
    while not work.is_completed():
        now = time.monotonic()
        if now >= next_check:
            message = announced_failure()
            if message is not None:
                raise SidetuneError(f"another {message}")
            next_check = now + 0.1
        time.sleep(poll_s)
    work.wait()
    return flag
