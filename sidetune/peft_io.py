"""PEFT-format adapters, both ways: `sidetune export RUN --peft OUT` writes a run as `adapter_config.json` +
`adapter_model.safetensors` that `peft.PeftModel.from_pretrained(base, OUT)` loads (and so vLLM / TGI / any PEFT
consumer), and `method.init_from: PEFT_DIR` starts a LoRA run from such an adapter.

Why this is a renaming and nothing more: sidetune's LoRA layers hold `lora_A.weight` / `lora_B.weight` under the
wrapped layer's own name and compute W x + (alpha / r) B A x exactly as PEFT does, so a PEFT key is sidetune's
parameter name under the `base_model.model.` prefix. A freshly initialised task head (a classifier) is trained
whole; PEFT calls that `modules_to_save` and stores it under the same prefix.

Which methods export: those whose `Method.peft_config` says how (LoRA / QLoRA); the others refuse in one line. A run
whose init changed the frozen base (LoRA-GA, `Method.changed_base`) is converted to a plain rank-2r LoRA on the
original base, as PEFT itself converts LoRA-GA and PiSSA adapters (`_plain_lora`); a changed 4-bit base (LoftQ) is
saved, dequantized, as the adapter's base instead (`_dequantized_base`), as PEFT's LoftQ models are published.

What a LoRA server leaves out. vLLM (and servers like it) apply an adapter's LoRA target modules only: an adapter
that also carries whole trained modules (`modules_to_save`: a new classifier head, trained embeddings or LM head) or
DoRA magnitudes is served without them, as the base model plus the plain LoRA update, and no error says so (vllm
#55193). The export writes those parts where PEFT reads them (`modules_to_save` in adapter_config.json and their
weights under PEFT's key names; `use_dora` and each layer's `lora_magnitude_vector`), so
`PeftModel.from_pretrained` reproduces the run, and names them in one line (`unserved_parts`).

The base. `base_model_name_or_path` names a directory `from_pretrained` loads: the local checkpoint of a model
directory or of an alias (smollm2-135m: the converted copy in sidetune's cache). A preset (tiny-llama, ...) is random
weights that exist nowhere on disk, so its base is saved into OUT/base and named there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sidetune.errors import SidetuneError
from sidetune.methods._peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PREFIX", "export_peft", "peft_task_type"]


def peft_task_type(task) -> str:
    """PEFT's task_type for a sidetune Task (what AutoPeftModel picks the model class by)."""
    if task.classifies:
        return "SEQ_CLS"
    return "SEQ_2_SEQ_LM" if task.seq2seq else "CAUSAL_LM"


