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

from sidetune.errors import SidetuneError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished sidetune run (its directory or its final/ directory)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", metavar="OUT",
                      help="write the merged model + tokenizer here (a plain Hugging Face directory)")
    what.add_argument("--hf", metavar="OUT",
                      help="write a self-contained transformers directory here (config, safetensors, modeling code, "
                           "tokenizer) that AutoModelFor*.from_pretrained(OUT, trust_remote_code=True) loads without "
                           "sidetune; every method (LST, Q-LST, adapters, prefix and prompt methods; LoRA merged)")
    what.add_argument("--peft", metavar="OUT",
                      help="write a PEFT adapter here (adapter_config.json + adapter_model.safetensors, and the "
                           "tokenizer) that peft.PeftModel.from_pretrained(base, OUT) loads; LoRA / QLoRA runs")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the saved weights; auto = the dtype of the run's unquantized weights")
    p.add_argument("--base-ref", action="store_true",
                   help="--hf: do not copy the base model's weights; OUT refers to the base model's directory and "
                        "loads it as the run did (a 4-bit run: with bitsandbytes)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into OUT even if it is not empty (--hf: only over an earlier --hf export)")


def run(args: argparse.Namespace) -> int:
    if args.peft is not None:
        import json

        from sidetune.peft_io import ADAPTER_CONFIG, export_peft

        out = export_peft(args.run_dir, args.peft, args.overwrite)
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        print(f"sidetune: PEFT adapter written to {out} (base: {config['base_model_name_or_path']})")
        return 0
    if args.base_ref and args.hf is None:
        raise SidetuneError("--base-ref applies to --hf only; add --hf OUT, or drop --base-ref")
    if args.hf is not None:
        from sidetune.hf_export import export_hf

        _, line = export_hf(args.run_dir, args.hf, args.dtype, args.overwrite, args.base_ref)
        print(f"sidetune: {line}")
        return 0
    out = export_merged(args.run_dir, args.merge, args.dtype, args.overwrite)
    print(f"sidetune: merged model written to {out}")
    return 0


def export_merged(run_dir: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Merge the run's trained weights into its base model and save model + tokenizer to `out`. Returns `out`.
    A run whose init changed the base (LoRA-GA) merges into that changed base, as it trained: W - s B0 A0 + s B A."""
    from sidetune.hf_export import merge_model
    from sidetune.models import _quiet_transformers
    from sidetune.rundir import export_target, open_run

    run = open_run(run_dir)
    out = export_target(out, overwrite)
    s = run.load("cpu")
    model = merge_model(s, dtype)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(out)
    s.tokenizer.save_pretrained(out)
    return out
