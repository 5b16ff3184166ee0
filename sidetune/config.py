"""Typed run configuration: dataclasses <- YAML <- dotted `section.key=value` overrides, validated early.

A run config has four sections. `model`, `data` and `train` are fixed dataclasses below; `method` is the config
dataclass of whichever method `method.name` picks from `sidetune.methods.METHODS`, so every method validates its own
fields. Any unknown key or wrong type is rejected with one line (and a suggestion for a misspelt key) before a model
is loaded or a run directory is created.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sidetune.errors import SidetuneError, one_line
from sidetune.fields import opt
from sidetune.tasks import Task, get_task


@dataclass
class ModelConfig:
    name: str = opt(
        "minilm",
        "An alias (minilm, smollm2-135m), a random-init shape preset (tiny-llama, llama-8b, ...; see "
        "models.PRESETS), or a local Hugging Face model directory.",
    )
    dtype: str = opt(
        "auto", "Weight dtype: auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16.")
    quantize: str | None = opt(
        None,
        "Quantize the frozen base with bitsandbytes: null, nf4, fp4 (4-bit) or int8. nf4 + lora = QLoRA, nf4 + "
        "lst = Q-LST.",
    )
    double_quant: bool = opt(
        True,
        "4-bit only: quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit/param saved).",
    )
    compute_dtype: str = opt(
        "auto",
        "4-bit only: dtype the dequantized matmul runs in. auto = bfloat16 on CUDA, float32 on CPU (bf16 is ~20x "
        "slower on AVX2 CPUs).",
    )
    tokenizer: str | None = opt(
        None, "Tokenizer directory; null = the model's own (presets borrow their family's real tokenizer).")
    attn_implementation: str | None = opt(
        None, "Attention implementation passed to transformers (sdpa, eager, ...); null = transformers' default.")
    init_from: str | None = opt(
        None,
        "A finished sidetune run directory (its final/) whose trained weights this run starts from, e.g. DPO after "
        "SFT: the same model and method settings; the new optimizer starts fresh. Preference objectives then take "
        "the starting model's log-probabilities as the reference (precomputed once).",
    )


@dataclass
class DataConfig:
    task: Literal["classification", "causal_lm", "chat", "seq2seq", "preference"] = opt(
        "classification",
        "classification (text or text pair -> label), causal_lm (text, or prompt -> completion), chat (a list of "
        "messages per row, rendered with the tokenizer's chat template, loss on the assistant turns), seq2seq, or "
        "preference (rows with prompt / chosen / rejected as text or as TRL's lists of messages, or chosen / "
        "rejected conversations sharing their first turns; trained with train.objective dpo or simpo).",
    )
    train: str = opt(
        "sst2/train.tsv",
        "Training data: a csv/tsv/json/jsonl/parquet path (relative paths also resolve against sidetune's bundled "
        "data, e.g. sst2/train.tsv), or a dataset name on the hub when online (\"glue:sst2:train\" = "
        "name:config:split).",
    )
    eval: str | None = opt("sst2/dev.tsv", "Evaluation data, same forms; null = no evaluation.")
    text_field: str = opt(
        "sentence", "Column holding the input text (classification, plain causal_lm, seq2seq source).")
    text_pair_field: str | None = opt(None, "Optional second text column for sentence-pair classification.")
    label_field: str = opt("label", "Column holding the integer (or string) label for classification.")
    target_field: str = opt("target", "Column holding the target text for seq2seq.")
    prompt_template: str | None = opt(
        None,
        "causal_lm / seq2seq: Python format string over the row's columns that builds the prompt (source), e.g. "
        "\"Review: {sentence}\\nSentiment:\". {label_name} is available when label_names is set.",
    )
    completion_template: str | None = opt(
        None, "causal_lm / seq2seq: format string for the completion (target); the LM loss is on these tokens only.")
    label_names: list[str] | None = opt(
        None,
        "Names for integer labels: label_names[i] becomes {label_name}. For causal_lm they also define the "
        "choices that eval_accuracy scores (the completion with the highest likelihood wins).",
    )
    num_labels: int | None = opt(
        None, "Number of classes for classification; null = inferred from the training labels.")
    max_length: int = opt(128, "Truncate every tokenized example to this many tokens.")
    packing: bool = opt(
        False,
        "causal_lm / chat: pack the tokenized training examples into rows of at most max_length tokens (first-fit "
        "in a seeded order), each example attending only to itself (position ids restart per example, no cross-"
        "example attention; the loss per example is unchanged). Fewer padded tokens per step; eval rows stay "
        "unpacked. Methods that prepend virtual tokens to a row (prompt/prefix tuning) refuse it.",
    )
    messages_field: str = opt(
        "messages",
        "chat: column holding each conversation, a list of {role, content} messages (OpenAI: system/user/assistant) "
        "or {from, value} (ShareGPT: system/human/gpt); a JSON string of that list also works.",
    )
    chat_template: str | None = opt(
        None,
        "chat: a Jinja chat template (the text, or a path to a .jinja file) replacing the tokenizer's own; null = "
        "the tokenizer's. Resolved into the saved config, so a run reloads with the template it trained with.",
    )
    format: Literal["alpaca", "prompt_completion"] | None = opt(
        None,
        "causal_lm / seq2seq: a named row format instead of prompt_template/completion_template. alpaca: columns "
        "instruction, input, output (the Input section is left out when input is empty); prompt_completion: "
        "columns prompt and completion (the completion is appended as is). Loss on the completion only.",
    )
    max_train_samples: int | None = opt(
        None, "Use only the first N training / evaluation rows (after a seeded shuffle for training); null = all.")
    max_eval_samples: int | None = opt(None, "Use only the first N evaluation rows; null = all.")
    eval_generate: bool = opt(
        False,
        "causal_lm / chat / seq2seq: also decode each eval example's prompt greedily (the tokens before its "
        "completion, or before the last assistant turn) and score the text against the reference: eval_exact_match "
        "and eval_token_f1 (SQuAD-style normalised exact match and token-overlap F1, mean over examples).",
    )
    eval_generate_max_new_tokens: int = opt(
        64, "data.eval_generate: stop each decoding after this many new tokens (or at the end-of-sequence token).")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/sidetune", "Run directory: config.yaml, metrics.jsonl, checkpoints/, final/.")
    seed: int = opt(42, "Seed for initialisation (presets and new modules), shuffling and dropout.")
    lr: float = opt(1e-4, "Peak learning rate after warmup.")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices (biases and norm gains never decay).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    optimizer: str = opt(
        "adamw", "adamw (torch), adamw_8bit, paged_adamw_32bit, paged_adamw_8bit (bitsandbytes; paged ones need CUDA).")
    batch_size: int = opt(32, "Examples per micro-batch (per device).")
    eval_batch_size: int = opt(64, "Examples per evaluation batch (per device).")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int | None = opt(
        None, "Optimizer steps; null = run `epochs` epochs; 0 = no step: evaluate the untrained model, save final/.")
    epochs: float = opt(1.0, "Epochs to train when max_steps is null (fractions allowed).")
    warmup_ratio: float = opt(0.06, "Warmup as a fraction of the optimizer steps (ignored when warmup_steps > 0).")
    warmup_steps: int = opt(0, "Warmup in optimizer steps; overrides warmup_ratio when > 0.")
    scheduler: Literal["cosine", "linear", "constant"] = opt(
        "linear", "LR decay after warmup: cosine, linear or constant.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm; 0 = off.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto",
        "auto = the `accelerate launch` config if any, else bf16 autocast on a bf16-capable GPU, else none; or "
        "no, bf16, fp16.",
    )
    gradient_checkpointing: bool = opt(
        False,
        "Recompute backbone activations in backward (transformers' gradient checkpointing) to trade time for "
        "memory.",
    )
    objective: Literal["supervised", "dpo", "simpo"] = opt(
        "supervised",
        "supervised: the task's own loss. dpo: Direct Preference Optimization on data.task=preference pairs, "
        "against the reference model each method gives (sidetune.preference). simpo: SimPO, reference-free, on "
        "length-normalised log-probabilities.",
    )
    beta: float = opt(0.1, "dpo / simpo: the temperature beta of the preference loss (SimPO's paper uses 2.0-2.5).")
    label_smoothing: float = opt(
        0.0, "dpo / simpo: the probability that a pair's preference is flipped (conservative DPO); in [0, 0.5).")
    simpo_gamma: float = opt(0.5, "simpo: the target reward margin gamma (TRL's simpo_gamma).")
    loss_chunk_size: int = opt(
        0,
        "Causal LM: compute the loss over the vocabulary in chunks of this many tokens so the B x T x V logits "
        "are never held at once (each chunk's logits are recomputed in backward). 0 = one shot.",
    )
    mlp_chunk_size: int = opt(
        0,
        "Forwards without gradient (LST's frozen backbone, evaluation, the profile's floor): run each block's MLP on "
        "at most this many tokens at a time, so its B x T x ff intermediates never exist at once (at long context "
        "the largest tensors of a forward). Same numbers, per token; ignored where the backbone computes "
        "gradients. 0 = off.",
    )
    eval_every: int = opt(100, "Evaluate every N optimizer steps (0 = only at the end).")
    log_every: int = opt(10, "Log a training row every N optimizer steps.")
    save_every: int = opt(
        0, "Save a resumable checkpoint every N optimizer steps (0 = none; the final weights are always saved).")
    save_total_limit: int | None = opt(
        None, "Keep only the newest N checkpoints (older ones are deleted after each save); null = keep all.")
    resume: str | None = opt(
        None,
        "Resume from a checkpoint directory, or \"latest\" for the newest complete one in output_dir/checkpoints "
        "(incomplete ones, from a save that was killed, are skipped and named).",
    )
    overwrite: bool = opt(
        False,
        "Start a new run in an output_dir that holds one: its files (as its manifests list them) are deleted "
        "first. Without it such a directory is refused.",
    )
    skip_nonfinite: bool = opt(
        False,
        "Skip an optimizer step whose loss or gradient norm is inf/NaN (counted in the log as skipped_nonfinite) "
        "instead of stopping the run.",
    )
    tracker: str | None = opt(
        None, "Experiment tracker through accelerate (tensorboard, wandb, ...); null = metrics.jsonl only.")
    num_workers: int = opt(0, "DataLoader worker processes.")
    progress: bool = opt(True, "Show the tqdm progress bar.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the method's own config dataclass, chosen by method.name
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# ---------------------------------------------------------------------------------------------------------------------
# Building a config from YAML + overrides


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config (or start from defaults when path is None), apply `section.key=value` overrides,
    validate every key and type, and return the typed Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            inside = sorted(q.name for q in p.glob("*.yaml"))[:3]
            raise SidetuneError(f"config file {str(path)!r} is a directory; pass the path to a YAML run config"
                                + (f" in it (e.g. {p / inside[0]})" if inside else ""))
        if not p.is_file():
            raise SidetuneError(f"config file {str(path)!r} does not exist; pass the path to a YAML run config")
        try:
            raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise SidetuneError(f"config file {str(path)!r} is not valid YAML: {one_line(e)}") from None
        except _DuplicateKey as e:
            raise SidetuneError(f"config file {str(path)!r}: {e}") from None
        if not isinstance(raw, dict):
            raise SidetuneError(f"config file {str(path)!r} must be a mapping with sections model/method/data/train")
    # method.name first: choosing a method starts its section afresh (the YAML's fields of another method would not
    # fit it), and a method.* override given before method.name on the command line must survive that.
    names = [o for o in overrides if _override_key(o) == "method.name"]
    for item in [*names, *(o for o in overrides if _override_key(o) != "method.name")]:
        apply_override(raw, item)
    return from_dict(raw)


def _override_key(item: str) -> str:
    return item.partition("=")[0].strip()


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML silently keeps the last value, so
    `lr: 1e-3` above a forgotten `lr: 1e-5` would train with the second)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the safe loader's own error ("found unhashable key") follows
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice in one section (lines {seen[key]} and {line}); "
                                    f"YAML would keep the last silently: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one dotted override `section.key=value` to a raw config dict; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise SidetuneError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
    section, name = parts
    if section not in (*SECTIONS, "method"):
        raise SidetuneError(f"unknown config section {section!r}{_suggest(section, [*SECTIONS, 'method'])}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, dict):
        # No config field is a mapping: `data.prompt_template={sentence}` or `Review: {sentence}` is text, which YAML
        # would read as a mapping. Keep the text as given (leading spaces included).
        parsed = value
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    if section == "method" and name == "name" and raw["method"].get("name") not in (None, parsed):
        # Switching methods starts the method section afresh: the old method's fields would not fit the new one.
        raw["method"] = {}
    raw[section][name] = parsed


def from_dict(raw: dict[str, Any]) -> Config:
    from sidetune.methods import METHODS  # late import: methods import config types

    raw = dict(raw)
    unknown = set(raw) - {*SECTIONS, "method"}
    for key in sorted(unknown):
        raise SidetuneError(f"unknown config section {key!r}{_suggest(key, [*SECTIONS, 'method'])}")
    cfg = Config()
    for section, cls in SECTIONS.items():
        setattr(cfg, section, _build(cls, raw.get(section) or {}, section))
    method_raw = dict(raw.get("method") or {})
    name = method_raw.setdefault("name", "lora")
    if name not in METHODS:
        raise SidetuneError(f"unknown method {name!r}{_suggest(str(name), list(METHODS))}; choose one of {', '.join(METHODS)}")
    cfg.method = _build(METHODS[name].Config, method_raw, "method")  # its __post_init__ validates its fields
    if cfg.data.task not in METHODS[name].tasks:
        raise SidetuneError(f"method {name!r} does not train data.task={cfg.data.task}; it trains "
                            f"{', '.join(sorted(METHODS[name].tasks))}")
    if cfg.data.packing and not METHODS[name].packing:
        raise SidetuneError(f"method {name!r} cannot train on packed rows: its virtual tokens belong to one "
                            f"example and cannot serve the several that data.packing=true puts in a row; set "
                            f"data.packing=false")
    _expand_user(cfg)
    validate(cfg)
    return cfg


# Fields that name a file or directory (some may also be something else: a preset, a hub name, template text).
PATH_FIELDS = ("model.name", "model.tokenizer", "model.init_from", "data.train", "data.eval", "data.chat_template",
               "train.output_dir", "train.resume")


def _expand_user(cfg: Config) -> None:
    """`~` and `~user` expanded in every path field, as a shell would (a quoted `train.output_dir=~/x` would
    otherwise create a directory named `~`); the saved config then holds the real path."""
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value.startswith("~") and "\n" not in value:
            setattr(getattr(cfg, section), name, os.path.expanduser(value))


def validate(cfg: Config) -> None:
    """Cross-field checks that no single type annotation can express."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.quantize not in (None, "nf4", "fp4", "int8"):
        raise SidetuneError(f"model.quantize={m.quantize!r} is not supported; use null, nf4, fp4 or int8")
    for key in ("dtype", "compute_dtype"):
        if getattr(m, key) not in ("auto", "float32", "bfloat16", "float16"):
            raise SidetuneError(f"model.{key}={getattr(m, key)!r} is not a dtype; use auto, float32, bfloat16 or float16")
    if t.optimizer not in ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"):
        raise SidetuneError(
            f"train.optimizer={t.optimizer!r} is unknown; use adamw, adamw_8bit, paged_adamw_32bit or paged_adamw_8bit"
        )
    _check_ranges(cfg)
    if t.max_steps is not None and t.max_steps < 0:
        raise SidetuneError(f"train.max_steps must be >= 0 (0 = evaluate only; null = train for train.epochs), "
                            f"got {t.max_steps}")
    if t.tracker is not None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        if t.tracker not in LOGGER_TYPE_TO_CLASS:
            raise SidetuneError(f"train.tracker={t.tracker!r} is unknown{_suggest(t.tracker, list(LOGGER_TYPE_TO_CLASS))}; "
                                f"use one of {', '.join(LOGGER_TYPE_TO_CLASS)} or null")
        if importlib.util.find_spec(t.tracker) is None:
            raise SidetuneError(f"train.tracker={t.tracker} needs its package; run: pip install {t.tracker}")
    if t.lr <= 0:
        raise SidetuneError(f"train.lr must be > 0, got {t.lr}")
    task = get_task(d.task)
    if task.seq2seq and d.completion_template is None and not d.target_field:
        raise SidetuneError("data.task=seq2seq needs data.target_field or data.completion_template")
    if d.packing and not task.shift_labels:
        raise SidetuneError(f"data.packing=true packs decoder examples (data.task=causal_lm or chat), not "
                            f"data.task={d.task}; set data.packing=false")
    if task.pairs and t.objective == "supervised":
        raise SidetuneError("data.task=preference trains on pairs with a preference loss; set train.objective=dpo "
                            "(or simpo)")
    if t.objective != "supervised" and not task.pairs:
        raise SidetuneError(f"train.objective={t.objective} needs preference pairs; set data.task=preference (rows "
                            f"with prompt / chosen / rejected)")
    if t.objective != "supervised":
        if not (t.beta > 0 and math.isfinite(t.beta)):
            raise SidetuneError(f"train.beta must be a finite number > 0, got {t.beta}")
        if not 0 <= t.label_smoothing < 0.5:
            raise SidetuneError(f"train.label_smoothing must be in [0, 0.5), got {t.label_smoothing}")
        if d.packing:
            raise SidetuneError("data.packing=true does not apply to preference pairs (a chosen and a rejected "
                                "answer are scored as rows of their own); set data.packing=false")
        if d.eval_generate:
            raise SidetuneError("data.eval_generate=true is not supported with data.task=preference (the eval "
                                "scores pairs: reward accuracy and margins); set data.eval_generate=false")
    if not task.shift_labels and t.loss_chunk_size:
        raise SidetuneError("train.loss_chunk_size applies to data.task=causal_lm only; set it to 0")
    _check_eval_generate(d, task)


