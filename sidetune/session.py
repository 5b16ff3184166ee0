"""The one build-and-step path. `build` turns a config into everything a step needs (tokenizer, data, model, method,
the module to train, the optimizer); `train_step` is one optimizer step. The trainer's loop, `sidetune profile`,
`sidetune plan`, a reload of a finished run (`sidetune.rundir`) and the bench scripts all call these two, so what the profile
measures is what the trainer runs, by construction.

All input errors surface in `build`, before a run directory is touched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sidetune import chat, checks
from sidetune import data as data_lib
from sidetune.config import Config, TrainConfig
from sidetune.errors import SidetuneError
from sidetune.losses import ChunkedLMLoss
from sidetune.methods import Context, Method, build_method, trainable_parameters
from sidetune.methods._inject import is_quantized_linear
from sidetune.models import load_model, load_tokenizer, quantize_linears, quantizer
from sidetune.preference import PreferenceModule
from sidetune.tasks import Task, get_task


@dataclass
class Setup:
    """Everything a run needs, built and validated before any file is written."""

    cfg: Config  # a copy of the config given to `build`, with what the build resolved (labels, chat template)
    task: Task  # the data's task (what the loss and the metrics are)
    tokenizer: PreTrainedTokenizerBase | None
    data: data_lib.TaskData | None
    method: Method
    base: nn.Module  # the model as loaded, before the method touched it (its modules are "the backbone")
    base_modules: set[int]  # ids of the loaded model's modules: what the memory accounting calls backbone
    model: nn.Module  # the module the method returned; its trainable set is what gets saved
    module: nn.Module  # what a step calls: `model`, checkpointed and/or wrapped in the chunked LM loss as configured
    optimizer: torch.optim.Optimizer | None = None

    @property
    def preference(self) -> PreferenceModule | None:
        """The preference objective's module (train.objective dpo / simpo), or None for a supervised run."""
        return self.module if isinstance(self.module, PreferenceModule) else None

    @property
    def trainable(self) -> list[nn.Parameter]:
        return list(trainable_parameters(self.model).values())


