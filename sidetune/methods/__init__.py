"""Fine-tuning methods behind one small protocol, and the explicit registry the config and the trainer read.

A method is a class with a `Config` dataclass (whose `name` field selects it) and `apply(model) -> module`:
freeze the backbone, add the trainable parts, return the module to train. Its `forward(**batch)` returns an object
with `.loss` (and `.logits`). The trainable set is whatever `apply` leaves with `requires_grad=True`; the optimizer and
every checkpoint read it back from there.

Optional capabilities the trainer asks for with `getattr`, so that the loop never branches on a method's name:
- `param_groups(model, lr) -> list[dict]`: optimizer parameter groups (LoRA+ gives B a larger learning rate).
- `backbone_trains: bool` (default True): False when no gradient flows through the backbone (LST), so the backbone
  may run in eval mode with dropout off and gradient checkpointing of it is pointless.
- `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)` on the returned module: transformers models have
  it; a method returning its own module defines it (P-tuning v2 checkpoints each block itself, keeping its prefix).
- `lm_hidden_states(**inputs)` on the returned module: final hidden states for the chunked LM loss (sidetune.losses).
- `plan_options: dict[str, dict]`: memory-cutting variants `sidetune plan` may propose, a description mapped to
  method-config overrides (LST: dropping ladder layers).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from torch import nn

from sidetune.methods.adapter import Adapter
from sidetune.methods.full import Full
from sidetune.methods.lora import LoRA
from sidetune.methods.lst import LST
from sidetune.methods.ptuning_v2 import PTuningV2


class Method(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg) -> None: ...

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the backbone, add the trainable parts, return the module to train."""
        ...


METHODS: dict[str, type[Method]] = {
    "full": Full,
    "lora": LoRA,
    "adapter": Adapter,
    "ptuning_v2": PTuningV2,
    "lst": LST,
}


def build_method(cfg) -> Method:
    """The method object for a method config (any of the METHODS' Config dataclasses)."""
    return METHODS[cfg.name](cfg)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable set, by parameter name: what the optimizer updates and a checkpoint stores."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