def _check_eval_generate(d: DataConfig, task: Task) -> None:
    """data.eval_generate needs a model that decodes and examples with a prompt before their completion."""
    if d.eval_generate_max_new_tokens < 1:
        raise SidetuneError(f"data.eval_generate_max_new_tokens must be >= 1, got {d.eval_generate_max_new_tokens}")
    if not d.eval_generate:
        return
    if not task.generates:
        raise SidetuneError(f"data.eval_generate=true needs a task that generates text; data.task={d.task} predicts "
                            f"labels (its eval_accuracy scores them); set data.eval_generate=false")
    if task.shift_labels and not task.conversational and not (d.prompt_template or d.completion_template or d.format):
        raise SidetuneError("data.eval_generate=true needs prompt -> completion examples, and plain-text causal_lm "
                            "data has no prompt; set data.prompt_template / data.completion_template or data.format "
                            "(or data.task=chat)")


def _check_ranges(cfg: Config) -> None:
    """Every numeric field of model/data/train inside its meaningful range (method fields check their own)."""
    d, t = cfg.data, cfg.train
    at_least = {  # key: (value, minimum); None values are "off"
        "train.batch_size": (t.batch_size, 1), "train.eval_batch_size": (t.eval_batch_size, 1),
        "train.grad_accum": (t.grad_accum, 1), "data.max_length": (d.max_length, 1),
        "train.log_every": (t.log_every, 1), "train.eval_every": (t.eval_every, 0),
        "train.save_every": (t.save_every, 0), "train.save_total_limit": (t.save_total_limit, 1),
        "train.warmup_steps": (t.warmup_steps, 0), "train.num_workers": (t.num_workers, 0),
        "train.loss_chunk_size": (t.loss_chunk_size, 0), "train.seed": (t.seed, 0),
        "train.mlp_chunk_size": (t.mlp_chunk_size, 0),
        "data.max_train_samples": (d.max_train_samples, 1), "data.max_eval_samples": (d.max_eval_samples, 1),
        "data.num_labels": (d.num_labels, 2),
    }
    for key, (value, minimum) in at_least.items():
        if value is not None and value < minimum:
            raise SidetuneError(f"{key} must be >= {minimum}, got {value}")
    if t.seed >= 2**32:
        raise SidetuneError(f"train.seed must be below 2**32, got {t.seed}")
    floats = {"train.lr": t.lr, "train.weight_decay": t.weight_decay, "train.adam_beta1": t.adam_beta1,
              "train.adam_beta2": t.adam_beta2, "train.adam_eps": t.adam_eps, "train.epochs": t.epochs,
              "train.warmup_ratio": t.warmup_ratio, "train.max_grad_norm": t.max_grad_norm}
    for key, value in floats.items():
        if not math.isfinite(value):
            raise SidetuneError(f"{key} must be a finite number, got {value}")
    for key, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        if not 0 <= value < 1:
            raise SidetuneError(f"{key} must be in [0, 1), got {value}")
    if not 0 <= t.warmup_ratio <= 1:
        raise SidetuneError(f"train.warmup_ratio is a fraction of the steps and must be in [0, 1], got "
                            f"{t.warmup_ratio} (for a step count use train.warmup_steps)")
    if t.epochs <= 0 and t.max_steps is None:
        raise SidetuneError(f"train.epochs must be > 0 (or set train.max_steps), got {t.epochs}")
    for key, value in (("train.adam_eps", t.adam_eps),):
        if value <= 0:
            raise SidetuneError(f"{key} must be > 0, got {value}")
    for key, value in (("train.weight_decay", t.weight_decay), ("train.max_grad_norm", t.max_grad_norm)):
        if value < 0:
            raise SidetuneError(f"{key} must be >= 0, got {value}")
    if t.resume is not None and not t.resume.strip():
        raise SidetuneError("train.resume is empty; pass a checkpoint directory, latest, or null")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------------
# Typed construction with one-line errors


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise SidetuneError(f"config section {prefix!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            owner = f" for method {raw.get('name')!r}" if prefix == "method" else ""
            raise SidetuneError(f"unknown config key '{prefix}.{key}'{owner}{_suggest(key, names, prefix)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return `value` as type `hint`, accepting the lossless conversions YAML needs (e.g. '3e-4' -> 3e-4)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except SidetuneError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise SidetuneError(f"{key}={value!r} is not allowed; use one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]  # a single item is a one-element list: method.targets=q_proj
        if not isinstance(value, (list, tuple)):
            raise SidetuneError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SidetuneError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _fail(key, value, "an integer")
            except ValueError:
                pass
        _fail(key, value, "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, value, "a number")
    if hint is str:
        if value is None:
            _fail(key, value, "a string")
        if isinstance(value, (dict, list)):
            _fail(key, value, "a string")
        return str(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    _fail(key, value, getattr(hint, "__name__", str(hint)))


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise SidetuneError(f"{key} must be {expected}, got {value!r}")


def _suggest(key: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if not close:
        return f" (valid keys: {', '.join(options)})" if prefix else ""
    return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"


