"""Memory bench: `sidetune profile` of every method and PEFT references, in one run, with ratios.

    python bench/memory.py                           # CUDA: llama-1b 8x512 and llama-8b 4x1024 (random-init shapes)
    python bench/memory.py --device cpu --tiny       # CPU: tiny-llama 4x64, proves the code path without a GPU

Every row runs in its own process through sidetune's own step (`sidetune.profile.measure`): the sidetune rows are
the `profile` rows of every registered method (plus qlora, qlst), the no-grad floor(s) and full fine-tuning; the
reference rows are HF PEFT models built on the very same base model (sidetune's loader, same quantization), trained
with the very same step (autocast, AdamW, clipping):

    peft-lora          LoraConfig(q_proj, v_proj, r=8, alpha=16)          vs sidetune lora (same targets, r, alpha)
    peft-prefix        PrefixTuningConfig(num_virtual_tokens=20)          vs sidetune ptuning_v2 (20 tokens if it
                                                                             has such a field)
    peft-qlora         LoraConfig(all-linear, r=16, alpha=32) on nf4      vs sidetune qlora-all-r16
    peft-qlora-gc      the same + gradient checkpointing                  vs sidetune qlora-all-r16-gc

(`prepare_model_for_kbit_training` is not applied: it upcasts the embeddings and the head to fp32, a different
base.) Measured peaks are torch.cuda.max_memory_allocated on CUDA and the CPU allocator's peak on CPU; each row also
carries sidetune's fake-tensor prediction. Results go to bench/out/memory-<device>/ (results.json, results.md, and a
profile.{json,md,png} per shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidetune.profile import (  # noqa: E402
    GiB,
    MiB,
    RowSpec,
    markdown_table,
    peak_of,
    reading,
    resolve_rows,
    run_isolated,
    write_reports,
)

CUDA_SHAPES = [("llama-1b", 8, 512), ("llama-8b", 4, 1024)]
TINY_SHAPES = [("tiny-llama", 4, 64)]
PREFIX_TOKENS = 20
# (sidetune row, PEFT row) pairs whose peaks the bench compares: sidetune should be within 5% of PEFT, or below.
PAIRS = [("lora", "peft-lora"), ("ptuning_v2", "peft-prefix"), ("qlora-all-r16", "peft-qlora"),
         ("qlora-all-r16-gc", "peft-qlora-gc")]
PEFT_ROWS = ("peft-lora", "peft-prefix", "peft-qlora", "peft-qlora-gc")


def sidetune_specs(model: str, batch: int, seq: int) -> list[RowSpec]:
    """The profile's rows plus the sidetune twins of the PEFT references."""
    from sidetune.methods import METHODS

    specs = resolve_rows("all", model, "causal_lm", batch, seq, [])
    if "lora" in METHODS:
        qlora = next(s for s in specs if s.label == "qlora")
        extra = ["method.targets=[all-linear]", "method.r=16", "method.alpha=32"]
        specs.append(RowSpec("qlora-all-r16", "lora", [*qlora.overrides, *extra]))
        specs.append(RowSpec("qlora-all-r16-gc", "lora", [*qlora.overrides, *extra, "train.gradient_checkpointing=true"]))
    if "ptuning_v2" in METHODS:
        spec = next(s for s in specs if s.label == "ptuning_v2")
        names = {f.name for f in dataclasses.fields(METHODS["ptuning_v2"].Config)}
        for name in ("num_virtual_tokens", "num_tokens", "prefix_length", "prefix_len", "n_prefix", "length"):
            if name in names:
                spec.overrides.append(f"method.{name}={PREFIX_TOKENS}")
                break
    return specs


def peft_spec(label: str, model: str, batch: int, seq: int) -> RowSpec:
    quant = ["model.quantize=nf4"] if "qlora" in label else []
    gc = ["train.gradient_checkpointing=true"] if label.endswith("-gc") else []
    return RowSpec(label, "lora", [f"model.name={model}", "data.task=causal_lm", f"train.batch_size={batch}",
                                   f"data.max_length={seq}", "method.name=lora", *quant, *gc])


