"""Where a classifier reads: pool the final hidden states one way, then the model's own (new) classification layer
and the loss transformers would compute. Shared by the methods that choose their readout (LST, the prefix methods).

transformers' heads pool one fixed way: BERT's reads its pooler, tanh(W h_[CLS] + b), a layer trained for another
objective or not at all (all-MiniLM-L6-v2 is a sentence-transformers model, trained to pool by mean); Llama's reads the
last real token. A method that keeps that pooler frozen inherits its squashing, so these methods may instead pool the
last hidden states themselves and hand the pooled vector straight to the classification layer (`classifier`,
`score`, ...), which every method trains from scratch anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from sidetune.portable.common import POOLINGS, head_logits, pool
from sidetune.tasks import HEAD_NAMES

__all__ = ["POOLINGS", "classifier_name", "classify", "pool"]


def classifier_name(model: nn.Module) -> str | None:
    """The attribute of `model` that holds its classification layer (None: the model has none)."""
    return next((n for n in HEAD_NAMES if hasattr(model, n)), None)


def classify(model: nn.Module, pooled: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
    """Logits from `model`'s classification layer on the pooled vectors, and the loss its own forward would take
    (regression, single- or multi-label, from config.problem_type or the label dtype)."""
    logits = head_logits(getattr(model, classifier_name(model)), pooled)
    loss = None
    if labels is not None:
        n = logits.shape[-1]
        kind = model.config.problem_type or (
            "regression" if n == 1 else
            "single_label_classification" if not labels.is_floating_point() else "multi_label_classification")
        if kind == "regression":
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
        elif kind == "single_label_classification":
            loss = F.cross_entropy(logits.float(), labels)
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return SequenceClassifierOutput(loss=loss, logits=logits)
