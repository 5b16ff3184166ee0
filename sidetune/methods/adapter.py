"""Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751), Pfeiffer et al. 2021 (arXiv 2005.00247) and the
parallel adapter of He et al. 2022 (arXiv 2110.04366).

An adapter is a small bottleneck MLP with its own skip connection, inserted into every frozen transformer block:

    A(h) = W_up act(W_down dropout(h)),     W_down: m x d,  W_up: d x m,  m = d / reduction_factor

- houlsby:  after the attention output projection AND after the FFN output projection:  o -> o + A(o)
- pfeiffer: after the FFN output projection only:                                       o -> o + A(o)
- parallel: beside the whole FFN, reading the FFN's input x:                  FFN(x) -> FFN(x) + s * A(x)

W_up starts at zero (weight and bias), so A = 0 and step 0 equals the frozen model exactly. W_up gets a gradient at
step 0; W_down's is zero until W_up has moved, one step later (as LoRA's A with B = 0).

Where the adapter sits relative to residual + LayerNorm, per family (all as in Houlsby's Figure 2: the adapter's
output joins the sublayer output BEFORE the residual add and the LayerNorm):
- BERT/RoBERTa (post-LN: LayerNorm(dropout(dense(x)) + residual)): we wrap `attention.output.dense` and
  `layer.N.output.dense`, giving LayerNorm(dropout(o + A(o)) + residual). Houlsby put dropout before the adapter;
  the two orders agree in eval mode. Parallel wraps `layer.N.output` and adds s * A(x) to the residual it is given,
  i.e. LayerNorm(dropout(dense(h)) + x + s * A(x)), x being the FFN's input.
- Llama/Mistral/Qwen (`self_attn.o_proj`, `mlp.down_proj`; parallel: `mlp`), GPT-2 (`attn.c_proj`, `mlp.c_proj`;
  parallel: `mlp`) and T5 (`SelfAttention.o`, `DenseReluDense.wo`; parallel: `DenseReluDense`) are pre-LN:
  x + sublayer(norm(x)). The adapter lives inside the residual branch, x + (o + A(o)), and the next sublayer's norm
  follows. T5's decoder cross-attention (`EncDecAttention.o`) is left alone, as in Houlsby's placement.

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

from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive, check_targets, opt
from sidetune.methods._inject import (
    WrappedLinear,
    freeze,
    head_module_names,
    linear_features,
    module_device,
    replace_module,
    to_input,
)
from sidetune.methods.base import Context, Method

# Module-name patterns (regexes matched against the end of the full module name, at a "." boundary), per role.
ATTN_OUT = [r"attention\.output\.dense", r"self_attn\.o_proj", r"attn\.c_proj", r"SelfAttention\.o"]
FFN_OUT = [r"layer\.\d+\.output\.dense", r"mlp\.down_proj", r"mlp\.c_proj", r"DenseReluDense\.wo"]
FFN = [r"layer\.\d+\.output", r"mlp", r"DenseReluDense"]

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
        "Override the per-family choice of wrapped modules: names (suffix match) or \"re:<regex>\" (full name). "
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


class SequentialAdapter(WrappedLinear):
    """An output projection followed by an adapter: o = base(x);  o + s * A(o)  (Houlsby / Pfeiffer)."""

    def __init__(self, base: nn.Module, width: int, activation: str, dropout: float, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(linear_features(base)[1], width, activation, dropout, module_device(base))
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + (self.adapter(out) * self.scaling).to(out.dtype)


class ParallelAdapter(nn.Module):
    """A feed-forward block with an adapter beside it, reading the block's input x: FFN(x) + s * A(x)."""

    def __init__(self, base: nn.Module, dim: int, width: int, activation: str, dropout: float,
                 scaling: float) -> None:
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(dim, width, activation, dropout, module_device(base))
        self.scaling = scaling

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        if input_tensor is None:  # pre-LN families: the block is FFN(x), the residual is added by the caller
            out = self.base(hidden_states)
            return out + (self.adapter(hidden_states) * self.scaling).to(out.dtype)
        # BERT's FFN output, LayerNorm(dropout(dense(h)) + x), adds the residual x (the FFN's input) itself: adding
        # s * A(x) to that residual puts the adapter's output before the LayerNorm, beside the FFN.
        branch = (self.adapter(input_tensor) * self.scaling).to(input_tensor.dtype)
        return self.base(hidden_states, input_tensor + branch)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(r"(^|\.)" + p + "$", name) for p in patterns)


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

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the modules this config wraps in `model` (heads and output embeddings never)."""
        c = self.cfg
        heads = head_module_names(model)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = []
        for name, module in model.named_modules():
            if not name or module is out_emb or any(name == h or name.startswith(h + ".") for h in heads):
                continue
            if c.targets is not None:
                hit = _user_matches(name, c.targets)
            elif c.variant == "parallel":
                hit = _matches(name, FFN)
            else:
                hit = _matches(name, FFN_OUT) or (c.variant == "houlsby" and _matches(name, ATTN_OUT))
            if hit:
                names.append(name)
        return names

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        freeze(model)
        c = self.cfg
        names = self.targets(model)
        if not names:
            where = f"method.targets={c.targets}" if c.targets is not None else (
                f"no {c.variant} adapter position is known for {type(model).__name__}")
            raise SidetuneError(f"{where} matched no module; set method.targets to the blocks' output projections "
                                f"(or, for variant parallel, their feed-forward modules)")
        hidden = _hidden_size(model)
        for name in names:
            module = model.get_submodule(name)
            if c.variant == "parallel":
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
    return [m for m in model.modules() if isinstance(m, (SequentialAdapter, ParallelAdapter))]
