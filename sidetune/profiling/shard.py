"""Per-GPU memory of a multi-process run, predicted from the one-process step (`--processes N --shard ddp|fsdp`).

The fake-tensor step is run at the per-process batch (train.batch_size is per device). What changes per GPU:

- ddp: every process holds the whole model, its gradients and optimizer state, and DDP's gradient buckets: a flat
  copy of the trainable gradients that all-reduce reads (torch's default `gradient_as_bucket_view=False`), so
  +1x the trainable gradients' bytes.
- fsdp (full shard, FSDP2 semantics): parameters, gradients and optimizer state are split over the N processes, and
  during the forward and backward the parameters of the block being run are all-gathered, with the next block
  prefetched: +2 unsharded blocks in flight. Activations stay those of the per-process batch.

This is an adjustment of the predicted one-process peak by those terms, not a simulation of the collectives: NCCL's
own buffers and allocator fragmentation are not in it.

What the trainer builds where, which this arithmetic assumes: under an FSDP launch each process builds the whole
model in host memory (`session.build_device`), `accelerator.prepare` shards it (accelerate's transformer policy: one
group per decoder layer, `_no_split_modules`, which every sidetune wrapper module forwards; tied embedding and head
in one group; the rest in the root group) and fully_shard moves only the shards onto the GPU. So no GPU ever holds
the whole model, and the host needs one whole copy per process while it builds (not predicted here). Under DDP each
process builds the whole model on its GPU, as the one-process prediction does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidetune.errors import SidetuneError


@dataclass(frozen=True)
class Sharding:
    processes: int = 1
    kind: str = "ddp"  # ddp | fsdp

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise SidetuneError(f"--processes must be >= 1, got {self.processes}")
        if self.kind not in ("ddp", "fsdp"):
            raise SidetuneError(f"--shard {self.kind!r} is not known; use ddp or fsdp")

    @property
    def single(self) -> bool:
        return self.processes == 1

    def refusal(self, quantize: str | None, optimizer: str = "adamw") -> str | None:
        """Why sidetune's trainer refuses a run of a base quantized as `quantize` (trained with `optimizer`) under
        this sharding, or None. The trainer's launch check and the planner both ask this, so a plan never offers a
        run the trainer refuses."""
        if self.kind != "fsdp" or self.single:
            return None
        return fsdp_refusal(quantize) or fsdp_optimizer_refusal(optimizer)


def fsdp_refusal(quantize: str | None) -> str | None:
    """The one rule for what FSDP2 cannot shard today: a 4-bit base. fully_shard drops the bitsandbytes weights'
    quant_state (bitsandbytes issue #1945), so their shards could not be dequantized."""
    if quantize is None:
        return None
    return (f"model.quantize={quantize} with FSDP2 is not supported: fully_shard drops the 4-bit weights' quant_state "
            f"(bitsandbytes issue #1945)")


# bitsandbytes' optimizers that FSDP2 cannot run: their 8-bit state and paged buffers are built per parameter from
# the local tensor, and on DTensor shards they fail with an illegal memory access (bitsandbytes issue #1633).
FSDP_REFUSED_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")


def fsdp_optimizer_refusal(optimizer: str) -> str | None:
    """The one rule for the optimizers FSDP2 cannot step, as the whole one-line refusal (with its fix)."""
    if optimizer not in FSDP_REFUSED_OPTIMIZERS:
        return None
    return (f"train.optimizer={optimizer} with FSDP2 is not supported: bitsandbytes' 8-bit and paged optimizers fail "
            f"on sharded parameters (bitsandbytes issue #1633); use train.optimizer=adamw, or launch with DDP "
            f"(multi_gpu.yaml)")


def per_gpu_peak(step: dict[str, Any], sharding: Sharding) -> tuple[int, str]:
    """(per-GPU peak bytes, one line saying how it was derived) from a `measure` result."""
    peak = step["peak_bytes"]
    if sharding.single:
        return peak, "one process"
    n, grads = sharding.processes, step["grads_bytes"]
    if sharding.kind == "ddp":
        return peak + grads, f"DDP x{n}: the one-process peak + {_gib(grads)} of gradient buckets per GPU"
    weights, optim = step["weights_bytes"], step["optimizer_bytes"]
    # Gradients count as sharded only where the peak falls after backward; during it they are partly alive anyway.
    sharded = weights + optim + (grads if step["peak_phase"] == "optimizer" else 0)
    in_flight = 2 * step["block_bytes"]
    per_gpu = peak - sharded + sharded // n + in_flight
    return per_gpu, (f"FSDP x{n}: weights {_gib(weights)}, optimizer {_gib(optim)}"
                     + (f", grads {_gib(grads)}" if step["peak_phase"] == "optimizer" else "")
                     + f" split {n} ways (-{_gib(sharded - sharded // n)}), + 2 unsharded blocks in flight "
                       f"({_gib(in_flight)}); activations as at the per-GPU batch")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"