def peft_apply(label: str):
    """The PEFT model for a reference row, built on whatever base the profile step loaded."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if label == "peft-prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TOKENS)
    elif label == "peft-lora":
        config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
                            lora_dropout=0.0)
    else:
        config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=16, lora_alpha=32, lora_dropout=0.0)
    return lambda model: get_peft_model(model, config)


def peft_row(spec: RowSpec, device: str, steps: int) -> dict:
    """A PEFT reference row: measured with sidetune's step; the prediction is attempted too."""
    from sidetune.config import load_config
    from sidetune.profile import measure

    cfg = load_config(None, spec.overrides)
    row = {"label": spec.label, "method": f"peft:{spec.label}", "model": cfg.model.name, "task": "causal_lm",
           "batch": cfg.train.batch_size, "seq": cfg.data.max_length, "device": device, "target": device,
           "quantize": cfg.model.quantize, "gradient_checkpointing": cfg.train.gradient_checkpointing, "error": None}
    try:
        pred = measure(cfg, True, device, fake=True, apply=peft_apply(spec.label))
        row.update(predicted_peak_bytes=pred["peak_bytes"], predicted_peak_phase=pred["peak_phase"])
    except Exception as e:  # PEFT code the fake step cannot run: the measured number stands alone
        row["prediction_failed"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        real = measure(cfg, True, device, fake=False, timed_steps=steps, apply=peft_apply(spec.label))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    row.update({k: v for k, v in real.items() if k not in ("peak_bytes", "peak_phase", "peak_breakdown")})
    row["tracked_peak_bytes"] = real["peak_bytes"]
    row["measured_peak_bytes"] = real.get("cuda_max_allocated_bytes") or real.get("cpu_allocated_peak_bytes")
    if row.get("predicted_peak_bytes"):
        row["prediction_error"] = row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1
    return row


def run_peft_isolated(spec: RowSpec, device: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sidetune-bench-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "row.json"
        job.write_text(json.dumps({"spec": spec.__dict__, "device": device, "steps": steps}))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--worker", str(job), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"label": spec.label, "method": f"peft:{spec.label}", "error": f"worker failed: {tail[0][:300]}"}
        return json.loads(out.read_text())


def ratio_table(rows: dict[str, dict], scale: float, unit: str) -> list[str]:
    lines = [f"| sidetune row | PEFT row | sidetune peak {unit} | PEFT peak {unit} | ratio | verdict (<= 1.05) |",
             "|---|---|---|---|---|---|"]
    for ours, theirs in PAIRS:
        a, b = rows.get(ours), rows.get(theirs)
        if not a or not b or not peak_of(a) or not peak_of(b):
            why = "not registered" if not a else (a.get("error") or (b or {}).get("error") or "no peak")
            lines.append(f"| {ours} | {theirs} | – | – | – | {why} |")
            continue
        r = a["measured_peak_bytes"] / b["measured_peak_bytes"]
        lines.append(f"| {ours} | {theirs} | {a['measured_peak_bytes'] / scale:.3f} | "
                     f"{b['measured_peak_bytes'] / scale:.3f} | {r:.3f} | {'ok' if r <= 1.05 else 'ABOVE'} |")
    return lines


def floor_lines(rows: dict[str, dict]) -> list[str]:
    """The DESIGN target: Q-LST at <= 1.25x the memory and <= 1.3x the time of the 4-bit no-grad forward."""
    out = []
    for label in rows:
        r = rows[label]
        floor = rows.get("floor" if not r.get("quantize") else f"floor-{r['quantize']}")
        if r.get("method") is None or not floor or not peak_of(r) or not peak_of(floor):
            continue
        t = (f", time {r['step_time_s'] / floor['step_time_s']:.2f}x"
             if r.get("step_time_s") and floor.get("step_time_s") else "")
        out.append(f"- {label}: memory {peak_of(r) / peak_of(floor):.2f}x its floor{t}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny-llama 4x64 instead of the llama-1b / llama-8b shapes")
    p.add_argument("--shapes", default=None, help="override: model:BxT,model:BxT (e.g. llama-1b:8x512)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.worker:
        job = json.loads(Path(args.worker[0]).read_text())
        row = peft_row(RowSpec(**job["spec"]), job["device"], job["steps"])
        Path(args.worker[1]).write_text(json.dumps(row))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/memory.py: no CUDA GPU here; run with --device cpu --tiny to check the code path", file=sys.stderr)
        return 2
    shapes = ([(m, *map(int, bt.split("x"))) for m, bt in (s.split(":") for s in args.shapes.split(","))]
              if args.shapes else TINY_SHAPES if args.tiny else CUDA_SHAPES)
    out = Path(args.out or ROOT / "bench" / "out" / f"memory-{args.device}")
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = [f"# Memory bench, {stamp}", "",
              f"Command: `python bench/memory.py {' '.join(sys.argv[1:])}`; device: {args.device} ({device_name}, "
              f"{os.cpu_count()} CPU cores); torch {torch.__version__}.", ""]
    everything = []
    for model, batch, seq in shapes:
        print(f"bench: {model} {batch}x{seq}", flush=True)
        rows = []
        for spec in sidetune_specs(model, batch, seq):
            print(f"bench:   {spec.label}", flush=True)
            rows.append(run_isolated(spec, args.device, args.device, args.steps))
        for label in PEFT_ROWS:
            print(f"bench:   {label}", flush=True)
            rows.append(run_peft_isolated(peft_spec(label, model, batch, seq), args.device, args.steps))
        shape_dir = out / f"{model}-{batch}x{seq}"
        shape_dir.mkdir(exist_ok=True)
        write_reports([r for r in rows if r.get("weights_bytes") is not None], shape_dir)
        by_label = {r["label"]: r for r in rows}
        scale, unit = (GiB, "GiB") if max(peak_of(r) or 0 for r in rows) >= GiB else (MiB, "MiB")
        report += [f"## {model}, batch {batch} x seq {seq}", "", reading(rows, None), "", markdown_table(rows), "",
                   "PEFT references, same run:", "",
                   "| row | measured peak | predicted peak | error | step ms |", "|---|---|---|---|---|"]
        for label in PEFT_ROWS:
            r = by_label[label]
            err = r.get("prediction_error")
            err = "–" if err is None else f"{100 * err:+.1f}%"
            ms = "–" if not r.get("step_time_s") else f"{1000 * r['step_time_s']:.1f}"
            report.append(f"| {label} | {_v(r.get('measured_peak_bytes'), scale)} | "
                          f"{_v(r.get('predicted_peak_bytes'), scale)} | {err} | {ms} |"
                          + (f" {r['error']}" if r.get("error") else ""))
        judged = [r for r in rows if r.get("prediction_error") is not None]
        misses = [r["label"] for r in judged if abs(r["prediction_error"]) > 0.10]
        worst = max(judged, key=lambda r: abs(r["prediction_error"]), default=None)
        report += ["", f"Prediction (fake tensors) against the measured peak: within ±10% for "
                   f"{len(judged) - len(misses)}/{len(judged)} rows"
                   + (f" (worst {worst['label']} {100 * worst['prediction_error']:+.1f}%)" if worst else "")
                   + (f"; outside: {', '.join(misses)}" if misses else "") + "."]
        report += ["", f"Ratios (sidetune / PEFT, measured peaks in {unit}):", "", *ratio_table(by_label, scale, unit),
                   "", "Against the no-grad floor of the same batch:", "", *floor_lines(by_label), ""]
        everything += rows
    (out / "results.json").write_text(json.dumps(everything, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0


def _v(value, scale) -> str:
    return "–" if value is None else f"{value / scale:.3f}"


if __name__ == "__main__":
    sys.exit(main())
