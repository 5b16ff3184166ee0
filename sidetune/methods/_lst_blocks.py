"""LST's side network: the transformer blocks of width d/r it is made of, following the backbone stacks that
`sidetune.anatomy` reads from the model's own config and modules (blocks, the norm kind and eps, pre- or post-norm,
Gemma's extra "sandwich" norms, q/k/v/o or a fused qkv with its row layout, grouped-query heads, q/k norms (Qwen3,
Gemma3), gated, fused gate+up or plain MLPs with the config's activation, parallel attention + MLP (GPT-NeoX,
Falcon, Phi) and RoPE from the model's rotary embedding (partial rotary: only the first dims of each head rotate)).
The side network mirrors what makes it a sound small transformer and what pruned init needs; it ignores what only
matters inside the backbone (attention soft-capping, sliding windows, ALiBi, learned positions and embedding
scaling: the ladders carry those signals in). Nothing here changes the backbone, so step 0 is the frozen model
whatever the side looks like.

The side modules themselves (ladders, gates, blocks, their KV cache) live in `sidetune/portable/side_network.py`,
which imports nothing of sidetune: `sidetune export --hf` ships it, so an exported run computes with the same code.

When a block's modules cannot be mapped to these roles (names that do not say q/k/v, an unusual count of norms), the
shape falls back to a plain pre-norm block from the config and `Stack.unmapped` says why: LST then starts the side
network from random init instead of pruned weights.
"""

from __future__ import annotations

import torch
from torch import nn

from sidetune.anatomy import BlockShape, Stack, Unmapped, read
from sidetune.errors import SidetuneError
from sidetune.portable.side_network import SideCache, capture, rope_indices
from sidetune.portable.side_network import SideStack as _PortableSideStack
from sidetune.portable.side_network import ladder as _ladder

__all__ = ["BlockShape", "SideCache", "SideStack", "Stack", "Unmapped", "capture", "ladder", "rope_indices",
           "stacks_of", "tapped_layers"]


def stacks_of(model: nn.Module) -> list[Stack]:
    """The backbone stacks the side network follows (`sidetune.anatomy`): [body] for decoder/encoder-only models,
    [encoder, decoder] for T5. A layout LST cannot follow is one SidetuneError naming the model type."""
    anatomy = read(model)
    kind = anatomy.describe
    if anatomy.kind == "encoder-decoder":
        if len(anatomy.stacks) != 2 or not all(s.shape.rel_bias for s in anatomy.stacks):
            raise SidetuneError(f"LST supports T5-style encoder-decoders only, not {kind}; use a decoder-only or "
                                f"encoder-only model, or another method")
        return anatomy.stacks
    if not anatomy.stacks:
        n = getattr(model.config, "num_hidden_layers", None)
        raise SidetuneError(f"LST found no list of {n} blocks of width hidden_size in {kind}: it follows bodies made "
                            f"of embeddings, a list of blocks and a final norm; use another method for this model")
    return anatomy.stacks


def tapped_layers(spec: str | list[int], n: int | None) -> list[int]:
    """Block indices for `side_layers` on a stack of n blocks (n=None: check the syntax only)."""
    if isinstance(spec, str):
        every = spec.removeprefix("every:")
        if spec != "all" and not (spec.startswith("every:") and every.isdigit() and int(every) >= 1):
            raise SidetuneError(f"method.side_layers={spec!r} is not understood; use all, every:K (e.g. every:2) or "
                                f"a list of block indices like [0, 2, 5]")
        k = 1 if spec == "all" else int(every)
        return [] if n is None else [i for i in range(n) if (n - 1 - i) % k == 0]
    if not spec:
        raise SidetuneError("method.side_layers is an empty list; name at least one block")
    if n is None:
        return []
    bad = [i for i in spec if not -n <= i < n]
    if bad:
        raise SidetuneError(f"method.side_layers={spec} names block {bad[0]}, but the model has {n} (0..{n - 1})")
    return sorted({i % n for i in spec})


# ---------------------------------------------------------------------------------------------------------------------
# Ladder storage during training (not exported: an exported model does not train)


def _offloads(x: torch.Tensor) -> bool:
    """Is there a host to offload to: a CUDA step, or a prediction standing in for one? (A CPU step has none.)"""
    from sidetune import memory

    return x.device.type == "cuda" or memory.simulated_target() == "cuda"


def _to_host(t: torch.Tensor):
    """Pack hook of `ladder_offload`: a saved tensor that needs no gradient (the ladder input or its int8 copy, not a
    cast of the weight) goes to pinned host memory; the copy is queued on the compute stream (non_blocking), so the
    device block it leaves is only reused by kernels queued after it. On the CPU nothing moves, except in a
    prediction standing in for a CUDA step (`memory.simulating`), where a copy made as host memory stands for it."""
    from torch._subclasses.fake_tensor import is_fake

    from sidetune import memory

    if t.requires_grad:
        return t
    real = t.device.type == "cuda" and not is_fake(t)
    with memory.host_memory():
        if real:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        else:  # a prediction (fake tensors): a copy counted as host memory stands for the transfer
            host = t.clone()
    return t.device, host, real


def _from_host(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host, real = packed
    # A prediction's host copy comes back as a new device tensor too (clone), as the real H2D copy does.
    return host.to(device, non_blocking=True) if real else host.clone()


def ladder(linear: nn.Linear, x: torch.Tensor, int8_saved: bool, offload: bool = False) -> torch.Tensor:
    """A ladder down-projection of a backbone activation x (which needs no gradient). offload: what it saves for
    its weight gradient is kept in host memory (`_to_host`); the forward and the gradients are unchanged."""
    if offload and torch.is_grad_enabled() and _offloads(x):
        with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
            return _ladder(linear, x, int8_saved)
    return _ladder(linear, x, int8_saved)


class Ladder(nn.Linear):
    """A ladder's down-projection d -> d/r, called as a module (so the memory accounting files what it saves under
    the side network) with LSTConfig's storage settings for its input: int8 (`ladder_grad_input`) and host
    offload (`ladder_offload`)."""

    int8_saved: bool = False
    offload: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ladder(self, x, self.int8_saved, self.offload)


class SideStack(_PortableSideStack):
    """The portable side network with ladders that choose what they save for backward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, ladder_cls=Ladder, **kwargs)
