"""Causal-LM loss in chunks, so that the B x T x V logits tensor never exists (offered to every method).

At a large vocabulary the logits are the largest activation of a training step: Llama-3's 128k vocabulary at
4 x 1024 tokens is 2 GiB in fp32, twice that with its gradient. The loss here

1. keeps only the positions that carry a label (a prompt/completion batch trains on a fraction of its tokens),
2. runs the LM head and cross-entropy on `chunk_size` positions at a time under activation checkpointing, so only
   one chunk's logits are alive at once and backward recomputes them.

The result equals transformers' `ForCausalLMLoss` (mean over labelled next-token positions).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sidetune.distributed import ShardsLikeInner


@runtime_checkable
class LMHiddenStates(Protocol):
    """A trained module that gives the final hidden states itself, for the chunked LM loss to apply the head to."""

    def lm_hidden_states(self, **inputs) -> torch.Tensor: ...


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # fp32 log-softmax: bf16 loses the small probabilities
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int,
                           softcap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels` (-100 = ignore), `chunk_size` rows at a time.
    `softcap`: the model's final-logit soft-capping (Gemma 2: cap * tanh(logits / cap)), applied as its forward does."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_loss, head, rows[start:end], targets[start:end], softcap,
                                   use_reentrant=False)
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # a batch with no labelled token: loss 0 (not NaN) that backward still accepts
    return total / targets.numel()


class ChunkedLMLoss(ShardsLikeInner, nn.Module):
    """Wraps a causal LM so that its forward returns the chunked loss.

    The wrapped module is either a transformers CausalLM (its body is `base_model`) or a method's own module that
    declares the capability `lm_hidden_states(**inputs) -> final hidden states` (LST adds its side network there).
    The forward goes through this module, so accelerate's DDP wrapper sees every call.
    """

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def _inner(self) -> nn.Module:
        return self.model

    def forward(self, labels: torch.Tensor | None = None, **inputs):
        if isinstance(self.model, LMHiddenStates):  # a method's own module (LST adds its side network there)
            hidden = self.model.lm_hidden_states(**inputs)
        else:
            hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        # Gemma 2 caps its logits in its CausalLM forward, after the head: the chunks must too.
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if labels is None:
            logits = head(hidden)
            return LMOutput(loss=None, logits=torch.tanh(logits / softcap) * softcap if softcap else logits)
        return LMOutput(loss=chunked_causal_lm_loss(hidden, head, labels, self.chunk_size, softcap), logits=None)


class LMOutput(dict):
    """A minimal ModelOutput: attribute and key access to loss / logits."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None
