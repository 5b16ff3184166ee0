"""Fine-tuning methods behind one small protocol (`base.Method`), and the explicit registry the config, the trainer,
the profile and the contract tests read. Adding a method is one file plus one line here.
"""

from __future__ import annotations

from sidetune.methods.adapter import Adapter
from sidetune.methods.base import Context, Method, trainable_parameters
from sidetune.methods.bitfit import BitFit
from sidetune.methods.full import Full
from sidetune.methods.ia3 import IA3
from sidetune.methods.lora import LoRA
from sidetune.methods.lst import LST
from sidetune.methods.pet import PET
from sidetune.methods.prefix_tuning import PrefixTuning
from sidetune.methods.prompt_tuning import PromptTuning
from sidetune.methods.ptuning_v1 import PTuningV1
from sidetune.methods.ptuning_v2 import PTuningV2

METHODS: dict[str, type[Method]] = {
    "full": Full,
    "lora": LoRA,
    "adapter": Adapter,
    "prompt_tuning": PromptTuning,
    "ptuning_v1": PTuningV1,
    "ptuning_v2": PTuningV2,
    "prefix_tuning": PrefixTuning,
    "lst": LST,
    "bitfit": BitFit,
    "ia3": IA3,
    "pet": PET,
}


def build_method(cfg) -> Method:
    """The method object for a method config (any of the METHODS' Config dataclasses)."""
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "Context", "Method", "build_method", "trainable_parameters"]