def export_peft(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run as a PEFT adapter directory (plus its tokenizer, and its base when that is a preset)."""
    from safetensors.torch import save_file

    from sidetune.methods import trainable_parameters
    from sidetune.models import PRESETS, _quiet_transformers, load_model, resolve_path
    from sidetune.rundir import export_target, open_run

    run = open_run(run_dir)
    cfg = run.cfg
    out = export_target(out, overwrite)
    s = run.load("cpu")
    config = s.method.peft_config(s.model)
    if config is None:
        raise SidetuneError(f"method {cfg.method.name!r} has no PEFT format (PEFT serves LoRA-style updates); serve "
                            f"the run with sidetune.load(RUN_DIR) instead")
    changed = s.method.changed_base(s.model)
    # A changed 4-bit base (LoftQ's Q): W - Q is not low-rank, so no LoRA on W reproduces the run. The adapter's
    # base is then Q itself, dequantized, as PEFT's LoftQ models are published; a 4-bit load of it requantizes to Q.
    own_base = any(not s.model.get_parameter(n).is_floating_point() for n in changed)
    base = None
    if not own_base and (cfg.model.name in PRESETS or changed):
        # The base exactly as loaded before the method: a preset's random weights exist nowhere else (same seed),
        # and a changed base (LoRA-GA) is converted against it.
        base = load_model(cfg.model, s.method.model_task(s.task), cfg.data.num_labels, "cpu",
                          s.tokenizer.pad_token_id, seed=cfg.train.seed)
    state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in trainable_parameters(s.model).items()}
    if own_base:
        base = _dequantized_base(s.model)
    elif changed:
        state, config = _plain_lora(s.model, base, changed, state, config)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.name in PRESETS or own_base:
        base_dir = out / "base"
        with _quiet_transformers():
            base.save_pretrained(base_dir)
        s.tokenizer.save_pretrained(base_dir)
        base_path = base_dir.resolve()
    else:
        base_path = resolve_path(cfg.model.name).resolve()
    config = {"peft_type": "LORA", "task_type": peft_task_type(s.task), "base_model_name_or_path": str(base_path),
              "inference_mode": True, "bias": "none", **config}
    save_file({PREFIX + n: t for n, t in state.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if s.tokenizer is not None:
        s.tokenizer.save_pretrained(out)
    if cfg.data.label_names:
        (out / "label_names.json").write_text(json.dumps(cfg.data.label_names) + "\n")
    parts = unserved_parts(s.model, config)
    if parts:
        print(f"sidetune: note: vLLM serves only the LoRA target modules of this adapter, not its {'; '.join(parts)} "
              f"(PEFT loads them: PeftModel.from_pretrained(base, {out})); to serve the run whole with vLLM, use "
              f"`sidetune export RUN --merge OUT`")
    return out


def _dequantized_base(model):
    """The run's model without its adapters, every quantized linear dequantized to float32 (in place: the trainable
    set was read first), saved as a plain float checkpoint."""
    from sidetune.methods._inject import WrappedLinear, float32_linear, is_quantized_linear, replace_module
    from sidetune.models import strip_quantization

    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, WrappedLinear):
                replace_module(model, name, module.base)
        for name, module in list(model.named_modules()):
            if is_quantized_linear(module):
                replace_module(model, name, float32_linear(module))
    strip_quantization(model)
    return model


def unserved_parts(model, config: dict) -> list[str]:
    """The parts of a PEFT LoRA export beyond its LoRA target modules, each named with what it is: the
    modules_to_save (the input embeddings, the LM head, the new task head, any other trained module) and DoRA's
    magnitude vectors."""
    modules = config.get("modules_to_save") or []
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    new = set(getattr(model, "sidetune_head", None) or [])

    def what(name: str) -> str:
        module = model.get_submodule(name)
        if module is embeddings:
            return "trained embeddings"
        if module is head:
            return "a trained LM head"
        return "the new task head" if name in new else "a trained module"

    parts = [f"modules_to_save {name} ({what(name)})" for name in modules]
    if config.get("use_dora"):
        count = sum(1 for n, _ in model.named_parameters() if n.endswith("lora_magnitude_vector"))
        parts.append(f"DoRA magnitudes (use_dora, lora_magnitude_vector on {count} layers: vLLM does not serve DoRA)")
    return parts


def _plain_lora(model, base, changed: list[str], state: dict[str, torch.Tensor],
                config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A run whose init moved the frozen base (LoRA-GA: W0 = W - D, D = s B0 A0) as a plain LoRA on the original W,
    as PEFT converts LoRA-GA and PiSSA adapters (`path_initial_model_for_weight_conversion`): rank 2r with
    A' = [A; A0], B' = [B, -B0], the same scaling (lora_alpha doubled; times sqrt(2) under rsLoRA), so that
    s B' A' = s B A - D and W + s B' A' = W0 + s B A. D is read from the stored base (W - W0, in float32) and
    factored by its top-r SVD: D has rank r, so any factorisation reproduces it up to float rounding."""
    from transformers.pytorch_utils import Conv1D

    r = config["r"]
    originals = dict(base.named_parameters())
    for name in changed:
        layer_name = name.removesuffix(".base.weight")
        layer = model.get_submodule(layer_name)
        original = originals.get(f"{layer_name}.weight")
        if original is None:
            raise SidetuneError(f"the base model has no {layer_name}.weight; cannot convert the run's changed base "
                                f"to PEFT's format; export it with --merge")
        d = original.detach().float() - model.get_parameter(name).detach().float()
        if isinstance(layer.base, Conv1D):  # Conv1D stores W as (in, out); LoRA's B A is (out, in)
            d = d.T
        u, sv, vh = torch.linalg.svd(d, full_matrices=False)
        b0, a0 = u[:, :r] * sv[:r] / layer.scaling, vh[:r]
        a_key, b_key = f"{layer_name}.lora_A.weight", f"{layer_name}.lora_B.weight"
        state[a_key] = torch.cat([state[a_key], a0]).contiguous()
        state[b_key] = torch.cat([state[b_key], -b0], dim=1).contiguous()
    rslora = config.get("use_rslora", False)
    config = {**config, "r": 2 * r, "lora_alpha": config["lora_alpha"] * (2**0.5 if rslora else 2)}
    return state, config
