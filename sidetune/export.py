"""`sidetune export RUN_DIR --merge OUT`: fold a run's LoRA updates into the base weights and save a plain Hugging Face
model + tokenizer, which `AutoModelFor*.from_pretrained(OUT)` loads with no sidetune, no PEFT and no bitsandbytes:
zero extra latency at inference.

On a 4-bit (QLoRA) or 8-bit base the merge is W' = dequantize(W_q) + (alpha / r) B A, computed in float32, then
cast to the export dtype. Why dequantize rather than reload the original high-precision W: the run trained and
evaluated the function W_q x + BAx. B A was fitted on top of W_q and partly compensates its rounding error, so
W + B A is a model nobody trained or evaluated (it differs from the run by W - W_q in every layer), while
dequantize(W_q) + B A reproduces the run's model up to float rounding (tests/test_export.py measures both). The
price: the exported weights keep NF4's rounding, so they are exactly as good as the 4-bit model, not better.

Only updates that are linear in the weights merge: LoRA (and full fine-tuning, which has nothing to merge).
Adapters, P-tuning v2 and LST add computation that no weight matrix can absorb; for them export fails with one line
and the run is served with `sidetune.load(RUN_DIR)`.

`sidetune export RUN_DIR --peft OUT` writes the run as a PEFT adapter instead (sidetune/peft_io.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished sidetune run (its directory or its final/ directory)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", metavar="OUT",
                      help="write the merged model + tokenizer here (a plain Hugging Face directory)")
    what.add_argument("--peft", metavar="OUT",
                      help="write a PEFT adapter here (adapter_config.json + adapter_model.safetensors, and the "
                           "tokenizer) that peft.PeftModel.from_pretrained(base, OUT) loads; LoRA / QLoRA runs")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the saved weights; auto = the dtype of the run's unquantized weights")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")


def run(args: argparse.Namespace) -> int:
    if args.peft is not None:
        import json

        from sidetune.peft_io import ADAPTER_CONFIG, export_peft

        out = export_peft(args.run_dir, args.peft, args.overwrite)
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        print(f"sidetune: PEFT adapter written to {out} (base: {config['base_model_name_or_path']})")
        return 0
    out = export_merged(args.run_dir, args.merge, args.dtype, args.overwrite)
    print(f"sidetune: merged model written to {out}")
    return 0


def export_merged(run_dir: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Merge the run's trained weights into its base model and save model + tokenizer to `out`. Returns `out`.
    A run whose init changed the base (LoRA-GA) merges into that changed base, as it trained: W - s B0 A0 + s B A."""
    import torch

    from sidetune.methods._inject import float32_linear, is_quantized_linear, replace_module
    from sidetune.models import _quiet_transformers
    from sidetune.rundir import export_target, open_run

    run = open_run(run_dir)
    out = export_target(out, overwrite)
    s = run.load("cpu")
    model, tokenizer = s.model, s.tokenizer

    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if is_quantized_linear(module):  # every layer of a 4/8-bit base, trained around or not
                replace_module(model, name, float32_linear(module))
        model = s.method.merge(model)  # one line and no output for a method whose update is not in the weights
    # After the merge: a method's wrapper (prefix, LST, PET) need not expose the input embeddings, and it refuses above.
    save_dtype = model.get_input_embeddings().weight.dtype if dtype == "auto" else getattr(torch, dtype)
    _strip_quantization(model)
    model.to(save_dtype)
    model.config.dtype = save_dtype
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _strip_quantization(model) -> None:
    """Forget that the model was loaded quantized, so that save_pretrained writes (and from_pretrained reads) a plain
    float checkpoint."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
