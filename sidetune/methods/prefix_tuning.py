"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): per-layer key/value prefixes produced by a reparameterization
MLP, trained with the language model frozen.

Each attention layer l attends to P trainable key/value vectors before the sequence (one softmax over both):

    head_l(x) = softmax(q [K_l^p ; K_x]^T / sqrt(d)) [V_l^p ; V_x].

The prefix is not trained directly: Li & Liang found that unstable, and reparameterize it (their eq. 5) as

    [K^p ; V^p]  =  MLP(E)  =  W_2 tanh(W_1 E + b_1) + b_2,     E in R^{P x d}, W_1: d -> h, W_2: h -> L * 2 * d,

(d the key/value width). The MLP only shapes training: afterwards the P x (L*2*d) table it outputs is the whole
prefix (`materialize` drops E and the MLP). That reparameterization is what sets this method apart from
`ptuning_v2`, which by default trains the table itself; the two share their machinery (sidetune/methods/_prefix.py:
the read-only prefix KV cache, masks, positions, zero-init attention, gradient checkpointing, generation).

Defaults follow the paper's table-to-text setting: P = 10, h = 512. Only the prefix (and a new task head) trains.

Learning rate. The MLP makes the prefix move fast: one Adam step changes each W_2 entry by about lr, so each prefix
entry by about lr x h x |tanh| (h = 512 terms). Li & Liang train at 5e-5 - 8e-5. On MiniLM / SST-2 lr 1e-3 doubled
the prefix keys' scale within 20 steps, and the run ended at chance with logits that barely depended on the input;
at 1e-4 it trains (bench/RESULTS.md, 2026-12-02). A classifier trained from scratch wants a larger step than that:
`head_lr` gives it its own (recipes/sst2_prefix_tuning.yaml: 1e-2). `pooling` chooses what it reads
(sidetune/methods/_readout.py); the model's own head reads BERT's frozen pooler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from sidetune.fields import opt
from sidetune.methods._prefix import (
    HEAD_LR_HELP,
    POOLING_HELP,
    attach_prefix,
    check_prefix_config,
    hf_export_prefix,
    prefix_param_groups,
)
from sidetune.methods.base import Context, HFExport, Method


@dataclass
class PrefixTuningConfig:
    name: Literal["prefix_tuning"] = opt("prefix_tuning", "Selects this method.")
    num_virtual_tokens: int = opt(
        10, "Prefix length P: key/value vectors per layer (Li & Liang: 10 for table-to-text, 200 for summarization).")
    projection_dim: int = opt(
        512, "Hidden width h of the reparameterization MLP (Li & Liang: 512 for table-to-text, 800 for summaries).")
    dropout: float = opt(0.0, "Dropout on the prefix keys/values the MLP outputs (0 = off).")
    zero_init_attention: bool = opt(
        False,
        "false: prefix tuning as published, one softmax over [prefix; tokens]; step 0 differs from the base model. "
        "true: the prefix gets its own softmax and zero values at init (LLaMA-Adapter), so step 0 is exact.",
    )
    shift_positions: bool = opt(
        False, "Give the real tokens positions P..P+T-1 instead of 0..T-1 (what PEFT does; needed to match it).")
    train_pooler: bool = opt(
        False, "Also train the encoder's pooler (BERT's tanh dense over [CLS] that its classification head reads).")
    pooling: Literal["model", "mean", "first", "last"] = opt("model", POOLING_HELP)
    head_lr: float | None = opt(None, HEAD_LR_HELP)

    def __post_init__(self) -> None:
        check_prefix_config(self)


class PrefixTuning(Method):
    name: ClassVar[str] = "prefix_tuning"
    Config: ClassVar[type] = PrefixTuningConfig
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "causal_lm", "chat", "preference"})  # no encoder-decoder
    # The prefix reaches attention through a Cache, and transformers reads packed rows only without one.
    packing: ClassVar[bool] = False

    def __init__(self, cfg: PrefixTuningConfig) -> None:
        self.cfg = cfg

    def start_exact(self, task) -> dict | None:
        # Under the joint softmax any prefix takes attention mass: only zero-init attention starts exact.
        return {"zero_init_attention": True}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        c = self.cfg
        return attach_prefix(model, self.name, num_virtual_tokens=c.num_virtual_tokens,
                             projection_dim=c.projection_dim, dropout=c.dropout,
                             zero_init_attention=c.zero_init_attention, shift_positions=c.shift_positions,
                             train_pooler=c.train_pooler, pooling=c.pooling, task=ctx.task)

    def hf_export(self, model: nn.Module) -> HFExport:
        return hf_export_prefix(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict] | None:
        return prefix_param_groups(model, lr, self.cfg.head_lr)
