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

from torch import nn

from sidetune.anatomy import read
from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive, check_targets, opt
from sidetune.methods._inject import (
    freeze,
    head_module_names,
    linear_features,
    module_device,
    parts_off,
    replace_module,
)
from sidetune.methods.base import Context, HFExport, Method
from sidetune.portable.adapters import (
    FFNInput,
    ParallelAdapter,
    ParallelOutputAdapter,
    SequentialAdapter,
)


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
                new = ParallelOutputAdapter(module, slot, dim, self._width(dim), c.activation, c.dropout, c.scaling,
                                            module_device(module))
            elif c.variant == "parallel":
                dim = hidden
                new = ParallelAdapter(module, dim, self._width(dim), c.activation, c.dropout, c.scaling,
                                      module_device(module))
            else:
                if not hasattr(module, "weight"):
                    raise SidetuneError(f"method.variant={c.variant} wraps output projections, but {name} is a "
                                        f"{type(module).__name__}; point method.targets at linear layers")
                dim = linear_features(module)[1]
                new = SequentialAdapter(module, dim, self._width(dim), c.activation, c.dropout, c.scaling,
                                        module_device(module))
            replace_module(model, name, new)
        return model

    def hf_export(self, model: nn.Module) -> HFExport:
        """Where the adapters sit and their sizes, for sidetune/portable/modeling_sidetune.py (kind "adapter") to wrap
        the same modules; their weights are in the model's own state dict, under the wrapped names."""
        inputs = {id(m.slot): n for n, m in model.named_modules() if isinstance(m, FFNInput)}
        placed = []
        for name, m in model.named_modules():
            if isinstance(m, FFNInput):
                placed.append({"name": name, "kind": "ffn_input"})
            elif isinstance(m, (SequentialAdapter, ParallelAdapter, ParallelOutputAdapter)):
                kind = {SequentialAdapter: "sequential", ParallelAdapter: "parallel",
                        ParallelOutputAdapter: "parallel_output"}[type(m)]
                placed.append({"name": name, "kind": kind, "dim": m.adapter.up.out_features,
                               "width": m.adapter.down.out_features, "activation": self.cfg.activation,
                               "scaling": m.scaling, "input": inputs.get(id(getattr(m, "slot", None)))})
        return HFExport({"kind": "adapter", "adapters": placed}, model)

    def _width(self, dim: int) -> int:
        width = dim // self.cfg.reduction_factor
        if width < 1:
            raise SidetuneError(f"method.reduction_factor={self.cfg.reduction_factor} leaves no bottleneck for hidden "
                                f"size {dim}; use a reduction_factor <= {dim}")
        return width


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SequentialAdapter, ParallelAdapter, ParallelOutputAdapter))]
