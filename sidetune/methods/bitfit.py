"""BitFit: bias-terms fine-tuning (Ben Zaken, Ravfogel & Goldberg 2022, arXiv 2106.10199).

Every weight matrix stays frozen; only the additive bias vectors train (plus the freshly initialised task head):

    y = W x + b          W frozen,  b trainable          (every linear layer and every LayerNorm's beta)

In the paper's BERT notation a block has b_q, b_k, b_v (attention), b_m1 (attention output), b_LN1, b_m2 (the FFN's
intermediate layer), b_m3 (FFN output), b_LN2. `biases` picks which of them train:

- "all" (the paper's main setting): every bias term of the backbone, LayerNorm betas and the pooler's included;
- "attention": the attention projections' biases (b_q, b_k, b_v, b_m1; cross-attention's too);
- "query_intermediate": the paper's 0.04% subset b_q + b_m2 (the self-attention query and the FFN's intermediate
  layer: up, and gate where the MLP is gated; a fused qkv layer holds the query bias, and its whole q/k/v bias then
  trains);
  both groups are read from the model's roles (`sidetune.anatomy`), not from per-family names;
- module names (suffix match) or "re:<regex>" (full module name): those modules' own bias vectors.

Models without biases. Llama/Mistral/Qwen and T5 linear layers have no bias at all (and their RMSNorms no beta).
With `add_missing` (the default) every selected linear layer lacking a bias is wrapped in `BiasLinear`, which adds a
zero-initialised trainable bias, y = W x + 0, so step 0 still equals the frozen model exactly and the method trains
any family. With add_missing=false such a model is refused in one line. The norms never gain a bias.

Merge: the model's own biases are its weights already, so `merge` returns the model as is; added biases have no slot
in a Llama/T5 checkpoint's config, so a run that added some is refused (serve it with sidetune.load).

Still paid (the gradient-to-input cost): a bias in layer l gets dL/db = sum of dL/dy over tokens, so backward must
carry dL/dx through every block above the lowest trained bias and autograd keeps the backbone's activations, nearly
as full fine-tuning does; only the weight gradients and the optimizer state shrink.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from sidetune.anatomy import read
from sidetune.errors import SidetuneError
from sidetune.fields import check_targets, opt
from sidetune.methods._inject import (
    LINEAR_TYPES,
    WrappedLinear,
    find_targets,
    freeze,
    head_module_names,
    linear_features,
    module_device,
    replace_module,
)
from sidetune.methods.base import Context, Method

# The named groups, as anatomy roles (sidetune.anatomy): x-prefixed roles are cross-attention's.
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q", "k", "v", "qkv", "o", "xq", "xk", "xv", "xo"),
    "query_intermediate": ("q", "qkv", "up", "gate", "gate_up"),
}


@dataclass
class BitFitConfig:
    name: Literal["bitfit"] = opt("bitfit", "Selects this method.")
    biases: list[str] = opt(
        factory=lambda: ["all"],
        help="Which bias terms train: all (every bias, LayerNorm betas included), attention (q/k/v/output "
        "projections), query_intermediate (the paper's b_q + b_m2 subset), module names (suffix match) or "
        "\"re:<regex>\" (full module name).",
    )
    add_missing: bool = opt(
        True, "Give selected linear layers that have no bias (Llama, T5) a zero-initialised trainable one; false "
        "trains only the model's own biases and refuses a model that has none.")

    def __post_init__(self) -> None:
        check_targets("method.biases", self.biases)


class BiasLinear(WrappedLinear):
    """A frozen bias-free linear layer plus a trainable bias that starts at zero: y = base(x) + b."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        # fp32 master weights whatever the base stores; added in the output's dtype.
        self.bitfit_bias = nn.Parameter(torch.zeros(linear_features(base)[1], device=module_device(base),
                                                    dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.bitfit_bias.to(out.dtype)


def _selected(name: str, entries: list[str], groups: dict[str, set[str]]) -> bool:
    for e in entries:
        if e == "all":
            return True
        if e in GROUPS:
            if name in groups[e]:
                return True
        elif e.startswith("re:"):
            if re.fullmatch(e[3:], name):
                return True
        elif name == e or name.endswith("." + e):
            return True
    return False


class BitFit(Method):
    name: ClassVar[str] = "bitfit"
    Config: ClassVar[type] = BitFitConfig

    def __init__(self, cfg: BitFitConfig) -> None:
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        freeze(model)
        c = self.cfg
        heads = head_module_names(model)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        groups = {}
        if any(e in GROUPS for e in c.biases):
            anatomy = read(model)
            if any(e == "query_intermediate" for e in c.biases):  # every block must have both parts
                anatomy.require({"attention query projection": ("q", "qkv"),
                                 "MLP up projection": ("up", "gate_up")}, "method.biases")
            groups = {g: set(anatomy.names(*roles)) for g, roles in GROUPS.items()}
        own, missing = [], []
        for name, module in model.named_modules():
            if not name or module is out_emb or any(name == h or name.startswith(h + ".") for h in heads):
                continue  # the head trains anyway (freeze); the output embedding is not a block's layer
            if not _selected(name, c.biases, groups):
                continue
            bias = module._parameters.get("bias")  # the module's own bias, not a child's
            if bias is not None and bias.is_floating_point():
                own.append(bias)
            elif isinstance(module, LINEAR_TYPES) and c.add_missing:
                missing.append(name)
        linear = set(find_targets(model, ["all-linear"]))
        missing = [n for n in missing if n in linear]
        if not own and not missing:
            raise SidetuneError(self._nothing(model))
        for p in own:
            p.requires_grad_(True)
        for name in missing:
            replace_module(model, name, BiasLinear(model.get_submodule(name)))
        return model

    def _nothing(self, model: nn.Module) -> str:
        kind = type(model).__name__
        if not self.cfg.add_missing:
            return (f"method bitfit: {kind} has no bias term matching method.biases={self.cfg.biases}; set "
                    f"method.add_missing=true to add zero-initialised ones, or use method.name=ia3 or lora")
        return (f"method.biases={self.cfg.biases} matched no bias and no linear layer of {kind}; use all, "
                f"attention, query_intermediate, or module names")

    def merge(self, model: nn.Module) -> nn.Module:
        if any(isinstance(m, BiasLinear) for m in model.modules()):
            raise SidetuneError(f"this bitfit run added bias terms that {type(model).__name__}'s checkpoint format "
                                f"has no slot for; serve it with sidetune.load(RUN_DIR) instead of export --merge")
        return model  # the trained biases are the model's own weights: nothing to fold


def bias_layers(model: nn.Module) -> list[BiasLinear]:
    return [m for m in model.modules() if isinstance(m, BiasLinear)]
