"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, arXiv 2205.05638).

Three learned vectors per block rescale the keys, the values and the FFN's intermediate activation, elementwise:

    softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V),        FFN(x) = W_2 (l_ff * act(W_1 x))

i.e. a key/value projection's OUTPUT is scaled, k = l_k * (W_k x + b_k), and the FFN's down projection's INPUT is
scaled, W_2 (l_ff * h). The vectors start at ones, so step 0 equals the frozen model exactly.

Wrapped layers per family (PEFT's IA3 defaults, with one deliberate difference):
- Llama/Mistral/Qwen: self_attn.k_proj, self_attn.v_proj (output); mlp.down_proj (input).
- BERT/RoBERTa: attention.self.key, attention.self.value (output); layer.N.output.dense (input). PEFT's default
  "output.dense" also matches attention.output.dense; scaling that layer's input only repeats l_v (the attention
  output is a per-channel mix of the values), so we leave it out, as the paper does.
- GPT-2: attn.c_attn is one fused [q | k | v] projection. With `fused_qkv: kv` (default, the paper's) the vector
  covers the k and v thirds of its output only; `qkv` scales all three, as PEFT does. mlp.c_proj (input).
- T5: SelfAttention/EncDecAttention .k, .v (output); DenseReluDense.wo (input).
`targets` / `feedforward` replace the per-family choice.

Merge: a scaled output is diag(l) (W x + b) = (diag(l) W) x + l * b, so W's rows and the bias scale; a scaled input
is W (l * h) = (W diag(l)) h, so W's columns scale and the bias stays (GPT-2's Conv1D stores W transposed). A 4-bit
base is dequantized first (`sidetune export`), and the result is a plain transformers model.

The wrapper keeps the original layer as `self.base`; parameter names (`ia3_l`) follow PEFT, which serves as a test
oracle.

Still paid (the gradient-to-input cost): the vectors sit in every block, so backward carries dL/dx through the whole
backbone above the lowest one and autograd keeps the backbone's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sidetune.errors import SidetuneError
from sidetune.fields import check_targets, opt
from sidetune.methods._inject import (
    LINEAR_TYPES,
    WrappedLinear,
    find_targets,
    float32_linear,
    freeze,
    linear_features,
    module_device,
    replace_module,
)
from sidetune.methods.base import Context, Method

# Full-name regexes (find_targets' "re:" entries) of the per-family defaults.
KEY_VALUE = [r"re:(.*\.)?self_attn\.[kv]_proj", r"re:(.*\.)?attention\.self\.(key|value)", r"re:(.*\.)?attn\.c_attn",
             r"re:(.*\.)?(SelfAttention|EncDecAttention)\.[kv]"]
FEEDFORWARD = [r"re:(.*\.)?mlp\.down_proj", r"re:(.*\.)?layer\.\d+\.output\.dense", r"re:(.*\.)?mlp\.c_proj",
               r"re:(.*\.)?DenseReluDense\.wo"]


@dataclass
class IA3Config:
    name: Literal["ia3"] = opt("ia3", "Selects this method.")
    targets: list[str] | None = opt(
        None, "Layers whose output is rescaled (keys, values): names (suffix match) or \"re:<regex>\" (full name). "
        "null: the family's key and value projections.")
    feedforward: list[str] | None = opt(
        None, "Layers whose input is rescaled (the FFN's down projection), same syntax. null: the family's FFN "
        "output layer.")
    fused_qkv: Literal["kv", "qkv"] = opt(
        "kv", "A fused [q|k|v] projection (GPT-2's c_attn): scale its k and v thirds (kv, the paper) or all of its "
        "output (qkv, as PEFT does).")

    def __post_init__(self) -> None:
        check_targets("method.targets", self.targets)
        check_targets("method.feedforward", self.feedforward)


class IA3Linear(WrappedLinear):
    """A frozen linear layer whose output (or, for a feed-forward layer, input) is rescaled by a learned vector.

    `offset` leaves the first outputs unscaled: a fused [q|k|v] projection scales only its k and v parts.
    """

    def __init__(self, base: nn.Module, feedforward: bool, offset: int = 0) -> None:
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        self.offset = offset
        in_features, out_features = linear_features(base)
        size = in_features if feedforward else out_features - offset
        # fp32 master weights whatever the base stores (bf16 or 4-bit).
        self.ia3_l = nn.Parameter(torch.ones(size, device=module_device(base), dtype=torch.float32))

    def scale(self) -> torch.Tensor:
        """The full scaling vector over the scaled side (ones for a fused layer's unscaled part)."""
        if not self.offset:
            return self.ia3_l
        return torch.cat([self.ia3_l.new_ones(self.offset), self.ia3_l])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            # The base sees its usual input dtype (a bf16 or 4-bit layer), the fp32 vector gets its gradient.
            return self.base((x * self.ia3_l).to(x.dtype))
        out = self.base(x)
        return (out * self.scale()).to(out.dtype)

    def merge_into_base(self) -> nn.Module:
        """Fold the vector into the (float) base weight and bias; return the base layer."""
        base, scale = self.base, self.scale().detach()
        weight = base.weight
        if not weight.is_floating_point():
            raise SidetuneError("cannot merge (IA)^3 into a quantized base in place; use `sidetune export RUN_DIR "
                                "--merge OUT`, which dequantizes first")
        # nn.Linear stores W as (out, in); Conv1D as (in, out).
        out_axis = 1 if isinstance(base, Conv1D) else 0
        axis = 1 - out_axis if self.feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        with torch.no_grad():
            weight.mul_(scale.reshape(shape).to(weight.dtype))
            if not self.feedforward and base.bias is not None:
                base.bias.mul_(scale.to(base.bias.dtype))
        return base


def _is_fused_qkv(name: str, layer: nn.Module) -> bool:
    in_features, out_features = linear_features(layer)
    return name.rsplit(".", 1)[-1] == "c_attn" and out_features == 3 * in_features


class IA3(Method):
    name: ClassVar[str] = "ia3"
    Config: ClassVar[type] = IA3Config

    def __init__(self, cfg: IA3Config) -> None:
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        freeze(model)
        c = self.cfg
        kv = find_targets(model, c.targets if c.targets is not None else KEY_VALUE)
        ff = find_targets(model, c.feedforward if c.feedforward is not None else FEEDFORWARD)
        both = sorted(set(kv) & set(ff))
        if both:
            raise SidetuneError(f"method.targets and method.feedforward both match {both[0]}; a layer's output or "
                                f"its input is rescaled, not both")
        if not kv and not ff:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
            raise SidetuneError(f"method ia3 found no layer to rescale in {type(model).__name__}; set method.targets "
                                f"(keys/values) and method.feedforward to some of: {', '.join(linear)}")
        for name in kv:
            layer = model.get_submodule(name)
            offset = linear_features(layer)[0] if c.fused_qkv == "kv" and _is_fused_qkv(name, layer) else 0
            replace_module(model, name, IA3Linear(layer, feedforward=False, offset=offset))
        for name in ff:
            replace_module(model, name, IA3Linear(model.get_submodule(name), feedforward=True))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, IA3Linear):
                # Merge in float32 (export casts to the save dtype afterwards).
                module.base = float32_linear(module.base)
                replace_module(model, name, module.merge_into_base())
        return model


def ia3_layers(model: nn.Module) -> list[IA3Linear]:
    return [m for m in model.modules() if isinstance(m, IA3Linear)]
