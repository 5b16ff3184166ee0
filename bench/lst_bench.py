"""Q-LST against its floor and against QLoRA, measured in one run on one batch.

Four phases on the same 4-bit model (built afresh per phase) and the same batch (random tokens, every token scored):

1. floor:  a no-grad forward of the 4-bit model + sidetune's chunked LM loss (what inference of the loss costs);
2. qlst:   a full training step of sidetune's `lst` method with the lean defaults (side-only recomputation, int8
           ladder inputs, 8-bit AdamW), built by `session.build` and run by `session.train_step` under accelerate's
           mixed precision and backward, with gradient clipping: what `sidetune train` runs;
3. qlora:  sidetune's own QLoRA (`lora` on all linear layers, r=16) + gradient checkpointing, same build and step;
4. peft:   PEFT LoRA on all linear layers (r=16) + gradient checkpointing on the same build path, the usual
           low-memory reference.

Reported per phase: peak `torch.cuda.max_memory_allocated` over the timed steps (after warm-up, so optimizer state is
included) and the step time, then the ratios qlst / floor and qlst / each QLoRA against the issue's targets (memory
<= 1.25x and time <= 1.3x the floor; <= 0.6x the memory and <= 0.25x the time of QLoRA+GC). For Q-LST it also prints
the bytes autograd saved per role (backbone must be 0).

Two schedules. Sequential (default): one phase at a time, each built, warmed up, timed over --steps steps (mean)
and freed, so each phase's CUDA peak is its own. `--interleave`: every phase built first and kept resident, warmed
up, then --steps rounds of one step per phase (floor qlst qlora peft floor qlst ...), median per phase. On a machine
shared with other jobs the load drifts over minutes; interleaving exposes every phase to the same drift, so the
ratios of medians mean something where sequential means do not. With all phases resident a per-phase peak is not
defined: interleaved rows report times only (on CPU there is no per-phase peak counter anyway: RSS only grows),
and the device must hold all four models at once (4 x 5.3 GiB of NF4 weights at the llama-8b shape).

    python bench/lst_bench.py                                     # CUDA: llama-8b shape, batch 4 x seq 1024
    python bench/lst_bench.py --model tiny-llama --device cpu --batch 2 --seq 64 --steps 2   # the code path on CPU
    OMP_NUM_THREADS=1 python bench/lst_bench.py --model smollm2-135m --device cpu --batch 4 --seq 128 --chunk 256 \\
        --interleave --warmup 1 --steps 7       # CPU times: real SmolLM2-135M in NF4, 7 rounds (bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sidetune.config import load_config
from sidetune.memory import GiB, SavedTensorTracker, module_roles
from sidetune.models import load_model
from sidetune.session import build, forward_module, make_optimizer, mixed_precision, train_step

TARGETS = {"mem_vs_floor": 1.25, "time_vs_floor": 1.3, "mem_vs_qlora": 0.6, "time_vs_qlora": 0.25,
           "mem_vs_peft": 0.6, "time_vs_peft": 0.25}
PHASES = ("floor", "qlst", "qlora", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-8b", help="shape preset, alias or local model dir (default: llama-8b)")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (code path, interleaved times)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--quantize", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (floor and qlst are always run)")
    p.add_argument("--r", type=int, default=16, help="LST reduction factor (QST uses 16)")
    p.add_argument("--side-layers", default="every:2", help="LST method.side_layers")
    p.add_argument("--chunk", type=int, default=512, help="train.loss_chunk_size for every phase")
    p.add_argument("--side-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="LST method.gradient_checkpointing (default on, as in the method)")
    p.add_argument("--ladder-grad-input", default="int8", choices=["full", "int8"],
                   help="LST method.ladder_grad_input (default int8, as in recipes/llama8b_qlst.yaml)")
    p.add_argument("--lst-optimizer", default="adamw_8bit", help="train.optimizer of the Q-LST phase")
    p.add_argument("--compile", action="store_true", help="LST method.compile (torch.compile the side blocks)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--interleave", action="store_true",
                   help="build every phase first, then time one step per phase per round; medians (times only)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase (rounds with --interleave)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--markdown", help="append a results table (with command, device and date) to this file")
    args = p.parse_args(argv)
    args.phases = [k for k in PHASES if k in {"floor", "qlst", *args.phases.split(",")}]
    return args


@dataclass
class Phase:
    key: str
    name: str
    step: Callable[[], None]
    trainable: int = 0
    saved: Callable[[], dict] | None = None  # bytes autograd saves per role in one step (Q-LST only)
    times_ms: list[float] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(phase: Phase, device: torch.device) -> None:
    start = time.perf_counter()
    phase.step()
    sync(device)  # the queue must drain before the clock stops
    phase.times_ms.append((time.perf_counter() - start) * 1000)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _config(args: argparse.Namespace, *extra: str):
    """The run config of one phase, as `sidetune train` would read it."""
    return load_config(None, [f"model.name={args.model}", f"model.quantize={args.quantize}", "data.task=causal_lm",
                              f"train.batch_size={args.batch}", f"data.max_length={args.seq}",
                              f"train.loss_chunk_size={args.chunk}", "train.lr=1e-4", *extra])


def _lst_config(args: argparse.Namespace):
    return _config(args, "method.name=lst", f"method.r={args.r}", f"method.side_layers={args.side_layers}",
                   f"method.gradient_checkpointing={str(args.side_checkpointing).lower()}",
                   f"method.ladder_grad_input={args.ladder_grad_input}", f"train.optimizer={args.lst_optimizer}",
                   f"method.compile={str(args.compile).lower()}")


def _stepper(s, accelerator, batch):
    """One sidetune training step (session.train_step: forward, accelerate backward, clipping, optimizer)."""
    module, optimizer = accelerator.prepare(s.module, s.optimizer)
    module.train()
    return module, lambda: train_step(module, batch, optimizer, s.trainable, s.cfg.train.max_grad_norm,
                                      backward=accelerator.backward, clip=accelerator.clip_grad_norm_)


def _n(s) -> int:
    return sum(p.numel() for p in s.trainable)


def build_phase(key: str, args: argparse.Namespace, accelerator, batch: dict, device: torch.device) -> Phase:
    """One phase's model, optimizer and step closure, on sidetune's own build path."""
    if key == "floor":
        cfg = _lst_config(args)
        model = load_model(cfg.model, "causal_lm", device=device).eval()
        floor = accelerator.prepare(forward_module(model.requires_grad_(False), cfg))

        def floor_step():
            with torch.no_grad():
                floor(**batch).loss.item()

        return Phase(key, f"no-grad {args.quantize} forward + chunked loss (floor)", floor_step)
    if key == "qlst":
        s = build(_lst_config(args), device, with_data=False, with_optimizer=True)
        module, step = _stepper(s, accelerator, batch)

        def saved() -> dict:
            roles = module_roles(module, s.base_modules, s.base, s.method.head_modules(s.model))
            with SavedTensorTracker(module, roles) as tracker:
                loss = module(**batch).loss
            accelerator.backward(loss)
            s.optimizer.zero_grad(set_to_none=True)
            return {k: v / GiB for k, v in tracker.by_role().items()}

        ckpt = "side recompute" if args.side_checkpointing else "no recompute"
        return Phase(key, f"Q-LST r={args.r} side_layers={args.side_layers}, {ckpt}, ladder input "
                          f"{args.ladder_grad_input}, {args.lst_optimizer}", step, _n(s), saved)
    if key == "qlora":
        s = build(_config(args, "method.name=lora", "method.targets=[all-linear]", f"method.r={args.lora_r}",
                          f"method.alpha={2 * args.lora_r}", "method.dropout=0", "train.gradient_checkpointing=true"),
                  device, with_data=False, with_optimizer=True)
        return Phase(key, f"sidetune QLoRA all-linear r={args.lora_r} + grad checkpointing",
                     _stepper(s, accelerator, batch)[1], _n(s))
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
    return Phase(key, f"PEFT QLoRA all-linear r={args.lora_r} + grad checkpointing", _stepper(s, accelerator, batch)[1],
                 _n(s))


def interleaved(order: list[str], rounds: int) -> list[str]:
    """The timing schedule: one step of every phase per round, in the same order (A B C D A B C D ...)."""
    return [key for _ in range(rounds) for key in order]


def vocab_size(model: str) -> int:
    """The vocabulary of a preset, alias or local model, without building it (the batch is drawn before any phase)."""
    from transformers import AutoConfig

    from sidetune.models import PRESETS, resolve_path

    if model in PRESETS:
        model_type, kwargs, _ = PRESETS[model]
        return AutoConfig.for_model(model_type, **kwargs).vocab_size
    return AutoConfig.from_pretrained(resolve_path(model)).vocab_size


def warm(phase: Phase, device: torch.device, steps: int) -> None:
    for _ in range(steps):
        phase.step()
    sync(device)
    gc.collect()


def row(phase: Phase, peak: float | None, ms: float) -> dict:
    print(f"  {phase.name}: {'n/a' if peak is None else f'{peak:.2f} GiB'}, {ms:.1f} ms/step "
          f"(runs: {', '.join(f'{t:.0f}' for t in phase.times_ms)})", flush=True)
    return {"key": phase.key, "phase": phase.name, "trainable": phase.trainable, "peak_allocated_gib": peak,
            "step_ms": ms, "step_ms_all": phase.times_ms}


def run(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lst_bench: --device cuda but no CUDA GPU is visible; use --device cpu for the code path")
    # The trainer's own mixed-precision choice: bf16 autocast on a bf16-capable GPU, none on CPU.
    accelerator = Accelerator(mixed_precision=mixed_precision(_lst_config(args).train), cpu=device.type == "cpu")
    ids = torch.randint(0, vocab_size(args.model), (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    # No padding: every phase takes the same unmasked batch (SDPA's causal path, no mask tensor).
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    print(f"lst_bench: {args.model} {args.quantize} on {device_name(device)}, batch {args.batch} x seq {args.seq}, "
          f"mixed precision {accelerator.mixed_precision}, {'interleaved' if args.interleave else 'sequential'}",
          flush=True)
    rows = {}
    if args.interleave:
        # Everything resident, then A B C D A B C D ...: each phase sees the same drift of the machine's load.
        phases = {key: build_phase(key, args, accelerator, batch, device) for key in args.phases}
        for phase in phases.values():
            warm(phase, device, args.warmup)
        for key in interleaved(args.phases, args.steps):
            timed(phases[key], device)
        for key, phase in phases.items():
            rows[key] = row(phase, None, statistics.median(phase.times_ms))
        rows["qlst"]["saved_for_backward_gib"] = phases["qlst"].saved()
    else:
        for key in args.phases:
            phase = build_phase(key, args, accelerator, batch, device)
            warm(phase, device, args.warmup)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.steps):
                timed(phase, device)
            peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
            rows[key] = row(phase, peak, statistics.fmean(phase.times_ms))
            if phase.saved is not None:
                rows[key]["saved_for_backward_gib"] = phase.saved()
            phase = None  # drop this phase's model and optimizer before the next one is built
            accelerator.free_memory()
            free(device)
    print(f"    Q-LST saved for backward by role (GiB): {json.dumps(rows['qlst']['saved_for_backward_gib'])}",
          flush=True)
    return {"rows": list(rows.values()), "ratios": ratios(rows), "device": device_name(device),
            "schedule": "interleaved medians" if args.interleave else "sequential means", "args": vars(args)}


def ratios(rows: dict[str, dict]) -> dict:
    """Q-LST over each reference phase that ran: time always, memory where a per-phase peak exists."""
    out = {}
    for key in ("floor", "qlora", "peft"):
        if key not in rows:
            continue
        out[f"time_vs_{key}"] = rows["qlst"]["step_ms"] / rows[key]["step_ms"]
        if rows[key]["peak_allocated_gib"]:
            out[f"mem_vs_{key}"] = rows["qlst"]["peak_allocated_gib"] / rows[key]["peak_allocated_gib"]
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


REFERENCES = {"floor": "the floor", "qlora": "sidetune QLoRA+GC", "peft": "PEFT QLoRA+GC"}


def table(result: dict) -> str:
    lines = [f"| phase | trainable | peak allocated GiB | step ms ({result['schedule']}) | runs ms |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f}"
        runs = ", ".join(f"{t:.0f}" for t in r["step_ms_all"])
        lines.append(f"| {r['phase']} | {r['trainable']:,} | {peak} | {r['step_ms']:.1f} | {runs} |")
    lines.append("")
    saved = result["rows"][[r["key"] for r in result["rows"]].index("qlst")]["saved_for_backward_gib"]
    lines.append("Saved for backward by Q-LST (GiB): " + ", ".join(f"{k} {v:.4g}" for k, v in saved.items()) + ".")
    lines.append("")
    on_gpu = not result["device"].startswith("CPU")
    for key, value in result["ratios"].items():
        kind, ref = key.split("_vs_")
        verdict = ("meets" if value <= TARGETS[key] else "misses") if on_gpu else "CPU: not evidence for the GPU target"
        lines.append(f"- Q-LST {kind} / {REFERENCES[ref]}: {value:.2f}x (target <= {TARGETS[key]}x: {verdict})")
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
