"""Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751), Pfeiffer et al. 2021 (arXiv 2005.00247) and the
parallel adapter of He et al. 2022 (arXiv 2110.04366).

An adapter is a small bottleneck MLP with its own skip connection, inserted into every frozen transformer block:

    A(h) = W_up act(W_down dropout(h)),     W_down: m x d,  W_up: d x m,  m = d / reduction_factor

- houlsby:  after the attention output projection AND after the FFN output projection:  o -> o + A(o)
- pfeiffer: after the FFN output projection only:                                       o -> o + A(o)
- parallel: beside the whole FFN, reading the FFN's input x:                  FFN(x) -> FFN(x) + s * A(x)

W_up starts at zero (weight and bias), so A = 0 and step 0 equals the frozen model exactly. W_up gets a gradient at
step 0; W_down's is zero until W_up has moved, one step later (as LoRA's A with B = 0).

Where they sit, read from the model (`sidetune.anatomy`), not from a per-family table: "after the attention output
projection" is each block's self-attention output role (an encoder-decoder's cross-attention output is left alone,
as in Houlsby's placement), "after the FFN output projection" its MLP down role, and the parallel adapter reads the
input of the MLP's first projection (up, or a fused gate+up: the FFN's input x) and adds s * A(x) to the output of
its down projection. All of these join the sublayer's output BEFORE the residual add and any norm after it, as in
Houlsby's Figure 2:
- post-LN blocks (BERT/RoBERTa/DeBERTa: LayerNorm(dropout(dense(x)) + residual)) give LayerNorm(dropout(o + A(o)) +
  residual); Houlsby put dropout before the adapter, and the two orders agree in eval mode. Parallel gives
  LayerNorm(dropout(dense(h) + s * A(x)) + x), x being the FFN's input.
- pre-LN blocks (Llama, GPT-2, GPT-NeoX, Falcon, T5 ...: x + sublayer(norm(x)), or parallel attention + MLP) keep
  the adapter inside the residual branch: x + (o + A(o)), and the next sublayer's norm follows.
`targets` overrides the placement with module names; then the parallel variant wraps whole FFN modules, FFN(x) +
s * A(x) (a module called as (hidden_states, input_tensor), like BERT's output block, adds s * A(input_tensor) to
the residual it is given).

The wrappers keep the original layer as `self.base` (a float or bitsandbytes 4/8-bit linear, GPT-2's Conv1D, or a
whole FFN module), so adapters work on a 4-bit base unchanged.

Still paid (the gradient-to-input cost): adapters sit inside every block, so backward carries dL/dx through the whole
backbone above the lowest adapter, and autograd keeps the backbone's activations for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from sidetune.anatomy import read
from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive, check_targets, opt
from sidetune.methods._inject import (
    Switchable,
    WrappedLinear,
    freeze,
    head_module_names,
    linear_features,
    module_device,
    parts_off,
    replace_module,
    to_input,
)
from sidetune.methods.base import Context, Method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    name: Literal["adapter"] = opt("adapter", "Selects this method.")
    variant: Literal["houlsby", "pfeiffer", "parallel"] = opt(
        "houlsby",
        "houlsby: after the attention and the FFN output projections; pfeiffer: after the FFN output only; "
        "parallel: beside the FFN, reading its input.",
    )
    reduction_factor: int = opt(
        16, "Bottleneck width m = hidden size // reduction_factor (Houlsby and Pfeiffer use 16 for BERT-base: m = 48).")
    activation: Literal["relu", "gelu", "silu", "tanh"] = opt(
        "relu", "Non-linearity between the down- and the up-projection.")
    scaling: float = opt(1.0, "Multiplier s on the adapter's output (He et al. use s = 4 for the parallel adapter).")
    dropout: float = opt(0.0, "Dropout on the adapter's input.")
    targets: list[str] | None = opt(
        None,
        "Override the placement read from the model (attention output and FFN output projections; parallel: beside "
        "the FFN) with wrapped modules: names (suffix match) or \"re:<regex>\" (full name). "
        "Sequential variants wrap them as output layers (o -> o + A(o)); parallel wraps them as FFN modules "
        "(FFN(x) + s A(x)).",
    )

    def __post_init__(self) -> None:
        check_positive("method.reduction_factor", self.reduction_factor)
        check_dropout("method.dropout", self.dropout)
        check_targets("method.targets", self.targets)


class Bottleneck(nn.Module):
    """A(h) = up(act(down(dropout(h)))), with `up` zero-initialised so that A = 0 at step 0."""

    def __init__(self, dim: int, width: int, activation: str, dropout: float, device: torch.device) -> None:
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

    def __init__(self, base: nn.Module, width: int, activation: str, dropout: float, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(linear_features(base)[1], width, activation, dropout, module_device(base))
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

    def __init__(self, base: nn.Module, slot: dict, width: int, activation: str, dropout: float,
                 scaling: float) -> None:
        super().__init__()
        self.base = base
        self.slot = slot
        self.adapter = Bottleneck(linear_features(base)[1], width, activation, dropout, module_device(base))
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
                 scaling: float) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(dim, width, activation, dropout, module_device(base))
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


def _user_matches(name: str, targets: list[str]) -> bool:
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise SidetuneError(f"cannot tell the hidden size of {type(model).__name__}; method adapter needs "
                        f"config.hidden_size")


class Adapter(Method):
    name: ClassVar[str] = "adapter"
    Config: ClassVar[type] = AdapterConfig

    def __init__(self, cfg: AdapterConfig) -> None:
        self.cfg = cfg

    def reference(self, from_trained: bool) -> str:
        # Step 0 is the frozen model (the parts start at zero / ones), so switching them off gives it.
        return "precomputed" if from_trained else "parts_off"

    def reference_off(self, model: nn.Module):
        return parts_off(model)

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the modules that get an adapter (heads and output embeddings never)."""
        c = self.cfg
        if c.targets is None:
            return [down for down, _ in self._placement(model)]
        heads = head_module_names(model)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name, module in model.named_modules()
                if name and module is not out_emb and not any(name == h or name.startswith(h + ".") for h in heads)
                and _user_matches(name, c.targets)]

    def _placement(self, model: nn.Module) -> list[tuple[str, str | None]]:
        """Default placement from the model's anatomy: (module that gets the adapter, the FFN input it reads for
        variant parallel, else None), in model order."""
        anatomy = read(model)
        key = "method.targets"
        if self.cfg.variant == "parallel":
            found = anatomy.require({"FFN output projection": ("down",),
                                     "FFN input projection": ("up", "gate_up", "gate")}, key)
            return list(zip(found["FFN output projection"], found["FFN input projection"]))
        groups = {"FFN output projection": ("down",)}
        if self.cfg.variant == "houlsby":
            groups["attention output projection"] = ("o",)  # self-attention only: cross-attention is "xo"
        wanted = {n for names in anatomy.require(groups, key).values() for n in names}
        return [(n, None) for n, _ in model.named_modules() if n in wanted]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        c = self.cfg
        if c.targets is None:
            placement = self._placement(model)
        else:
            placement = [(n, None) for n in self.targets(model)]
            if not placement:
                raise SidetuneError(f"method.targets={c.targets} matched no module; set method.targets to the "
                                    f"blocks' output projections (or, for variant parallel, their feed-forward "
                                    f"modules)")
        freeze(model)
        hidden = _hidden_size(model)
        for name, ffn_input in placement:
            module = model.get_submodule(name)
            if ffn_input is not None:  # parallel, placed from the anatomy: input of the FFN -> its output
                slot: dict = {}
                replace_module(model, ffn_input, FFNInput(model.get_submodule(ffn_input), slot))
                dim = linear_features(module)[1]
                new = ParallelOutputAdapter(module, slot, self._width(dim), c.activation, c.dropout, c.scaling)
            elif c.variant == "parallel":
                dim = hidden
                new = ParallelAdapter(module, dim, self._width(dim), c.activation, c.dropout, c.scaling)
            else:
                if not hasattr(module, "weight"):
                    raise SidetuneError(f"method.variant={c.variant} wraps output projections, but {name} is a "
                                        f"{type(module).__name__}; point method.targets at linear layers")
                dim = linear_features(module)[1]
                new = SequentialAdapter(module, self._width(dim), c.activation, c.dropout, c.scaling)
            replace_module(model, name, new)
        return model

    def _width(self, dim: int) -> int:
        width = dim // self.cfg.reduction_factor
        if width < 1:
            raise SidetuneError(f"method.reduction_factor={self.cfg.reduction_factor} leaves no bottleneck for hidden "
                                f"size {dim}; use a reduction_factor <= {dim}")
        return width


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SequentialAdapter, ParallelAdapter, ParallelOutputAdapter))]
