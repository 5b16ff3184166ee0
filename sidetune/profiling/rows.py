"""Which rows a profile has (`resolve_rows`), and what one row holds (`Row`: every field documented once).

A row is one training step of one method (or a no-grad forward, the floor) on a random token batch. The aliases
qlora and qlst are LoRA and LST on a 4-bit base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError
from sidetune.fields import opt

# alias -> (method, model.quantize, method settings): a 4-bit base, or a LoRA variant profiled under its own name
# (a DoRA row's magnitude vector and norm, an init's one-time SVD / QR / LoftQ fit).
ALIASES: dict[str, tuple[str, str | None, dict[str, object]]] = {
    "qlora": ("lora", "nf4", {}), "qlst": ("lst", "nf4", {}), "dora": ("lora", None, {"dora": True}),
    "pissa": ("lora", None, {"init": "pissa"}), "olora": ("lora", None, {"init": "olora"}),
    "loftq": ("lora", "nf4", {"init": "loftq"}),
}


def alias_overrides(alias: str) -> list[str]:
    """The config overrides an alias stands for, beyond method.name."""
    import json

    _, quantize, settings = ALIASES[alias]
    return [*([f"model.quantize={quantize}"] if quantize else []),
            *(f"method.{k}={json.dumps(v)}" for k, v in settings.items())]


def label_for(method_cfg, quantize: str | None) -> str:
    """A config's row label: the most specific alias it is an instance of, else its method's name."""
    matches = [(len(settings), a) for a, (m, q, settings) in ALIASES.items() if m == method_cfg.name and
               q == quantize and all(getattr(method_cfg, k, None) == v for k, v in settings.items())]
    return max(matches)[1] if matches else method_cfg.name
GiB, MiB = 1024**3, 1024**2





@dataclass
class RowSpec:
    label: str
    method: str | None  # None: the no-grad forward floor
    overrides: list[str] = field(default_factory=list)  # section.key=value, as `sidetune train` takes them


def resolve_rows(methods: str, model: str, task: str, batch: int, seq: int, sets: list[str],
                 references: bool = True, common: list[str] | None = None) -> list[RowSpec]:
    """The rows to profile: the requested methods (`all` = every registered method plus the aliases whose method is
    registered) and, with `references`, the full fine-tuning reference and the no-grad floor(s). `sets` are overrides
    for every row (train.loss_chunk_size=1024) or for one label or method (lora.r=16 applies to lora and qlora rows;
    qlora.train.gradient_checkpointing=true to the qlora row only)."""
    from sidetune.config import load_config
    from sidetune.methods import METHODS

    available = {**{m: m for m in METHODS}, **{a: v[0] for a, v in ALIASES.items() if v[0] in METHODS}}
    if methods.strip() == "all":  # every method that trains this task (PET classifies only, ...)
        names = [n for n, m in available.items() if task in METHODS[m].tasks]
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        if name not in available:
            raise SidetuneError(f"--methods: unknown method {name!r}; choose from {', '.join(available)} or all")
    if references and "full" not in names and "full" in METHODS:
        names.append("full")  # the reference every profile carries
    from sidetune.tasks import get_task

    if common is None:  # else: the settings of a recipe (recipe_rows)
        common = [f"model.name={model}", f"data.task={task}", f"train.batch_size={batch}", f"data.max_length={seq}"]
        if get_task(task).classifies:  # a two-class task (methods that verbalize labels need their names)
            common += ["data.num_labels=2", 'data.label_names=["negative", "positive"]']
    global_sets, scoped = [], []
    for item in sets:
        key = item.partition("=")[0]
        if "=" not in item or "." not in key:
            raise SidetuneError(f"--set {item!r} must look like section.key=value or method.key=value")
        (global_sets if key.split(".")[0] in ("model", "data", "train") else scoped).append(item)
    for item in scoped:
        scope = item.split(".")[0]
        if scope not in available and scope not in METHODS and scope != "method":
            raise SidetuneError(f"--set {item!r}: {scope!r} is no config section, method or alias")
    rows = []
    quantized = set()
    for name in names:
        method = available[name]
        overrides = [*common, *global_sets, f"method.name={method}", *(alias_overrides(name) if name in ALIASES
                                                                        else [])]
        for item in scoped:
            scope, _, rest = item.partition(".")
            if scope in (name, method, "method"):
                # qlora.r=16 sets the method's field; qlora.train.gradient_checkpointing=true a section's, one row only
                overrides.append(rest if rest.split(".")[0] in ("model", "data", "train") else f"method.{rest}")
        rows.append(RowSpec(name, method, overrides))
        quantized.add(load_config(None, overrides).model.quantize)  # validates every override now
    floors = [RowSpec("floor" if q is None else f"floor-{q}", None,
                      [*common, *global_sets, *([f"model.quantize={q}"] if q else [])])
              for q in sorted(quantized, key=lambda q: q or "")]
    return floors + rows if references else rows



def recipe_rows(path: str, model: str | None, batch: int | None, seq: int | None, methods: str | None,
                sets: list[str]) -> list[RowSpec]:
    """A run config profiled as it is: its floor (same base, quantization, loss and precision settings, forward
    only), the recipe's own row (its method, train and data settings; batch from train.batch_size and seq from
    data.max_length unless given), and any `methods` under the same model, data and train settings."""
    import json

    import yaml

    from sidetune.config import load_config

    cfg = load_config(path)  # validates the recipe as `sidetune train` would
    raw = yaml.safe_load(Path(path).read_text()) or {}
    shared = [f"{section}.{k}={json.dumps(v)}" for section in ("model", "data", "train")
              for k, v in (raw.get(section) or {}).items()]
    shared += [*([f"model.name={model}"] if model else []), *([f"train.batch_size={batch}"] if batch else []),
               *([f"data.max_length={seq}"] if seq else []), *(s for s in sets if s.split(".")[0] in
                                                                ("model", "data", "train"))]
    own = [f"method.{k}={json.dumps(v)}" for k, v in (raw.get("method") or {}).items()]
    own += [s for s in sets if s.startswith("method.")]  # --set method.r=32: the recipe row's own method
    quantize = load_config(None, shared).model.quantize
    label = label_for(cfg.method, quantize)
    rows = [RowSpec("floor" if quantize is None else f"floor-{quantize}", None, shared),
            RowSpec(f"{label} (recipe)", cfg.method.name, [*shared, *own])]
    if methods:
        rows += resolve_rows(methods, "", cfg.data.task, 0, 0, list(sets), references=False, common=shared)
    for row in rows:
        load_config(None, row.overrides)  # every row validates now, before anything runs
    return rows


@dataclass
class Row:
    """One row of profile.json (null where a number does not apply)."""

    label: str | None = opt(None, "Row name: a method, an alias (qlora = lora + nf4, qlst = lst + nf4), floor, floor-nf4.")
    method: str | None = opt(None, "METHODS key, or null for a floor row.")
    model: str | None = opt(None, "The model that ran (preset, alias or directory).")
    task: str | None = opt(None, "data.task of the step.")
    batch: int | None = opt(None, "Batch size; tokens = batch * seq (preference pairs: 2 * batch * seq, the chosen "
                                  "and rejected rows).")
    objective: str | None = opt(None, "train.objective of the step: supervised, dpo or simpo (null for a floor).")
    reference: str | None = opt(None, "dpo: where the reference log-probs come from (Method.reference): "
                                      "in_forward, parts_off or precomputed.")
    seq: int | None = opt(None, "Sequence length of the random batch.")
    device: str | None = opt(None, "cuda, cpu or meta (meta: prediction only).")
    target: str | None = opt(None, "The device the prediction is for (cuda or cpu).")
    quantize: str | None = opt(None, "model.quantize of the row.")
    dtype: str | None = opt(None, "Resolved weight dtype.")
    mixed_precision: str | None = opt(None, "Resolved autocast: no, bf16 or fp16.")
    loss_chunk_size: int | None = opt(None, "train.loss_chunk_size (0 = one-shot loss).")
    gradient_checkpointing: bool | None = opt(None, "train.gradient_checkpointing.")
    optimizer: str | None = opt(None, "train.optimizer (null for a floor row).")
    params_total: int | None = opt(None, "Parameter count (a 4-bit weight counts its logical N x K).")
    params_trainable: int | None = opt(None, "Trainable parameter count.")
    weights_bytes: int | None = opt(None, "Bytes of the distinct weight storages (4-bit: packed bytes + quant state).")
    grads_bytes: int | None = opt(None, "Bytes of the gradients after backward.")
    optimizer_bytes: int | None = opt(None, "Bytes of the optimizer state.")
    act_backbone_bytes: int | None = opt(
        None, "Saved for backward inside backbone modules: the gradient-to-input cost.")
    act_method_bytes: int | None = opt(None, "Saved for backward inside the modules the method created.")
    act_head_bytes: int | None = opt(None, "Saved for backward in the task head, output embedding and loss.")
    act_total_bytes: int | None = opt(None, "All bytes saved for backward (each storage once).")
    fwd_flops: int | None = opt(None, "Forward matmul + attention FLOPs.")
    bwd_dx_flops_backbone: int | None = opt(None, "Backward dL/dx FLOPs in the backbone (the gradient-to-input work).")
    bwd_dx_flops_method: int | None = opt(None, "Backward dL/dx FLOPs in the method's modules.")
    bwd_dx_flops_head: int | None = opt(None, "Backward dL/dx FLOPs in head and loss.")
    bwd_dw_flops_backbone: int | None = opt(None, "Backward dL/dW FLOPs for backbone weights (full fine-tuning).")
    bwd_dw_flops_method: int | None = opt(None, "Backward dL/dW FLOPs for the method's weights.")
    bwd_dw_flops_head: int | None = opt(None, "Backward dL/dW FLOPs for the head.")
    bwd_dx_flops: int | None = opt(None, "All backward dL/dx FLOPs.")
    bwd_dw_flops: int | None = opt(None, "All backward dL/dW FLOPs.")
    recompute_flops: int | None = opt(
        None, "Matmul FLOPs run in backward outside dL/dx and dL/dW: recomputed forwards (checkpointing, chunked loss).")
    step_time_s: float | None = opt(None, "Median seconds of the timed steps (real devices).")
    tokens_per_s: float | None = opt(None, "batch * seq / step_time_s.")
    tracked_peak_bytes: int | None = opt(None, "Live-storage peak of the real step, followed op by op.")
    peak_phase: str | None = opt(None, "Phase of that peak: forward, backward or optimizer.")
    peak_breakdown: dict | None = opt(None, "That peak split by category (weights, grads, activations, ...).")
    cuda_max_allocated_bytes: int | None = opt(None, "torch.cuda.max_memory_allocated over the tracked step.")
    cuda_max_reserved_bytes: int | None = opt(None, "torch.cuda.max_memory_reserved (nvidia-smi shows more still).")
    measured_peak_bytes: int | None = opt(None, "The measured number the prediction is judged against.")
    measured_peak_source: str | None = opt(None, "Where measured_peak_bytes comes from.")
    predicted_peak_bytes: int | None = opt(None, "Peak of the same step on fake tensors (nothing allocated).")
    predicted_peak_phase: str | None = opt(None, "Phase of the predicted peak.")
    predicted_breakdown: dict | None = opt(None, "The predicted peak split by category.")
    predicted_on: str | None = opt(None, "What the prediction ran on.")
    prediction_error: float | None = opt(None, "predicted / measured - 1.")
    host_bytes: int | None = opt(
        None, "Peak bytes the step kept in host memory instead of on the device (LST's method.ladder_offload); "
              "outside every peak above.")
    init_s: float | None = opt(None, "Seconds the method's apply took, once per run (its init: PiSSA's SVD, OLoRA's QR, "
                                     "LoftQ's fit; real devices).")
    init_peak_bytes: int | None = opt(None, "Most bytes the method's apply had allocated at once (its init's one-time "
                                            "memory, over the loaded model), measured on the real device.")
    predicted_init_peak_bytes: int | None = opt(None, "The same on fake tensors (the live-storage tracker).")
    block_bytes: int | None = opt(None, "Weight bytes of the largest transformer block (FSDP's unit of all-gather).")
    processes: int | None = opt(None, "--processes the per-GPU prediction is for (1: a single process).")
    shard: str | None = opt(None, "--shard: ddp or fsdp.")
    per_gpu_peak_bytes: int | None = opt(None, "Predicted peak per GPU under --processes / --shard (see shard.py).")
    per_gpu_note: str | None = opt(None, "How per_gpu_peak_bytes was derived from the one-process prediction.")
    error: str | None = opt(None, "Why a row has no numbers (e.g. CUDA out of memory), else null.")
    extra: dict[str, Any] = field(default_factory=dict)  # anything else a row carries (e.g. prediction_failed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}
