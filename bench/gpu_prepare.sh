#!/usr/bin/env bash
# Build .gpu/, the folder a GPU machine without network needs beside the repo to run bench/gpu_check.sh.
#
#   bash bench/gpu_prepare.sh          # on a CPU machine with PyPI access and the repo's .venv (bash .ci/setup)
#
# What it puts there (about 50 MiB; the device tool carries at most 64 MiB with the working tree):
#   .gpu/whl/         wheels the GPU image lacks or has at another version: bitsandbytes (slimmed to its CUDA 13 and
#                     CPU libraries: 43 MB -> ~4 MB), datasets + dill + multiprocess, and transformers at the version
#                     .ci/constraints.txt pins (the suite's version; the image ships 5.17)
#   .gpu/minilm.tar.xz         all-MiniLM-L6-v2 in bf16 (the real-weight training step)
#   .gpu/smollm2-tok.tar.xz    SmolLM2's config and tokenizer without weights: the random-init presets read text with
#                              it (SIDETUNE_CACHE points there on the GPU)
# Python 3.12 / manylinux x86_64 wheels: what the GPU image runs. Idempotent: it rebuilds .gpu/ from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
pin() { sed -n "s/^$1==//p" .ci/constraints.txt; }

rm -rf .gpu.new && mkdir -p .gpu.new/whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
for req in "bitsandbytes==$(pin bitsandbytes)" "datasets==$(pin datasets)" "transformers==$(pin transformers)" \
           "dill<0.4.2" "multiprocess<0.70.20"; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${platforms[@]}" -d .gpu.new/whl "$req"
done

# bitsandbytes ships one native library per CUDA/ROCm/XPU version; with torch on CUDA 13 it loads only
# libbitsandbytes_cuda130.so. Keep that one and the CPU library, and drop the others from RECORD too.
"$PY" - <<'EOF'
import glob, re, zipfile, os
src = glob.glob(".gpu.new/whl/bitsandbytes-*.whl")[0]
keep = re.compile(r"libbitsandbytes_(cuda130|cpu)\.")
dst = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        name = item.filename
        if "libbitsandbytes_" in name and not keep.search(name):
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/RECORD"):
            lines = [l for l in data.decode().splitlines() if "libbitsandbytes_" not in l or keep.search(l)]
            data = ("\n".join(lines) + "\n").encode()
        zout.writestr(item, data)
os.replace(dst, src)
print(f"gpu_prepare: {os.path.basename(src)} slimmed to {os.path.getsize(src) / 2**20:.1f} MiB")
EOF

"$PY" - <<'EOF'
import shutil, tempfile, tarfile
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from sidetune.models import gguf_model_dir, minilm_dir

def pack(folder: Path, name: str, arcname: str) -> None:
    with tarfile.open(f".gpu.new/{name}", "w:xz") as tar:
        tar.add(folder, arcname=arcname)

with tempfile.TemporaryDirectory() as tmp:
    src, out = minilm_dir(), Path(tmp) / "minilm"
    out.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith((".bin", ".onnx", ".h5", ".msgpack")):
            shutil.copy2(f, out / f.name)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    pack(out, "minilm.tar.xz", "minilm")
    tok, src = Path(tmp) / "smollm2-135m-instruct", gguf_model_dir("smollm2-135m")
    tok.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, tok / f.name)
    pack(tok, "smollm2-tok.tar.xz", "smollm2-135m-instruct")
EOF

rm -rf .gpu && mv .gpu.new .gpu
du -ah .gpu | sort -h
# The device tool carries the working tree (tracked + untracked-not-ignored files) plus .gpu: 64 MiB in all.
total=$(( $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) + $(du -sb .gpu | cut -f1) ))
echo "gpu_prepare: repo + .gpu = $(( total / 1048576 )) MiB (the device tool carries at most 64 MiB)"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "gpu_prepare: too large to carry" >&2; exit 1; }
