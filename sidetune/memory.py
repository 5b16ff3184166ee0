"""Memory: the numbers the trainer logs next to the loss.

On CUDA the measured peak is `torch.cuda.max_memory_allocated` (bytes handed out by PyTorch's caching allocator,
what the model really used) and `max_memory_reserved` (what the allocator holds from the driver, closer to what
nvidia-smi shows). On CPU only the process's peak resident set size is available, which includes Python, the
libraries and the dataset.
"""

from __future__ import annotations

import resource
import sys

import torch

GiB = 1024**3


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far, in GiB, under names that say what was measured."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return {"peak_rss_gib": rss / (GiB if sys.platform == "darwin" else 1024**2)}


def short(stats: dict[str, float]) -> str:
    """The one number for a progress bar."""
    key = "peak_allocated_gib" if "peak_allocated_gib" in stats else "peak_rss_gib"
    return f"{stats[key]:.2f}G"