def build(cfg: Config, device: torch.device | str, *, with_data: bool = True, with_optimizer: bool = False,
          fake: bool = False, reload: bool = False, apply: Callable[[nn.Module], nn.Module] | None = None,
          watch_apply: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> Setup:
    """Build a run's model and method (and data, optimizer) on `device`.

    `cfg` is never changed: the build works on a copy, and what it resolves (the label names and count read from
    the data, the chat template's text) is in the returned `Setup.cfg`, which the trainer records in the run.

    with_data: read and tokenize data.train / data.eval.
    with_optimizer: also make the optimizer (`make_optimizer`).
    fake: the build runs under FakeTensorMode for a prediction (no tokenizer, no data, stand-in 4-bit weights).
    reload: the trained weights and the frozen tensors the init changed will be loaded over whatever the method's
        init computes (`sidetune.rundir`), so a data-dependent init (LoRA-GA, Fisher pruning) is skipped: a reload
        needs no training data.
    apply: replaces the method's apply (bench/memory.py profiles PEFT's models on the same build).
    watch_apply: given the loaded model, a context entered around the method's apply alone (`sidetune profile`
        measures an init's one-time time and memory with it).
    """
    cfg = copy.deepcopy(cfg)
    device = step_device = torch.device(device)
    # Mixed precision, task against architecture, max_length against positions: before any tokenizer, data or weight.
    checks.check_run(cfg, device, precision=with_optimizer and not fake)
    task = get_task(cfg.data.task)
    method = build_method(cfg.method)
    tokenizer = None if fake else load_tokenizer(cfg.model)
    if tokenizer is not None and cfg.data.chat_template is not None:
        # Here, not only on the data path: every build (the trainer, sidetune.load, export, generate, chat) renders
        # with the template the run trained with. A file's text goes into the copy, so the recorded config carries it.
        chat.use_template(tokenizer, cfg.data, cfg.model.name)
    data = data_lib.build(cfg.data, tokenizer, cfg.train.seed) if with_data and not fake else None
    if data is not None and data.num_labels is not None:
        cfg.data.num_labels = data.num_labels  # resolved into the recorded config, so a reload needs no data
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    device = build_device(device)  # the optimizer below is still made for the device the run steps on
    # LoftQ reads the 16-bit weights before anything is quantized: the base loads in float, and is quantized after
    # `apply` with the same quantizer the init fitted to (a reload reads the stored 4-bit base instead).
    float_first = cfg.model.quantize is not None and not reload and method.reads_float_base()
    load_cfg = dataclasses.replace(cfg.model, quantize=None) if float_first else cfg.model
    base = load_model(load_cfg, method.model_task(task), cfg.data.num_labels, device, pad_id, seed=cfg.train.seed,
                      fake=fake)
    if cfg.data.packing:
        _allow_packed_rows(base)
    # Held until the method has applied: a module it replaces stays alive, so no module it creates can take its id.
    loaded = list(base.modules())
    base_modules = {id(m) for m in loaded}
    calibration = [] if reload else _calibration(method, data, task, tokenizer, cfg, device)
    ctx = Context(task, lambda: load_tokenizer(cfg.model),
                  cfg.data.label_names or (data.label_names if data is not None else None),
                  calibration=calibration, reload=reload, _tokenizer=tokenizer,
                  quantize=quantizer(cfg.model, device, fake) if float_first else None)
    if cfg.train.mlp_chunk_size:
        from sidetune.mlp_chunks import chunk_frozen_mlps

        chunk_frozen_mlps(base, cfg.train.mlp_chunk_size)  # the loaded model, before a method wraps its modules
    with watch_apply(base) if watch_apply is not None else contextlib.nullcontext():
        model = apply(base) if apply is not None else method.apply(base, ctx)
    if float_first:  # the frozen linears the init left in float; the new 4-bit layers are backbone
        quantize_linears(model, cfg.model, device, frozen_only=True, fake=fake)
        present = {id(m) for m in model.modules()}
        base_modules = {i for i in base_modules if i in present} | {
            id(m) for m in model.modules() if is_quantized_linear(m)}
    del loaded
    if not trainable_parameters(model):
        raise SidetuneError(f"method {cfg.method.name!r} left no trainable parameter on this model")
    module = training_module(model, cfg, method)
    optimizer = None
    if with_optimizer:
        _check_autocast(model, master_weights(model), cfg, step_device)
        optimizer = make_optimizer(model, method, cfg.train, step_device)
    return Setup(cfg, task, tokenizer, data, method, base, base_modules, model, module, optimizer)


def fsdp_launch() -> bool:
    """Whether this process is one of an `accelerate launch` FSDP run (accelerate sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def build_device(device: torch.device) -> torch.device:
    """Where `build` materialises the model for a run stepping on `device`: there, except in an FSDP launch on
    CUDA, where it is built (and the method applied) in host memory. `accelerator.prepare` then runs FSDP2's
    fully_shard, which moves only this process's shard of each parameter (and the buffers) onto the GPU: a model
    that needs FSDP to fit is never whole on one GPU (built on the GPU first, every rank held the full 16-bit model
    before sharding and ran out of memory where `sidetune plan --shard fsdp` said it fits). The host holds one whole
    copy per process while it builds. FSDP with a 4-bit base is refused (profiling/shard.py), so no quantizer runs
    here on the CPU."""
    if device.type == "cuda" and fsdp_launch():
        return torch.device("cpu")
    return device


def _allow_packed_rows(model: nn.Module) -> None:
    """data.packing: the model must take the position ids that keep packed examples apart, and run without a KV
    cache. transformers reads packed rows from position_ids only when there is neither an attention mask nor a
    cache, and a causal LM whose config says use_cache=True makes itself a cache on every forward (training
    included): the mask would then be one plain causal mask over the whole row, across examples."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise SidetuneError(f"data.packing=true needs a model whose forward takes position_ids, and "
                            f"{type(model).__name__} does not; set data.packing=false")
    model.config.use_cache = False  # generate() keeps its own use_cache (the generation config's)


