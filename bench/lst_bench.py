"""Q-LST against its floor and against QLoRA, measured in one run on one batch.

Three phases on the same 4-bit model (built afresh per phase) and the same batch (random tokens, every token scored):

1. floor:  a no-grad forward of the 4-bit model + sidetune's chunked LM loss (what inference of the loss costs);
2. Q-LST:  a full training step of sidetune's `lst` method, built by `session.build` and run by `session.train_step`
           under accelerate's mixed precision and backward, with gradient clipping: what `sidetune train` runs;
3. QLoRA:  PEFT LoRA on all linear layers (r=16) + gradient checkpointing, the usual low-memory reference.

Reported per phase: peak `torch.cuda.max_memory_allocated` over the timed steps (after warm-up, so optimizer state is
included) and the mean step time, then the ratios Q-LST / floor and Q-LST / QLoRA against the issue's targets
(memory <= 1.25x and time <= 1.3x the floor; <= 0.6x the memory and <= 0.25x the time of QLoRA+GC). For Q-LST it
also prints the bytes autograd saved per role (backbone must be 0).

    python bench/lst_bench.py                                     # CUDA: llama-8b shape, batch 4 x seq 1024
    python bench/lst_bench.py --model tiny-llama --device cpu --batch 2 --seq 64 --steps 2   # the code path on CPU

On CPU there is no per-phase peak-memory counter (RSS only grows), so memory shows as n/a there and the times are
not meaningful for the GPU targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sidetune.config import load_config
from sidetune.memory import GiB, SavedTensorTracker, module_roles
from sidetune.models import load_model
from sidetune.session import build, forward_module, make_optimizer, mixed_precision, train_step

TARGETS = {"mem_vs_floor": 1.25, "time_vs_floor": 1.3, "mem_vs_qlora": 0.6, "time_vs_qlora": 0.25}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-8b", help="shape preset or local model dir (default: llama-8b)")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (code-path check)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--quantize", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--r", type=int, default=16, help="LST reduction factor (QST uses 16)")
    p.add_argument("--side-layers", default="every:2", help="LST method.side_layers")
    p.add_argument("--chunk", type=int, default=512, help="train.loss_chunk_size for every phase")
    p.add_argument("--side-checkpointing", action="store_true", help="LST method.gradient_checkpointing")
    p.add_argument("--compile", action="store_true", help="LST method.compile (torch.compile the side blocks)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--skip-qlora", action="store_true", help="no PEFT phase (e.g. peft not installed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--markdown", help="append a results table (with command, device and date) to this file")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, step, device: torch.device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)  # the queue must drain before the clock stops
    ms = (time.perf_counter() - start) / steps * 1000
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    row = {"phase": name, "peak_allocated_gib": peak, "step_ms": ms}
    print(f"  {name}: {'n/a' if peak is None else f'{peak:.2f} GiB'}, {ms:.1f} ms/step", flush=True)
    return row


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _config(args: argparse.Namespace, *extra: str):
    """The run config of one phase, as `sidetune train` would read it."""
    return load_config(None, [f"model.name={args.model}", f"model.quantize={args.quantize}", "data.task=causal_lm",
                              f"train.batch_size={args.batch}", f"data.max_length={args.seq}",
                              f"train.loss_chunk_size={args.chunk}", "train.lr=1e-4", *extra])


def _stepper(s, accelerator, batch):
    """One sidetune training step (session.train_step: forward, accelerate backward, clipping, optimizer), timed."""
    module, optimizer = accelerator.prepare(s.module, s.optimizer)
    module.train()
    return module, lambda: train_step(module, batch, optimizer, s.trainable, s.cfg.train.max_grad_norm,
                                      backward=accelerator.backward, clip=accelerator.clip_grad_norm_)


def run(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lst_bench: --device cuda but no CUDA GPU is visible; use --device cpu for the code path")
    lst_cfg = _config(args, "method.name=lst", f"method.r={args.r}", f"method.side_layers={args.side_layers}",
                      f"method.gradient_checkpointing={str(args.side_checkpointing).lower()}",
                      f"method.compile={str(args.compile).lower()}")
    # The trainer's own mixed-precision choice: bf16 autocast on a bf16-capable GPU, none on CPU.
    accelerator = Accelerator(mixed_precision=mixed_precision(lst_cfg.train), cpu=device.type == "cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"lst_bench: {args.model} {args.quantize} on {device_name(device)}, batch {args.batch} x seq {args.seq}, "
          f"mixed precision {accelerator.mixed_precision}", flush=True)

    # 1. The floor: the same model and batch, forward only, loss in chunks.
    model = load_model(lst_cfg.model, "causal_lm", device=device).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    # No padding: every phase takes the same unmasked batch (SDPA's causal path, no mask tensor).
    batch = {"input_ids": ids, "labels": ids}
    floor = accelerator.prepare(forward_module(model.requires_grad_(False), lst_cfg))

    def floor_step():
        with torch.no_grad():
            floor(**batch).loss.item()

    rows.append(measure("no-grad 4-bit forward + chunked loss (floor)", floor_step, device, args.warmup, args.steps))
    floor = model = None  # drop the floor before the next phase
    free(device)

    # 2. Q-LST: sidetune's build and step, exactly as `sidetune train` runs them.
    s = build(lst_cfg, device, with_data=False, with_optimizer=True)
    n_side = sum(p.numel() for p in s.trainable)
    module, step = _stepper(s, accelerator, batch)
    row = measure(f"Q-LST r={args.r} side_layers={args.side_layers} ({n_side / 1e6:.2f}M trainable)", step,
                  device, args.warmup, args.steps)
    roles = module_roles(module, s.base_modules, s.base, s.method.head_modules(s.model))
    with SavedTensorTracker(module, roles) as tracker:
        loss = module(**batch).loss
    accelerator.backward(loss)
    row["saved_for_backward_gib"] = {k: v / GiB for k, v in tracker.by_role().items()}
    print(f"    saved for backward by role (GiB): {json.dumps(row['saved_for_backward_gib'])}", flush=True)
    rows.append(row)
    del module, step, s, loss, tracker
    accelerator.free_memory()
    free(device)

    # 3. PEFT QLoRA all-linear + gradient checkpointing, on the same build path (PEFT's apply instead of ours).
    if not args.skip_qlora:
        from peft import LoraConfig, get_peft_model

        def peft_apply(model):
            # Presets are quantized by sidetune, not by transformers: tell PEFT to use its bitsandbytes LoRA layers.
            with contextlib.suppress(AttributeError):
                model.is_loaded_in_4bit = True
            config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                target_modules="all-linear", task_type="CAUSAL_LM")
            return get_peft_model(model, config).get_base_model()

        s = build(_config(args, "train.gradient_checkpointing=true"), device, with_data=False, apply=peft_apply)
        s.optimizer = make_optimizer(s.model, None, s.cfg.train, device)
        n_lora = sum(p.numel() for p in s.trainable)
        _, step = _stepper(s, accelerator, batch)
        rows.append(measure(f"PEFT QLoRA all-linear r={args.lora_r} + grad checkpointing ({n_lora / 1e6:.2f}M "
                            f"trainable)", step, device, args.warmup, args.steps))
    return {"rows": rows, "ratios": ratios(rows), "device": device_name(device), "args": vars(args)}


def ratios(rows: list[dict]) -> dict:
    floor, lst = rows[0], rows[1]
    out = {"time_vs_floor": lst["step_ms"] / floor["step_ms"]}
    if floor["peak_allocated_gib"]:
        out["mem_vs_floor"] = lst["peak_allocated_gib"] / floor["peak_allocated_gib"]
    if len(rows) > 2:
        out["time_vs_qlora"] = lst["step_ms"] / rows[2]["step_ms"]
        if rows[2]["peak_allocated_gib"]:
            out["mem_vs_qlora"] = lst["peak_allocated_gib"] / rows[2]["peak_allocated_gib"]
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def table(result: dict) -> str:
    lines = ["| phase | peak allocated GiB | step ms |", "|---|---|---|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f}"
        lines.append(f"| {r['phase']} | {peak} | {r['step_ms']:.1f} |")
    lines.append("")
    on_gpu = result["rows"][0]["peak_allocated_gib"] is not None
    if not on_gpu:
        lines.append("- CPU run: proves the code path only; tiny shapes are overhead-bound, so these ratios say "
                     "nothing about the GPU targets.")
    for key, value in result["ratios"].items():
        verdict = ("meets" if value <= TARGETS[key] else "misses") if on_gpu else "not applicable on CPU"
        lines.append(f"- {key}: {value:.2f}x (target <= {TARGETS[key]}x: {verdict})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = table(result)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        command = "python bench/lst_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        header = (f"\n### lst_bench: {args.model}, batch {args.batch} x seq {args.seq} — {result['device']}, "
                  f"{datetime.date.today().isoformat()}\n\n`{command}`\n\n")
        with open(args.markdown, "a") as f:
            f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
