"""`sidetune export RUN_DIR --hf OUT`: any run as a self-contained transformers directory that loads without sidetune:

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)      (a classifier run: ...ForSequenceClassification)

OUT holds config.json (the base model's config as `text_config`, the method's forward-time settings as `sidetune`,
and `auto_map` naming the modeling code), model.safetensors, the modeling code (sidetune/portable/: the very modules
sidetune trains with, which import nothing of sidetune), the tokenizer with its chat template and the base model's
generation config. A method that cannot merge says what it adds at forward time (`Method.hf_export`); a method whose
update lives in the weights (LoRA, IA3, BitFit, full) is merged instead and OUT is a plain transformers directory.

The base model's weights: a 4-bit or 8-bit base is dequantized (the weights the run trained against, as `--merge`
does) and saved in `--dtype`. The method's own parts stay float32, as they trained. The directory is written beside
OUT and renamed into place, so a failure leaves nothing behind, and OUT is replaced only if it is empty or an earlier
`--hf` export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sidetune.errors import SidetuneError

MARK = "sidetune_export.json"  # written last into OUT: says that sidetune wrote the directory (and may replace it)
MODEL_TYPE = "sidetune"


def check_target(out: str | Path, overwrite: bool) -> Path:
    """OUT may be new, empty, or (with --overwrite) an earlier --hf export; anything else is refused in one line."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SidetuneError(f"export target {str(out)!r} is a file; pick a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARK).is_file():
            raise SidetuneError(f"export target {str(out)!r} holds files that are not an earlier `sidetune export "
                                f"--hf`; pick a new or an empty directory")
        if not overwrite:
            raise SidetuneError(f"export target {str(out)!r} holds an earlier export; pick a new directory or pass "
                                f"--overwrite to replace it")
    return out


def export_hf(run_dir: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False,
              base_ref: bool = False) -> tuple[Path, str]:
    """Write the run as a self-contained transformers directory at `out`. Returns (out, one line saying what the
    base weights are and how large the directory is).

    base_ref: store only what the run changed (the method's tensors, a trained head, adapters) and refer to the base
    model's directory, which the exported model loads as the run did (4-bit with bitsandbytes for a Q-LST run, so
    the loading Python needs bitsandbytes then)."""
    from sidetune.methods._inject import float32_linear, is_quantized_linear, replace_module
    from sidetune.models import PRESETS, resolve_path
    from sidetune.rundir import open_run

    out = check_target(out, overwrite)
    run = open_run(run_dir)
    base_dir = None
    if base_ref:
        if dtype != "auto":
            raise SidetuneError("--dtype sets the dtype of copied base weights; with --base-ref the base loads from "
                                "its directory as the run loaded it: drop one of the two")
        if run.cfg.model.name in PRESETS:
            raise SidetuneError(f"--base-ref: model.name={run.cfg.model.name} is a random-init preset, not a "
                                f"directory to refer to; export the weights (drop --base-ref)")
        base_dir = resolve_path(run.cfg.model.name).resolve()
    s = run.load("cpu")
    exported = s.method.hf_export(s.model)
    if exported is not None and base_dir is not None:
        return out, _export_base_ref(s, exported, out, base_dir, run.cfg.method.name)
    if exported is None:  # the update is in the weights: the merged model is a plain transformers directory
        if base_dir is not None:
            raise SidetuneError(f"--base-ref writes methods that cannot merge; a {run.cfg.method.name} run merges "
                                f"into its base: use --hf without --base-ref, or --peft for an adapter that refers "
                                f"to the base")
        model = merge_model(s, dtype)
        size = _commit(out, lambda d: (model.save_pretrained(d), s.tokenizer.save_pretrained(d)),
                       {"method": run.cfg.method.name, "kind": "merged"})
        return out, f"merged model written to {out} ({model.dtype}, {size / 2**20:.1f} MiB)"

    backbone = exported.backbone
    quantized = [n for n, m in backbone.named_modules() if is_quantized_linear(m)]
    with torch.no_grad():
        for name in quantized:
            replace_module(backbone, name, float32_linear(backbone.get_submodule(name)))
    save_dtype = backbone.get_input_embeddings().weight.dtype if dtype == "auto" else getattr(torch, dtype)
    if dtype == "auto" and quantized:  # 4-bit storage has no float dtype of its own: the compute dtype's
        save_dtype = torch.float32 if s.cfg.model.dtype in (None, "auto", "float32") else getattr(torch,
                                                                                                   s.cfg.model.dtype)
    model = _build(backbone, exported, s.cfg.data.task, save_dtype)
    if getattr(backbone, "generation_config", None) is not None:  # a causal LM's defaults (eos, sampling)
        model.generation_config = backbone.generation_config

    def write(d: Path) -> None:
        from sidetune.models import _quiet_transformers

        with _quiet_transformers():
            model.save_pretrained(d)
        s.tokenizer.save_pretrained(d)

    size = _commit(out, write, {"method": run.cfg.method.name, "kind": exported.spec["kind"]})
    base = (f"4-bit base dequantized to {str(save_dtype).removeprefix('torch.')}" if quantized
            else f"base in {str(save_dtype).removeprefix('torch.')}")
    return out, (f"{run.cfg.method.name} run written to {out}: {base}, {size / 2**20:.1f} MiB; load it with "
                 f"trust_remote_code=True")