def _calibration(method: Method, data, task: Task, tokenizer, cfg: Config, device) -> list[dict]:
    """The first batches of the training data (a fixed, seeded order), for methods that initialise from data."""
    n = method.calibration_batches()
    if n <= 0 or data is None:
        return []
    from torch.utils.data import DataLoader

    loader = DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=task.collator(tokenizer),
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    batches = []
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == n:
            break
    return batches


def training_module(model: nn.Module, cfg: Config, method: Method) -> nn.Module:
    """The module a step calls: gradient checkpointing switched on and the chunked LM loss wrapped around when the
    config asks."""
    if cfg.train.gradient_checkpointing:
        if not method.backbone_trains and not hasattr(model, "gradient_checkpointing_enable"):
            raise SidetuneError(f"method {cfg.method.name!r} sends no gradient through the backbone, so "
                                f"train.gradient_checkpointing has nothing to save; set it to false")
        # Non-reentrant checkpointing keeps gradients flowing to adapters inside frozen blocks without forcing
        # requires_grad on the embeddings' output (the enable_input_require_grads trap, peft #137).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed the HF method
            model.activation_checkpointing_enable(kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):  # older transformers, and our own wrapper modules
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise SidetuneError(f"method {cfg.method.name!r} does not support train.gradient_checkpointing")
    return forward_module(model, cfg, method)


def forward_module(model: nn.Module, cfg: Config, method: Method | None = None) -> nn.Module:
    """The model itself, or wrapped so that the LM loss is computed in chunks (also for eval and the floor), or in
    the preference objective (train.objective dpo / simpo), with the reference the method declares."""
    t = cfg.train
    if t.objective != "supervised":
        method = method if method is not None else build_method(cfg.method)
        reference = method.reference(bool(cfg.model.init_from))
        return PreferenceModule(model, t.objective, t.beta, t.label_smoothing, t.simpo_gamma, reference,
                                lambda: method.reference_off(model), t.loss_chunk_size)
    return ChunkedLMLoss(model, t.loss_chunk_size) if t.loss_chunk_size else model


