"""PEFT's adapter format for sidetune's LoRA (no other sidetune import, so methods can use it): the LoRA fields of
adapter_config.json, and loading a PEFT adapter into a freshly wrapped model (`method.init_from`). The export command
that writes whole adapter directories is sidetune/peft_io.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sidetune.errors import SidetuneError

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lora_peft_config(model: nn.Module, layers: dict[str, nn.Module], r: int, alpha: float, dropout: float,
                     rslora: bool, fan_in_fan_out: bool) -> dict[str, Any]:
    """The LoRA fields of adapter_config.json for a model whose wrapped layers are `layers` (name -> LoRA layer)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    # PEFT matches target names as suffixes: the short leaf names when they pick exactly the wrapped layers.
    same = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves} == set(layers)
    lora_params = {f"{n}.{w}" for n in layers for w in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    others = sorted({n.rsplit(".", 1)[0] for n in _trainable(model) if n not in lora_params})
    return {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
            "target_modules": leaves if same else sorted(layers), "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": others or None}


def load_peft_adapter(model: nn.Module, path: str | Path, r: int, alpha: float, rslora: bool) -> None:
    """Copy a PEFT LoRA adapter's weights into a model LoRA has just wrapped (`method.init_from`). The adapter must
    have this run's rank, alpha and scaling, and its LoRA layers must be exactly this run's targets."""
    from safetensors.torch import load_file

    key = "method.init_from"
    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise SidetuneError(f"{key}={str(path)!r} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS})")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise SidetuneError(f"{key}: the adapter is {config.get('peft_type')}{' with DoRA' if config.get('use_dora') else ''}"
                            f"; only plain LoRA adapters can start a lora run")
    for name, theirs, ours in (("r", config.get("r"), r), ("alpha", config.get("lora_alpha"), alpha),
                               ("rslora", bool(config.get("use_rslora")), rslora)):
        if theirs != ours and not (isinstance(theirs, (int, float)) and float(theirs) == float(ours)):
            raise SidetuneError(f"{key}: the adapter has {'lora_' if name == 'alpha' else ''}{name}={theirs} but "
                                f"this run has method.{name}={ours}; set method.{name}={theirs}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SidetuneError(f"{key}: the adapter sets per-layer ranks or alphas (rank_pattern / alpha_pattern), "
                            f"which sidetune's LoRA does not have")
    state = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    trainable = _trainable(model)
    ours_lora = {n for n in trainable if ".lora_" in n}
    theirs_lora = {n for n in state if ".lora_" in n}
    if ours_lora != theirs_lora:
        extra, missing = sorted(theirs_lora - ours_lora), sorted(ours_lora - theirs_lora)
        raise SidetuneError(f"{key}: the adapter's LoRA layers differ from this run's method.targets (adapter "
                            f"only: {[n.rsplit('.', 2)[0] for n in extra[:2]]}, run only: "
                            f"{[n.rsplit('.', 2)[0] for n in missing[:2]]}); set method.targets to the adapter's "
                            f"target_modules {config.get('target_modules')}")
    unknown = sorted(set(state) - set(trainable))
    if unknown:
        raise SidetuneError(f"{key}: the adapter holds {unknown[0]!r}, which this run does not train")
    with torch.no_grad():
        for name, tensor in state.items():
            if trainable[name].shape != tensor.shape:
                raise SidetuneError(f"{key}: {name} has shape {tuple(tensor.shape)} in the adapter but "
                                    f"{tuple(trainable[name].shape)} here; is it for another base model?")
            trainable[name].copy_(tensor)