def _export_base_ref(s, exported, out: Path, base_dir: Path, method: str) -> str:
    """--base-ref: config.json names the base directory and how the run loaded it; model.safetensors holds the
    method's tensors and the backbone's parameters the run trained or changed (a task head, adapters, a changed
    base), nothing else of the base."""
    from sidetune.methods._inject import head_module_names
    from sidetune.models import _bnb_config

    backbone = exported.backbone
    keep = {id(p) for p in s.model.parameters() if p.requires_grad}
    keep |= {id(s.model.get_parameter(n)) for n in s.method.changed_base(s.model)}
    keep |= {id(p) for name in head_module_names(backbone) for p in backbone.get_submodule(name).parameters()}
    saved = [n for n, p in backbone.named_parameters() if id(p) in keep]
    quant = _bnb_config(s.cfg.model, torch.device("cpu"))
    dtype = backbone.get_input_embeddings().weight.dtype
    exported.spec["base_ref"] = {
        "path": str(base_dir), "dtype": str(dtype).removeprefix("torch."), "saved": saved,
        "quantization": quant.to_dict() if quant is not None else None}
    model = _build(backbone, exported, s.cfg.data.task, dtype, state_only=saved)
    if getattr(backbone, "generation_config", None) is not None:
        model.generation_config = backbone.generation_config
    state = {f"backbone.{n}": backbone.get_parameter(n).detach().float() for n in saved}
    state |= {k: v.detach().float().contiguous() for k, v in exported.tensors.items()}

    def write(d: Path) -> None:
        from sidetune.models import _quiet_transformers

        with _quiet_transformers():
            model.save_pretrained(d, state_dict=state)
        s.tokenizer.save_pretrained(d)

    size = _commit(out, write, {"method": method, "kind": exported.spec["kind"], "base_ref": str(base_dir)})
    how = "4-bit with bitsandbytes, as the run did" if quant is not None else str(dtype).removeprefix("torch.")
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return (f"{method} run written to {out}: base referred to at {base_dir} (loaded {how}), the run's own tensors "
            f"{weights / 2**20:.2f} MiB ({size / 2**20:.1f} MiB with tokenizer and code); load it with "
            f"trust_remote_code=True")


def _build(backbone: torch.nn.Module, exported, task: str, dtype: torch.dtype, state_only: list[str] | None = None):
    """The exported transformers model (sidetune/portable/modeling_sidetune.py) holding the run's tensors: the
    backbone's in `dtype`, the method's own in float32."""
    from sidetune.portable.modeling_sidetune import (
        SidetuneConfig,
        SidetuneForCausalLM,
        SidetuneForSequenceClassification,
    )

    text = backbone.config.to_dict()
    text.pop("quantization_config", None)
    text["dtype"] = str(dtype).removeprefix("torch.")
    for key in ("_name_or_path", "architectures", "auto_map"):
        text.pop(key, None)
    cls = SidetuneForSequenceClassification if task == "classification" else SidetuneForCausalLM
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    config = SidetuneConfig(text_config=text, sidetune=exported.spec, architectures=[cls.__name__])
    config.text_config._attn_implementation = backbone.config._attn_implementation
    model = cls(config).eval()
    if state_only is not None:  # --base-ref: the config and code only; the caller saves its own state dict
        SidetuneConfig.register_for_auto_class()
        cls.register_for_auto_class(auto)
        return model
    state = {f"backbone.{k}": (v.to(dtype) if v.is_floating_point() else v)
             for k, v in backbone.state_dict().items()}
    state |= {k: v.detach().float() for k, v in exported.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a method's hf_export and the modeling code disagree: a sidetune bug, not user input
        raise RuntimeError(f"export --hf: the exported model does not fit the run (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.to(dtype)
    fp32 = cls._keep_in_fp32_modules_strict
    for name, t in model.named_parameters():  # the method's parts, as they trained
        if any(part in name for part in fp32):
            t.data = t.data.float()
    config.dtype = dtype
    SidetuneConfig.register_for_auto_class()
    cls.register_for_auto_class(auto)
    return model


def _commit(out: Path, write, mark: dict) -> int:
    """Write into a temporary directory beside `out`, then swap it in (an earlier export at `out` is removed only
    after the new one is complete). Returns the bytes written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUT gets the permissions a plain mkdir would give
    try:
        write(tmp)
        (tmp / MARK).write_text(json.dumps({"written_by": "sidetune", **mark}) + "\n")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
        return size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_model(s, dtype: str = "auto"):
    """The loaded run `s` (a session.Setup) as a plain transformers model: quantized layers dequantized, the method's
    update merged (one line and no output for a method whose update is not in the weights), cast to `dtype`."""
    import torch

    from sidetune.methods._inject import float32_linear, is_quantized_linear, replace_module
    from sidetune.models import strip_quantization

    model = s.model
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if is_quantized_linear(module):  # every layer of a 4/8-bit base, trained around or not
                replace_module(model, name, float32_linear(module))
        model = s.method.merge(model)
    # After the merge: a method's wrapper (prefix, LST, PET) need not expose the input embeddings, and it refuses above.
    save_dtype = model.get_input_embeddings().weight.dtype if dtype == "auto" else getattr(torch, dtype)
    strip_quantization(model)
    model.to(save_dtype)
    model.config.dtype = save_dtype
    return model
