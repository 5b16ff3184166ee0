"""Small pieces the portable modules and sidetune's methods share (torch only)."""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("first", "last", "mean")


def to_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input of a trainable fp32 layer beside a frozen (maybe bf16) model: without autocast it must be cast to
    the layer's dtype; under autocast the matmul casts for itself."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)


class WrappedLinear(nn.Module):
    """Base of a module that replaces a linear layer and keeps it as `self.base` (LoRA, a sequential adapter).

    Some modeling code reads a projection's weight directly (T5 checks `wo.weight.dtype`): answer for the wrapped layer.
    """

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) -> (B, d): the first position, the mean over real tokens, or the rightmost real token (left or right
    padding alike)."""
    if how == "first":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if attention_mask is None:
        return hidden[:, -1]
    pos = torch.arange(hidden.shape[1], device=hidden.device)
    last = (pos * attention_mask.to(pos.dtype)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def head_logits(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A classification layer's logits on pooled vectors. RoBERTa's and ELECTRA's heads read token 0 of a sequence:
    they get the pooled vector as a sequence of one."""
    pooled = pooled.to(next(head.parameters()).dtype)
    if isinstance(head, nn.Linear):
        return head(pooled)
    logits = head(pooled[:, None])
    return logits[:, 0] if logits.dim() == 3 else logits


class Switchable:
    """A method's part that a preference run's reference forward switches off (sidetune's `parts_off`): while `off`
    is set, the module computes its frozen base alone."""

    off: bool = False