def make_optimizer(model: nn.Module, method: Method, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or a bitsandbytes optimizer over the trainable parameters, made float32 masters first
    (`master_weights`)."""
    master_weights(model)
    # A method may split its parameters into groups (LoRA+); by default all trainable parameters share one lr.
    groups = method.param_groups(model, t.lr) if method is not None else None
    if groups is None:
        groups = [{"params": list(trainable_parameters(model).values()), "lr": t.lr}]
    # No weight decay on biases and norm gains (1-D tensors): decaying them hurts and saves nothing.
    split = []
    for g in groups:
        for decay in (True, False):
            params = [p for p in g["params"] if (p.ndim >= 2) == decay]
            if params:
                split.append({**g, "params": params, "weight_decay": t.weight_decay if decay else 0.0})
    kwargs = {"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps}
    name = t.optimizer
    if name.startswith("paged_") and device.type != "cuda":
        # Paged optimizers page state to host memory via CUDA unified memory; on CPU there is nothing to page.
        name = {"paged_adamw_32bit": "adamw", "paged_adamw_8bit": "adamw_8bit"}[name]
        print(f"sidetune: train.optimizer={t.optimizer} needs CUDA; using {name} on CPU")
    if name == "adamw":
        return torch.optim.AdamW(split, fused=device.type == "cuda", **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(split, **kwargs)


def mixed_precision(t: TrainConfig, target: str | None = None, model_dtype: str | None = None) -> str | None:
    """The autocast dtype a run uses: the config's, else the `accelerate launch` config's (None: accelerate
    decides), else the model's own when `model_dtype` (model.dtype) is 16-bit (its trainable parameters are float32
    masters, see `master_weights`: autocast runs them with the 16-bit frozen ones), else bf16 on a GPU with native
    bf16, fp16 (with accelerate's loss scaling) on one without (T4, V100), none on the CPU. `target` asks the same for
    a device this process may not have (a prediction for CUDA on a CPU-only machine assumes a bf16-capable GPU)."""
    from sidetune.models import native_bf16

    if t.mixed_precision != "auto":
        return t.mixed_precision
    if target is None and "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # under `accelerate launch`: its config decides
    if model_dtype in _AUTOCAST:
        return _AUTOCAST[model_dtype]
    if target == "cpu":
        return "no"
    if target == "cuda" and not torch.cuda.is_available():
        return "bf16"
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if native_bf16() else "fp16"


_AUTOCAST = {"bfloat16": "bf16", "float16": "fp16"}


def master_weights(model: nn.Module) -> list[str]:
    """Make every trainable parameter a float32 master (in place: the same Parameter objects, ties kept); returns the
    names of those that were 16-bit.

    A bf16 weight cannot take an AdamW update smaller than about |w| * 2^-9 (it rounds back to itself), so a new task
    head, `full`, BitFit's biases or PET's blocks trained in the checkpoint's bf16 would barely move at a small lr; and
    fp16 gradients are refused by the loss scaler ("Attempting to unscale FP16 gradients"). As accelerate's FSDP2
    path does, the optimizer steps float32 copies and autocast computes in 16 bits."""
    upcast = []
    for name, p in trainable_parameters(model).items():
        if p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            upcast.append(name)
    return upcast


def _check_autocast(model: nn.Module, upcast: list[str], cfg: Config, device: torch.device) -> None:
    """Float32 masters beside 16-bit frozen weights in one layer (a bf16 linear with a float32 bias, a float32 head on
    bf16 hidden states) run only under autocast: refuse a run that turns it off, before anything is written."""
    mp = mixed_precision(cfg.train, model_dtype=cfg.model.dtype) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if not upcast or mp not in ("no", "fp16"):
        return
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    low = sorted(str(d).removeprefix("torch.") for d in frozen & {torch.bfloat16, torch.float16})
    if low and mp == "fp16" and device.type == "cpu":
        raise SidetuneError(f"model.dtype={low[0]} on the CPU: accelerate runs no fp16 autocast there, and the "
                            f"trainable parameters ({upcast[0]}, ...) train as float32 master weights beside {low[0]} "
                            f"frozen ones, which only autocast runs together; use model.dtype=bfloat16 or float32")
    if low and mp == "no":
        raise SidetuneError(f"train.mixed_precision=no with a {low[0]} model: its trainable parameters ({upcast[0]}, "
                            f"...) train as float32 master weights beside {low[0]} frozen ones, which only autocast "
                            f"runs together; set train.mixed_precision=auto (or {_AUTOCAST[low[0]]}), or "
                            f"model.dtype=float32")


def train_step(module: Callable[..., Any], batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               params: Iterable[nn.Parameter], max_grad_norm: float, *, scheduler=None,
               backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
               clip: Callable[..., Any] | None = torch.nn.utils.clip_grad_norm_,
               phase: Callable[[str], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """One training step: forward, backward, gradient clipping, optimizer (and scheduler) step, zero grads.
    Returns the detached loss (still on the device: reading it would force a host-device sync).

    The trainer passes accelerate's `backward` and `clip` (clip=None on accumulation micro-steps, where gradients
    are not yet synchronised; a prepared optimizer skips those steps itself); the profile passes `phase`, a context
    per phase ("forward", "backward", "optimizer") in which it tracks what the step allocates and saves.
    """
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("forward"):
        loss = module(**batch).loss
    with phase("backward"):
        backward(loss)
        if clip is not None and max_grad_norm > 0:
            clip(params, max_grad_norm)
    with phase("optimizer"):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
