"""Checks of a run config against its model and its device that need no weights and no data: `session.build` runs
them first, so that a run the model or the device cannot carry out is refused in one line before anything is
loaded, and long before the trainer claims an output directory.

- mixed precision the device can run (fp16 autocast is CUDA's; on a CPU it would silently train in float32);
- the task against the architecture (a causal LM objective on an encoder, whose attention sees the whole row,
  would learn to copy the next token instead of predicting it);
- data.max_length against the positions a model with a learned position table has.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from sidetune import bnb_log
from sidetune.errors import SidetuneError
from sidetune.tasks import get_task

if TYPE_CHECKING:
    from sidetune.config import Config, ModelConfig

# Families whose position ids start after the padding id (RoBERTa's scheme): max_position_embeddings minus
# pad_token_id + 1 positions are usable (RoBERTa-base: 514 - 2 = 512).
PADDING_OFFSET_POSITIONS = frozenset({
    "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
    "xmod", "ibert", "mpnet", "esm",
})


def check_run(cfg: Config, device: torch.device | str, precision: bool = True) -> None:
    """Every check below; `session.build` calls this before loading a tokenizer, data or weights. precision: check
    the mixed precision too (a build that trains on this device; a reload for eval or export does not)."""
    if bnb_log.used_by(cfg.model.quantize, cfg.train.optimizer):
        bnb_log.release()  # its import-time warnings concern this run: print them now
    if precision:
        check_precision(cfg, torch.device(device))
    config = model_config(cfg.model)
    if config is None:
        return  # an unreadable model directory: load_model says why, in one line
    check_task(cfg, config)
    check_positions(cfg, config)


def model_config(m: ModelConfig) -> Any | None:
    """The transformers config of model.name (a preset's, or the directory's config.json), or None if unreadable."""
    from transformers import AutoConfig

    from sidetune.models import PRESETS, resolve_path

    if m.name in PRESETS:
        model_type, kwargs, _ = PRESETS[m.name]
        return AutoConfig.for_model(model_type, **kwargs)
    try:
        return AutoConfig.from_pretrained(resolve_path(m.name))
    except SidetuneError:
        raise
    except Exception:
        return None


def check_precision(cfg: Config, device: torch.device) -> None:
    """fp16 autocast runs on CUDA only: accelerate on a CPU trains in float32 while the saved config says fp16.
    bf16 on a GPU without bf16 support fails at the first step."""
    t = cfg.train
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION") if t.mixed_precision == "auto" else None
    mp = t.mixed_precision if t.mixed_precision != "auto" else launched
    where = "train.mixed_precision=" if t.mixed_precision != "auto" else "the accelerate config's mixed_precision: "
    if mp == "fp16" and device.type != "cuda":
        raise SidetuneError(f"{where}fp16 needs a CUDA GPU: on {device.type} it would train in float32; use "
                            f"train.mixed_precision=bf16 (CPU autocast) or no")
    if mp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SidetuneError(f"{where}bf16 needs a GPU with bfloat16 support, and {torch.cuda.get_device_name(device)} "
                            f"has none; use train.mixed_precision=fp16 or no")


def is_encoder(config: Any) -> bool:
    """An encoder-only model: bidirectional attention over the whole row (BERT, RoBERTa, DeBERTa, ...). The
    BERT-family causal-LM classes attend causally only when the config says is_decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
            and not getattr(config, "is_decoder", False))


def check_task(cfg: Config, config: Any) -> None:
    task = get_task(cfg.data.task)
    if task.shift_labels and is_encoder(config):
        raise SidetuneError(f"data.task={task.name} needs a decoder, and model.name={cfg.model.name} is an encoder "
                            f"({config.model_type}) whose attention sees the whole row, so it would learn to copy the "
                            f"next token instead of predicting it; use a decoder (e.g. smollm2-135m, tiny-llama) or "
                            f"data.task=classification")


def max_positions(config: Any) -> int | None:
    """How many positions a model can encode, or None when it has no learned position table that limits it (rotary,
    relative or ALiBi positions: those may run longer than they were trained on, so sidetune leaves that to the
    user)."""
    rotary = any(getattr(config, k, None) for k in ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim",
                                                      "partial_rotary_factor"))
    if rotary or getattr(config, "position_biased_input", True) is False:
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if config.model_type in PADDING_OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_positions(cfg: Config, config: Any) -> None:
    limit = max_positions(config)
    if limit is not None and cfg.data.max_length > limit:
        raise SidetuneError(f"data.max_length={cfg.data.max_length} is longer than model.name={cfg.model.name} can "
                            f"read: its position table has {limit} positions ({config.model_type}); use "
                            f"data.max_length <= {limit}")
