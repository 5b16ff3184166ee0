"""The CUDA-only paths of issue 23, checked on a real GPU (one process; a few minutes on one H100/H200).

    python bench/gpu_paths_check.py OUT_DIR [--tokenizer DIR]

Writes OUT_DIR/gpu_paths.json (one entry per check: ok, the numbers, or the error) and prints one line per check.
Each check is one of the GPU branches the CPU tests (tests/test_gpu_paths.py) reach only with the device mocked:

- dtype: native bf16 detection, `auto` dtype and mixed precision on this GPU
- autocast_table: every op of the CUDA float32 autocast table gives float32 under real CUDA autocast, and the CPU
  emulation the predictions use gives the same dtype
- sdpa_head_dim: the fused attention kernels refuse a head dim of 4 and take 8 (what the prediction assumes)
- prediction: saved activations predicted for CUDA on the CPU (fake tensors, emulated policy) against the same step
  measured on the GPU (tiny-gpt2, LoRA, bf16; LST with side head dim 4)
- preset_build: the peak of building a 4-bit llama-1b preset (built in host memory, quantized onto the GPU)
- train_*: `sidetune train` runs: full fine-tuning in bf16 (fp32 masters, fused AdamW, CUDA peak reset, CUDA RNG
  state through a checkpoint and resume), Q-LST with int8 ladder inputs under autocast and 8-bit / paged AdamW,
  FSDP2 through `accelerate launch` (one process: the guard's DTensor norm, the wrap groups, host build), a real CUDA
  out-of-memory (the one-line message)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OUT = Path(sys.argv[1])
OUT.mkdir(parents=True, exist_ok=True)
TOK = sys.argv[sys.argv.index("--tokenizer") + 1] if "--tokenizer" in sys.argv else None
REPORT: dict[str, dict] = {}


def check(name):
    def run(fn):
        start = time.monotonic()
        try:
            result = fn() or {}
            REPORT[name] = {"ok": bool(result.pop("ok", True)), **result}
        except Exception as e:  # a failed check is reported, the others still run
            REPORT[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                            "trace": traceback.format_exc()[-3000:]}
        REPORT[name]["seconds"] = round(time.monotonic() - start, 1)
        print(f"{name}: {json.dumps(REPORT[name])[:1500]}", flush=True)
        (OUT / "gpu_paths.json").write_text(json.dumps(REPORT, indent=1))
        return fn
    return run


def overrides(*extra: str) -> list[str]:
    return [*extra, *([f"model.tokenizer={TOK}"] if TOK else [])]


@check("dtype")
def _():
    import torch

    from sidetune.config import TrainConfig
    from sidetune.models import native_bf16, resolve_dtype
    from sidetune.session import mixed_precision

    cap = torch.cuda.get_device_capability()
    native = native_bf16()
    return {"ok": native == (cap >= (8, 0)) and resolve_dtype("auto", "cuda") == (torch.bfloat16 if native
                                                                                   else torch.float16)
            and mixed_precision(TrainConfig()) == ("bf16" if native else "fp16"),
            "capability": cap, "native_bf16": native, "is_bf16_supported": torch.cuda.is_bf16_supported(),
            "auto_dtype": str(resolve_dtype("auto", "cuda")), "mixed_precision": mixed_precision(TrainConfig())}


@check("autocast_table")
def _():
    import torch
    from test_gpu_paths import _X, CUDA_FLOAT32_TABLE

    from sidetune.profiling.measure import CUDA_FP32_OPS, cuda_autocast_policy

    x = _X().bfloat16()
    real, emulated = {}, {}
    for name, op in CUDA_FLOAT32_TABLE.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            real[name] = str(op(x.cuda()).dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16), cuda_autocast_policy():
            emulated[name] = str(op(x).dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        linear = str(torch.nn.functional.linear(x.cuda().float(), x.cuda().float()).dtype)
    not_fp32 = {n: d for n, d in real.items() if d != "torch.float32"}
    differ = {n: (real[n], emulated[n]) for n in real if real[n] != emulated[n]}
    return {"ok": not not_fp32 and not differ and linear == "torch.bfloat16", "real_not_fp32": not_fp32,
            "emulation_differs": differ, "ops": len(real), "listed": len(CUDA_FP32_OPS), "linear": linear}


@check("sdpa_head_dim")
def _():
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    runs = {}
    for d in (2, 4, 8, 16):
        q = torch.randn(2, 4, 64, d, device="cuda", dtype=torch.bfloat16)
        try:
            with sdpa_kernel(fused):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            runs[d] = "fused"
        except RuntimeError:
            runs[d] = "math only"
    return {"ok": runs == {2: "math only", 4: "math only", 8: "fused", 16: "fused"}, "kernels": runs}


def _measure_pair(over: list[str]) -> dict:
    """The step measured on this GPU, and predicted for CUDA with fake tensors standing on the CPU (as on a
    machine without a GPU), with and without the CUDA autocast policy."""
    import contextlib

    import torch

    from sidetune.config import load_config
    from sidetune.profiling import measure as m

    real = m.measure(load_config(None, over), True, "cuda", fake=False)
    sim, policy = m.sim_device, m.cuda_autocast_policy
    m.sim_device = lambda target: torch.device("cpu")
    try:
        predicted = m.measure(load_config(None, over), True, "cuda", fake=True)
        m.cuda_autocast_policy = contextlib.nullcontext
        before = m.measure(load_config(None, over), True, "cuda", fake=True)
    finally:
        m.sim_device, m.cuda_autocast_policy = sim, policy
    keys = ("act_backbone_bytes", "act_method_bytes", "act_head_bytes", "act_total_bytes", "peak_bytes")
    return {"measured": {k: real[k] for k in keys}, "predicted": {k: predicted[k] for k in keys},
            "predicted_cpu_rules": {k: before[k] for k in keys},
            "ok": abs(predicted["act_total_bytes"] - real["act_total_bytes"]) <= 0.05 * real["act_total_bytes"]}


@check("prediction_gpt2")
def _():
    return _measure_pair(overrides("model.name=tiny-gpt2", "data.task=causal_lm", "method.name=lora",
                                   "train.batch_size=4", "data.max_length=64", "model.attn_implementation=eager"))


@check("prediction_lst_head_dim_4")
def _():
    return _measure_pair(overrides("model.name=tiny-llama", "data.task=causal_lm", "method.name=lst", "method.r=4",
                                   "train.batch_size=4", "data.max_length=64"))


@check("preset_build")
def _():
    import torch

    from sidetune.config import ModelConfig
    from sidetune.models import load_model

    # With room on the GPU the build stays there (fast); this check is of the host path a small GPU takes.
    free = torch.cuda.mem_get_info
    torch.cuda.mem_get_info = lambda device=None: (2**30, free(device)[1])
    torch.cuda.reset_peak_memory_stats()
    try:
        model = load_model(ModelConfig(name="llama-1b", quantize="nf4"), "causal_lm", device="cuda")
    finally:
        torch.cuda.mem_get_info = free
    peak = torch.cuda.max_memory_allocated()
    held = torch.cuda.memory_allocated()
    bf16 = sum(p.numel() for p in model.parameters()) * 2  # packed 4-bit counts 2 per byte: a lower bound
    del model
    torch.cuda.empty_cache()
    full = 1_100_048_384 * 2  # llama-1b in bf16, what a build on the GPU held before quantizing
    return {"ok": peak < 0.75 * full, "peak_gib": peak / 2**30, "held_gib": held / 2**30,
            "bf16_model_gib": full / 2**30, "param_bytes_lb_gib": bf16 / 2**30}


def _data(n: int = 64, words: int = 8) -> Path:
    path = OUT / f"train_{n}_{words}.tsv"
    rows = ["sentence\tlabel"] + [" ".join([("good fine great" if i % 2 else "bad awful poor")] * words) +
                                  f" {i}\t{i % 2}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _train(tag: str, *extra: str, launch: list[str] | None = None, timeout: int = 240, data: Path | None = None) -> dict:
    out = OUT / tag
    cmd = [*(launch or [sys.executable]), "-m", "sidetune", "train", str(OUT / "empty.yaml"),
           f"train.output_dir={out}", "train.progress=false", "train.overwrite=true",
           *overrides("model.name=tiny-llama", "data.task=classification", f"data.train={data or _data()}", *extra)]
    (OUT / "empty.yaml").write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    rows = []
    if (out / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rc": proc.returncode, "rows": rows, "out": out,
            "tail": (proc.stdout + proc.stderr)[-2500:], "stdout": proc.stdout + proc.stderr}


def _dtypes(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted({str(f.get_tensor(k).dtype) for k in f})


@check("train_full_bf16_resume")
def _():
    import torch
    from safetensors.torch import load_file

    common = ["method.name=full", "train.lr=1e-5", "train.batch_size=8", "train.warmup_steps=0",
              "train.scheduler=constant", "data.eval=null", "train.log_every=5"]
    whole = _train("full_whole", *common, "train.max_steps=20", "train.save_every=10")
    ckpt = sorted((whole["out"] / "checkpoints").glob("*10"))
    # A new run from the step-10 checkpoint: weights, AdamW state and the CUDA RNG state of the checkpoint
    resumed = _train("full_resumed", *common, "train.max_steps=20", f"train.resume={ckpt[0]}") if ckpt else \
        {"rc": -1, "tail": "no checkpoint", "out": OUT}
    a = load_file(str(whole["out"] / "final" / "trainable.safetensors"))
    b = load_file(str(resumed["out"] / "final" / "trainable.safetensors")) if resumed["rc"] == 0 else {}
    same = bool(b) and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    covers = "covers the training steps" in whole["stdout"]
    losses = [r["loss"] for r in whole["rows"] if "loss" in r]
    return {"ok": whole["rc"] == 0 and resumed["rc"] == 0 and same and covers
            and _dtypes(whole["out"] / "final" / "trainable.safetensors") == ["torch.float32"],
            "losses": losses, "resumed_equal": same, "peak_note": covers,
            "peaks": [r.get("peak_allocated_gib") for r in whole["rows"] if "loss" in r],
            "tail": "" if whole["rc"] == 0 and resumed["rc"] == 0 else whole["tail"] + resumed["tail"]}


@check("train_qlst_int8_ladders_8bit_adam")
def _():
    results = {}
    for opt in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        r = _train(f"qlst_{opt}", "model.quantize=nf4", "method.name=lst", "method.ladder_grad_input=int8",
                   "method.gradient_checkpointing=true", "train.mixed_precision=bf16", f"train.optimizer={opt}",
                   "train.max_steps=6", "train.log_every=2", "data.eval=null", "train.lr=1e-3")
        results[opt] = {"rc": r["rc"], "losses": [x["loss"] for x in r["rows"] if "loss" in x],
                        **({"tail": r["tail"]} if r["rc"] else {})}
    return {"ok": all(v["rc"] == 0 and len(v["losses"]) == 3 for v in results.values()), **results}


@check("train_fsdp2_one_process")
def _():
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "1"]
    results = {}
    for row in ("lora", "lst+train.loss_chunk_size=16+data.task=causal_lm", "full"):
        name, *extra = row.split("+")
        r = _train(f"fsdp_{name}", f"method.name={name}", *extra, "train.max_steps=4", "train.log_every=2",
                   "data.eval=null", "train.max_grad_norm=0.5", launch=launch)
        results[name] = {"rc": r["rc"], "losses": [x["loss"] for x in r["rows"] if "loss" in x],
                         **({"tail": r["tail"]} if r["rc"] else {})}
    return {"ok": all(v["rc"] == 0 and len(v["losses"]) == 2 for v in results.values()), **results}


@check("train_cuda_oom_one_line")
def _():
    # Causal LM logits alone: 2048 x 512 x 49152 fp32 = 206 GB
    r = _train("oom", "method.name=full", "data.task=causal_lm", "train.batch_size=2048", "data.max_length=512",
               "train.max_steps=2", "data.eval=null", data=_data(2048, 60))
    lines = [x for x in r["stdout"].splitlines() if x.startswith("sidetune: error:")]
    return {"ok": r["rc"] == 2 and len(lines) == 1 and "out of memory at step 1" in lines[0]
            and "Traceback" not in r["stdout"], "line": lines[:1], **({"tail": r["tail"]} if r["rc"] != 2 else {})}


if __name__ == "__main__":
    ok = all(v["ok"] for v in REPORT.values())
    print(f"gpu_paths_check: {'all passed' if ok else 'FAILED: ' + ', '.join(k for k, v in REPORT.items() if not v['ok'])}")
    sys.exit(0 if ok else 1)
