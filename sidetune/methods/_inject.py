"""Shared plumbing for methods: freezing, finding target layers, swapping a child module."""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from sidetune.anatomy import LINEAR_TYPES, linear_features
from sidetune.portable.common import Switchable, WrappedLinear, to_input

__all__ = ["LINEAR_TYPES", "WrappedLinear", "find_targets", "float32_linear", "freeze", "head_module_names",
           "linear_features", "module_device", "replace_module", "to_input"]


def freeze(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze the task head that the loader initialised from scratch.

    `models.load_model` records those modules (e.g. BERT's `classifier`, Llama's `score`) in `model.sidetune_head`:
    a random head that stayed frozen would make any method useless, and it is part of every method's trainable set.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for name in head_module_names(model):
        for p in model.get_submodule(name).parameters():
            if p.is_floating_point():
                p.requires_grad_(True)


def head_module_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "sidetune_head", ()))


@contextlib.contextmanager
def parts_off(model: nn.Module):
    """Every `Switchable` part of `model` off for the duration (the reference model of a DPO step)."""
    parts = [m for m in model.modules() if isinstance(m, Switchable)]
    for m in parts:
        m.off = True
    try:
        yield
    finally:
        for m in parts:
            m.off = False


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers to wrap. Each entry of `targets` is one of:

    - "all-linear": every linear layer except the output embedding and the task head (as in QLoRA);
    - "re:<pattern>": a regular expression that must match the full module name;
    - a name: a layer matches when its name equals it or ends with "." + it (q_proj, attention.self.query).
    """
    excluded = set(head_module_names(model))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES) or not name:
            continue
        for t in targets:
            if t == "all-linear":
                hit = module is not out_emb and not any(name == h or name.startswith(h + ".") for h in excluded)
            elif t.startswith("re:"):
                hit = re.fullmatch(t[3:], name) is not None
            else:
                hit = name == t or name.endswith("." + t)
            if hit:
                names.append(name)
                break
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_device(layer: nn.Module) -> torch.device:
    """The device of a wrapped layer, where its trainable neighbours are created.

    Trainable parts are always created in float32 (master weights): a 4-bit or 8-bit base stores integer weights,
    and a bf16 base trains badly with bf16 updates. Autocast runs their matmuls in the compute dtype.
    """
    return next(layer.parameters()).device


def is_quantized_linear(module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and hasattr(module, "in_features") and not weight.is_floating_point()


def float32_linear(layer):
    """A float32 copy of a linear layer: dequantized from bitsandbytes 4-bit/8-bit storage, or upcast."""
    if not is_quantized_linear(layer):
        return layer.to(torch.float32)  # nn.Linear or GPT-2's Conv1D: upcast in place
    import bitsandbytes as bnb

    w = layer.weight
    if getattr(w, "quant_state", None) is not None:  # Params4bit (NF4 / FP4, with or without double quantization)
        weight = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    else:  # Int8Params: int8 rows with one absmax scale each
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        weight = bnb.functional.int8_vectorwise_dequant(w.data, scb)
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                    dtype=torch.float32)
    with torch.no_grad():
        new.weight.copy_(weight.reshape(layer.out_features, layer.in_features).float())
        if layer.bias is not None:
            new.bias.copy_(layer.bias.float())
    new.requires_grad_(False)
    return new
