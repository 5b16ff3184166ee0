"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, arXiv 2205.05638).

Three learned vectors per block rescale the keys, the values and the FFN's intermediate activation, elementwise:

    softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V),        FFN(x) = W_2 (l_ff * act(W_1 x))

i.e. a key/value projection's OUTPUT is scaled, k = l_k * (W_k x + b_k), and the FFN's down projection's INPUT is
scaled, W_2 (l_ff * h). The vectors start at ones, so step 0 equals the frozen model exactly.

Wrapped layers, read from the model (`sidetune.anatomy`): every attention's key and value projections (output
scaled; an encoder-decoder's cross-attention too, as PEFT's T5 default) and every MLP's down projection (input
scaled: the FFN's inner activation). PEFT's BERT default "output.dense" also matches attention.output.dense; scaling
that layer's input only repeats l_v (the attention output is a per-channel mix of the values), so we leave it out, as
the paper does. A fused qkv projection (GPT-2's c_attn, GPT-NeoX's / Falcon's / BLOOM's query_key_value, Phi3's
qkv_proj, MPT's Wqkv): with `fused_qkv: kv` (default, the paper's) the vector covers its key and value ROWS only (for
the layer's row layout); `qkv` scales all of them, as PEFT does. `targets` / `feedforward` replace the placement with
module names (a fused qkv among them is still scaled on its key and value rows under `fused_qkv: kv`).

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

from sidetune.anatomy import read
from sidetune.errors import SidetuneError
from sidetune.fields import check_targets, opt
from sidetune.methods._inject import (
    LINEAR_TYPES,
    Switchable,
    WrappedLinear,
    find_targets,
    float32_linear,
    freeze,
    linear_features,
    module_device,
    parts_off,
    replace_module,
)
from sidetune.methods.base import Context, Method


@dataclass
class IA3Config:
    name: Literal["ia3"] = opt("ia3", "Selects this method.")
    targets: list[str] | None = opt(
        None, "Layers whose output is rescaled (keys, values): names (suffix match) or \"re:<regex>\" (full name). "
        "null: every attention's key and value projections, read from the model.")
    feedforward: list[str] | None = opt(
        None, "Layers whose input is rescaled (the FFN's down projection), same syntax. null: every MLP's down "
        "projection, read from the model.")
    fused_qkv: Literal["kv", "qkv"] = opt(
        "kv", "A fused q/k/v projection (GPT-2, GPT-NeoX, Falcon, Phi3): scale its key and value rows "
        "(kv, the paper) or all of its output (qkv, as PEFT does).")

    def __post_init__(self) -> None:
        check_targets("method.targets", self.targets)
        check_targets("method.feedforward", self.feedforward)


class IA3Linear(Switchable, WrappedLinear):
    """A frozen linear layer whose output (or, for a feed-forward layer, input) is rescaled by a learned vector.

    `rows` (sorted output rows) scales only those outputs: a fused q/k/v projection's key and value rows.
    """

    def __init__(self, base: nn.Module, feedforward: bool, rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        in_features, out_features = linear_features(base)
        device = module_device(base)
        size = in_features if feedforward else out_features if rows is None else len(rows)
        # fp32 master weights whatever the base stores (bf16 or 4-bit).
        self.ia3_l = nn.Parameter(torch.ones(size, device=device, dtype=torch.float32))
        self.out_features = out_features
        self.register_buffer("rows", None if rows is None else rows.to(device), persistent=False)

    def scale(self) -> torch.Tensor:
        """The full scaling vector over the scaled side (ones on a fused layer's unscaled rows)."""
        if self.rows is None:
            return self.ia3_l
        return self.ia3_l.new_ones(self.out_features).index_copy(0, self.rows, self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.off:  # a DPO step's reference forward: the frozen layer
            return self.base(x)
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


class IA3(Method):
    name: ClassVar[str] = "ia3"
    Config: ClassVar[type] = IA3Config

    def __init__(self, cfg: IA3Config) -> None:
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        c = self.cfg
        anatomy = read(model)
        key = "method.targets and method.feedforward"
        if c.targets is not None:
            kv = find_targets(model, c.targets)
        else:  # every block must have both; cross-attention's keys and values join them
            anatomy.require({"attention key projection": ("k", "qkv"), "attention value projection": ("v", "qkv")},
                            key)
            wanted = set(anatomy.names("k", "v", "qkv", "xk", "xv"))
            kv = [n for n, _ in model.named_modules() if n in wanted]
        ff = find_targets(model, c.feedforward) if c.feedforward is not None else anatomy.require(
            {"MLP down projection": ("down",)}, key)["MLP down projection"]
        freeze(model)
        both = sorted(set(kv) & set(ff))
        if both:
            raise SidetuneError(f"method.targets and method.feedforward both match {both[0]}; a layer's output or "
                                f"its input is rescaled, not both")
        if not kv and not ff:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
            raise SidetuneError(f"method ia3 found no layer to rescale in {type(model).__name__}; set method.targets "
                                f"(keys/values) and method.feedforward to some of: {', '.join(linear)}")
        for name in kv:
            rows = anatomy.rows(name, "kv") if c.fused_qkv == "kv" else None  # None unless a fused qkv layer
            replace_module(model, name, IA3Linear(model.get_submodule(name), feedforward=False, rows=rows))
        for name in ff:
            replace_module(model, name, IA3Linear(model.get_submodule(name), feedforward=True))
        return model

    def reference(self, from_trained: bool) -> str:
        # Step 0 is the frozen model (the parts start at zero / ones), so switching them off gives it.
        return "precomputed" if from_trained else "parts_off"

    def reference_off(self, model: nn.Module):
        return parts_off(model)

    def merge(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, IA3Linear):
                # Merge in float32 (export casts to the save dtype afterwards).
                module.base = float32_linear(module.base)
                replace_module(model, name, module.merge_into_base())
        return model


def ia3_layers(model: nn.Module) -> list[IA3Linear]:
    return [m for m in model.modules() if isinstance(m, IA3Linear)]
