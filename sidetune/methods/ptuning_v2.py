"""P-tuning v2: deep prompt tuning (Liu et al. 2022, arXiv 2110.07602; THUDM/P-tuning-v2), i.e. prefix tuning
(Li & Liang 2021, arXiv 2101.00190) at every layer, by default without the reparameterization MLP.

Every attention layer l gets P trainable key/value vectors that each real token attends to besides the sequence:

    head_l(x) = softmax(q [K_l^p ; K_x]^T / sqrt(d)) [V_l^p ; V_x]          (one softmax over prefix + tokens)

The prefix (K_l^p, V_l^p for all layers) is a P x (L * 2 * d_kv) embedding, or with `prefix_projection` the output
of a two-layer tanh MLP over a P x d_kv embedding (THUDM's --prefix_projection; `prefix_tuning` always uses it). The
machinery (the read-only prefix KV cache, positions, masks, zero-init attention, gradient checkpointing, generation)
is shared with `prefix_tuning` in sidetune/methods/_prefix.py, whose docstring gives the details.

Step 0. A zero prefix is NOT invisible in the formula above: its logits q.0 = 0 add P * e^0 to each softmax
denominator and shrink the attention over the real tokens. And no prefix can be exactly invisible under the joint
softmax while still getting a gradient: invisible means zero softmax mass, and every first-order gradient then
vanishes. `zero_init_attention` is the honest way out, LLaMA-Adapter's zero-init attention (arXiv 2303.16199): the
prefix gets its own softmax, added to the unchanged attention over the tokens,

    head_l(x) = softmax(q K_x^T / sqrt(d)) V_x  +  softmax(q K_l^p^T / sqrt(d)) V_l^p,

with V^p = 0 at init. Step 0 then equals the base exactly, and V^p gets a gradient from step 0 (K^p from step 1, as
LoRA's A with B = 0).

Readout (`pooling`, `train_pooler`). BERT's classification head reads the pooler, tanh(W h_[CLS] + b), frozen here
with the backbone (as in THUDM's code). In all-MiniLM-L6-v2 (a sentence-transformers model, trained to pool by mean)
it squashes [CLS] to a small scale (output std ~0.04 per dimension against ~0.2 for h_[CLS]). Training it too (148k
parameters, `train_pooler`) measured 0.792 against 0.788 frozen on SST-2 dev (300 steps, one seed each);
`pooling: mean`, the classifier on the masked mean of the last hidden states (sidetune/methods/_readout.py),
measured 0.819, so recipes/sst2_ptuning_v2.yaml uses it. The default stays `model`, the published setting.

Still paid (the gradient-to-input cost): the prefix feeds every layer, so backward carries dL/dx through the whole
backbone and autograd keeps its activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from sidetune.fields import opt
from sidetune.methods._prefix import (
    HEAD_LR_HELP,
    POOLING_HELP,
    PrefixModel,
    attach_prefix,
    check_prefix_config,
    hf_export_prefix,
    prefix_param_groups,
)
from sidetune.methods.base import Context, HFExport, Method

PTuningV2Model = PrefixModel  # the module that trains (shared with prefix_tuning)


@dataclass
class PTuningV2Config:
    name: Literal["ptuning_v2"] = opt("ptuning_v2", "Selects this method.")
    num_virtual_tokens: int = opt(
        20, "Prefix length P: key/value vectors per layer (THUDM uses 4-128 depending on the task).")
    prefix_projection: bool = opt(
        False, "Reparameterize the prefix through a two-layer tanh MLP (Li & Liang; THUDM's --prefix_projection).")
    projection_dim: int = opt(512, "Hidden width of that MLP (THUDM's prefix_hidden_size).")
    dropout: float = opt(0.0, "Dropout on the prefix keys/values (THUDM applies the model's hidden dropout there).")
    zero_init_attention: bool = opt(
        False,
        "false: P-tuning v2 as published, one softmax over [prefix; tokens]; step 0 differs from the base model. "
        "true: zero-init attention (LLaMA-Adapter): the prefix has its own softmax and zero values at init, so "
        "step 0 equals the base model exactly.",
    )
    shift_positions: bool = opt(
        False,
        "Give the real tokens positions P..P+T-1 instead of 0..T-1 (what PEFT and THUDM do; needed to match "
        "them).",
    )
    train_pooler: bool = opt(
        False, "Also train the encoder's pooler (BERT's tanh dense over [CLS] that its classification head reads).")
    pooling: Literal["model", "mean", "first", "last"] = opt("model", POOLING_HELP)
    head_lr: float | None = opt(None, HEAD_LR_HELP)

    def __post_init__(self) -> None:
        check_prefix_config(self)


class PTuningV2(Method):
    name: ClassVar[str] = "ptuning_v2"
    Config: ClassVar[type] = PTuningV2Config
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "causal_lm", "chat", "preference"})  # no encoder-decoder
    # The prefix reaches attention through a Cache, and transformers reads packed rows only without one.
    packing: ClassVar[bool] = False

    def __init__(self, cfg: PTuningV2Config) -> None:
        self.cfg = cfg

    def start_exact(self, task) -> dict | None:
        # A prefix under the joint softmax always takes attention mass: only zero-init attention starts exact.
        return {"zero_init_attention": True}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        c = self.cfg
        return attach_prefix(model, self.name, num_virtual_tokens=c.num_virtual_tokens,
                             projection_dim=c.projection_dim if c.prefix_projection else None, dropout=c.dropout,
                             zero_init_attention=c.zero_init_attention, shift_positions=c.shift_positions,
                             train_pooler=c.train_pooler, pooling=c.pooling, task=ctx.task)

    def hf_export(self, model: nn.Module) -> HFExport:
        return hf_export_prefix(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict] | None:
        return prefix_param_groups(model, lr, self.cfg.head_lr)
