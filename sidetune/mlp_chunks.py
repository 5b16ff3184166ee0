"""Frozen MLPs in token chunks (train.mlp_chunk_size): at long context a no-grad forward's peak is one block's MLP.

A transformer block's MLP maps each token on its own, and its B x T x ff intermediates (gate, up, act(gate) * up) are
the largest tensors of a forward: 3 x 3.5 GiB at 131072 tokens on Llama-3-8B, more than the rest of that forward
together. Where nothing needs a gradient (LST's frozen backbone, the profile's floor, evaluation) nothing is saved,
so the MLP can run on a slice of the tokens at a time into one B x T x d output: the same numbers (each token's
output is computed from that token alone; a matmul over fewer rows may block its sums differently on some kernels),
a chunk's intermediates instead of the sequence's. Under grad mode the MLP runs as it is: a method that trains
through the backbone keeps what autograd saves, which chunking would not shrink.
"""

from __future__ import annotations

import torch
from torch import nn


def _mlp_containers(model: nn.Module) -> list[nn.Module]:
    """Each block's MLP module: the deepest module holding its up (or fused gate+up) and down projections, when
    that is not the block itself (a block's forward is not per token)."""
    from sidetune.anatomy import read

    out = []
    for stack in read(model).stacks:
        for i, roles in enumerate(stack.blocks):
            names = [roles[r] for r in ("gate_up", "up", "gate", "down") if r in roles]
            if "down" not in roles or len(names) < 2:
                continue
            parts = [n.split(".") for n in names]
            common = []
            for level in zip(*parts):
                if len(set(level)) > 1:
                    break
                common.append(level[0])
            parent = ".".join(common)
            if parent and parent != f"{stack.path}.{i}".lstrip("."):
                out.append(model.get_submodule(parent))
    return out


def chunk_frozen_mlps(model: nn.Module, tokens: int) -> int:
    """Run each block MLP of `model` on at most `tokens` tokens at a time whenever grad mode is off (see the module
    docstring). Returns how many MLPs were wrapped (0: none could be read, nothing changes)."""
    mlps = _mlp_containers(model)
    for mlp in mlps:
        if getattr(mlp, "_sidetune_chunked", None) is None:
            mlp._sidetune_chunked = tokens
            mlp.forward = _chunked(mlp.forward, mlp)
        mlp._sidetune_chunked = tokens
    return len(mlps)


def _chunked(forward, mlp: nn.Module):
    def run(x: torch.Tensor, *args, **kwargs):
        rows = mlp._sidetune_chunked // max(1, x.shape[0]) if x.dim() == 3 else 0
        if torch.is_grad_enabled() or args or kwargs or rows < 1 or x.shape[1] <= rows:
            return forward(x, *args, **kwargs)
        out = None
        for start in range(0, x.shape[1], rows):
            y = forward(x[:, start:start + rows].contiguous())  # a slice of a B > 1 batch is strided
            if out is None:
                out = y.new_empty((*x.shape[:2], *y.shape[2:]))
            out[:, start:start + rows] = y
        return out

    return run
