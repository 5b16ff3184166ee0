"""Bottleneck adapters' layers, importable without sidetune (torch only): sidetune/methods/adapter.py places them
(the equations and the placement are explained there), and `sidetune export --hf` ships this file so that the
exported model wraps the same layers the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Switchable, WrappedLinear, to_input

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """A(h) = up(act(down(dropout(h)))), with `up` zero-initialised so that A = 0 at step 0."""

    def __init__(self, dim: int, width: int, activation: str, dropout: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        # fp32 master weights whatever the base stores (bf16 or 4-bit): autocast picks the matmul dtype.
        self.down = nn.Linear(dim, width, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.dropout(to_input(h, self.down.weight)))))


class SequentialAdapter(Switchable, WrappedLinear):
    """An output projection followed by an adapter: o = base(x);  o + s * A(o)  (Houlsby / Pfeiffer)."""

    def __init__(self, base: nn.Module, dim: int, width: int, activation: str, dropout: float, scaling: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(dim, width, activation, dropout, device)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.off:  # a DPO step's reference forward: the frozen layer
            return out
        return out + (self.adapter(out) * self.scaling).to(out.dtype)


class FFNInput(WrappedLinear):
    """The FFN's first projection, unchanged, recording its input x (the FFN's input) for the parallel adapter at
    the FFN's output (`ParallelOutputAdapter`), which runs later in the same block."""

    def __init__(self, base: nn.Module, slot: dict) -> None:
        super().__init__()
        self.base = base
        self.slot = slot  # shared with the block's ParallelOutputAdapter (deepcopy keeps the sharing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.slot["x"] = x
        return self.base(x)


class ParallelOutputAdapter(Switchable, WrappedLinear):
    """The FFN's down projection plus a parallel adapter reading the FFN's input x: down(h) + s * A(x)."""

    def __init__(self, base: nn.Module, slot: dict, dim: int, width: int, activation: str, dropout: float,
                 scaling: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.base = base
        self.slot = slot
        self.adapter = Bottleneck(dim, width, activation, dropout, device)
        self.scaling = scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        x = self.slot.pop("x")  # set by this block's FFNInput a moment ago (also on a checkpointed replay)
        if self.off:
            return out
        return out + (self.adapter(x) * self.scaling).to(out.dtype)


class ParallelAdapter(Switchable, nn.Module):
    """A feed-forward block with an adapter beside it, reading the block's input x: FFN(x) + s * A(x)."""

    def __init__(self, base: nn.Module, dim: int, width: int, activation: str, dropout: float,
                 scaling: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(dim, width, activation, dropout, device)
        self.scaling = scaling

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        if self.off:
            return self.base(hidden_states) if input_tensor is None else self.base(hidden_states, input_tensor)
        if input_tensor is None:  # pre-LN families: the block is FFN(x), the residual is added by the caller
            out = self.base(hidden_states)
            return out + (self.adapter(hidden_states) * self.scaling).to(out.dtype)
        # BERT's FFN output, LayerNorm(dropout(dense(h)) + x), adds the residual x (the FFN's input) itself: adding
        # s * A(x) to that residual puts the adapter's output before the LayerNorm, beside the FFN.
        branch = (self.adapter(input_tensor) * self.scaling).to(input_tensor.dtype)
        return self.base(hidden_states, input_tensor + branch)
