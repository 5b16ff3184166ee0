"""Full fine-tuning: every floating-point parameter trains. The reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from sidetune.fields import opt
from sidetune.methods.base import Context, Method


@dataclass
class FullConfig:
    name: Literal["full"] = opt("full", "Selects this method.")


class Full(Method):
    name: ClassVar[str] = "full"
    Config: ClassVar[type] = FullConfig

    def __init__(self, cfg: FullConfig) -> None:
        self.cfg = cfg

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        for p in model.parameters():
            # Quantized (uint8/int8) weights cannot take gradients; a 4-bit base makes `full` train the rest.
            p.requires_grad_(p.is_floating_point())
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the trained weights are the model's own: nothing to fold
