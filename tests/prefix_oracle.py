"""PEFT's prefix tuning as the oracle for the prefix methods (prefix_tuning, ptuning_v2), with our prefix's weights.

Classification: PEFT 0.21 refuses every *ForSequenceClassification of transformers 5 ("Model does not support past
key values"): it looks for a `past_key_values` parameter, which transformers renamed `cache`. There the oracle is
PEFT's FEATURE_EXTRACTION prefix tuning on a copy of the model's backbone (BertModel, LlamaModel), followed by the
classification model's own head, applied here as transformers' *ForSequenceClassification does (BERT: classifier
over the pooler output; Llama: score at the rightmost token that is not the pad token).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

TASK_TYPE = {"causal_lm": "CAUSAL_LM", "classification": "FEATURE_EXTRACTION"}


def _head(base, out, input_ids: torch.Tensor) -> torch.Tensor:
    if base.config.model_type == "bert":
        return base.classifier(out.pooler_output)  # eval mode: BERT's dropout before the classifier is off
    scores = base.score(out.last_hidden_state)
    last = (torch.arange(input_ids.shape[1]) * (input_ids != base.config.pad_token_id)).argmax(-1)
    return scores[torch.arange(input_ids.shape[0]), last]


def peft_prefix_reference(base, ours, task: str, batch: dict, projection_dim: int | None):
    """PEFT's output (.logits, .loss) for `batch`, with `ours`' prefix weights, on a copy of `base` (eval mode)."""
    import peft

    body = copy.deepcopy(base if task == "causal_lm" else base.base_model)
    ref = peft.get_peft_model(body, peft.PrefixTuningConfig(
        num_virtual_tokens=ours.num_virtual_tokens, prefix_projection=projection_dim is not None,
        encoder_hidden_size=projection_dim or 1, task_type=TASK_TYPE[task])).eval()
    encoder = ref.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(ours.prefix.embedding.weight)
        if projection_dim is not None:
            encoder.transform.load_state_dict(ours.prefix.transform.state_dict())
        if task == "causal_lm":
            return ref(**batch)
        out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = _head(base, out, batch["input_ids"])
    return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, batch["labels"]))
