"""P-tuning v2: deep prompt tuning (Liu et al. 2022, arXiv 2110.07602; THUDM/P-tuning-v2), i.e. prefix tuning
(Li & Liang 2021, arXiv 2101.00190) at every layer.

Every attention layer l gets P trainable key/value vectors that each real token attends to besides the sequence:

    head_l(x) = softmax(q [K_l^p ; K_x]^T / sqrt(d)) [V_l^p ; V_x]          (one softmax over prefix + tokens)

The prefix (K_l^p, V_l^p for all layers) is a P x (L * 2 * d_kv) embedding, or with `prefix_projection` the output
of a two-layer tanh MLP over a P x d_kv embedding (the reparameterization of Li & Liang / THUDM). It reaches the
model through the KV cache: a transformers `Cache` whose layers are read-only prefixes (`update` returns
[prefix ; new] without storing the new keys), so the model's own attention, masks and kernels do the work. The
attention mask gets P ones in front; the real tokens keep their positions 0..T-1 (`shift_positions` moves them to
P..P+T-1, as PEFT and THUDM's BERT code do implicitly).

Step 0. A zero prefix is NOT invisible in the formula above: its logits q.0 = 0 add P * e^0 to each softmax
denominator and shrink the attention over the real tokens. And no prefix can be exactly invisible under the joint
softmax while still getting a gradient: invisible means zero softmax mass, and every first-order gradient then
vanishes. `zero_init_attention` is the honest way out, LLaMA-Adapter's zero-init attention (arXiv 2303.16199): the
prefix gets its own softmax, added to the unchanged attention over the tokens,

    head_l(x) = softmax(q K_x^T / sqrt(d)) V_x  +  softmax(q K_l^p^T / sqrt(d)) V_l^p,

with V^p = 0 at init. Step 0 then equals the base exactly, and V^p gets a gradient from step 0 (K^p from step 1, as
LoRA's A with B = 0). It runs through a registered attention function that splits the cached keys at P and calls
the model's own attention (sdpa or eager) on the token part.

Gradient checkpointing works (PEFT refuses it, peft PR #2191): transformers drops `past_key_values` inside
checkpointed layers, because a growing cache would be appended twice when backward replays the layer. The prefix
cache never grows, so `gradient_checkpointing_enable` here checkpoints each block itself (non-reentrant, so the
prefix, which enters through the cache rather than as an argument, still gets its gradient) and keeps the cache.

Still paid (the gradient-to-input cost): the prefix feeds every layer, so backward carries dL/dx through the whole
backbone and autograd keeps its activations.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive, opt
from sidetune.methods._decode import decode_rows, special_tokens, unpadded_rows
from sidetune.methods._inject import freeze
from sidetune.methods.base import Context, Method


@dataclass
class PTuningV2Config:
    name: Literal["ptuning_v2"] = opt("ptuning_v2", "Selects this method.")
    num_virtual_tokens: int = opt(
        20, "Prefix length P: key/value vectors per layer (THUDM uses 4-128 depending on the task).")
    prefix_projection: bool = opt(
        False, "Reparameterize the prefix through a two-layer tanh MLP (Li & Liang; THUDM's --prefix_projection).")
    projection_dim: int = opt(512, "Hidden width of that MLP (THUDM's prefix_hidden_size).")
    dropout: float = opt(0.0, "Dropout on the prefix keys/values (THUDM applies the model's hidden dropout there).")
    zero_init_attention: bool = opt(
        False,
        "false: P-tuning v2 as published, one softmax over [prefix; tokens]; step 0 differs from the base model. "
        "true: zero-init attention (LLaMA-Adapter): the prefix has its own softmax and zero values at init, so "
        "step 0 equals the base model exactly.",
    )
    shift_positions: bool = opt(
        False,
        "Give the real tokens positions P..P+T-1 instead of 0..T-1 (what PEFT and THUDM do; needed to match "
        "them).",
    )

    def __post_init__(self) -> None:
        check_positive("method.num_virtual_tokens", self.num_virtual_tokens)
        check_positive("method.projection_dim", self.projection_dim)
        check_dropout("method.dropout", self.dropout)


# ---------------------------------------------------------------------------------------------------------------------
# The prefix and the cache that carries it


class PrefixEncoder(nn.Module):
    """The trainable prefix: per layer, keys and values of shape (kv_heads, P, head_dim). Parameter layout follows
    PEFT's PrefixEncoder (row p, column ((2 l + kv) h + head) d + i), so the two can share weights in tests."""

    def __init__(self, cfg: PTuningV2Config, num_layers: int, kv_heads: int, head_dim: int,
                 device: torch.device) -> None:
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        kv_dim = kv_heads * head_dim
        out_dim = num_layers * 2 * kv_dim
        # fp32 master weights; the cache casts them to the dtype of the model's keys.
        kw: dict[str, Any] = {"device": device, "dtype": torch.float32}
        if cfg.prefix_projection:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, kv_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(kv_dim, cfg.projection_dim, **kw), nn.Tanh(),
                                           nn.Linear(cfg.projection_dim, out_dim, **kw))
        else:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, out_dim, **kw)
            self.transform = None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.zero_init_attention:
            last = self.transform[-1] if self.transform is not None else self.embedding
            with torch.no_grad():  # zero every value column: the prefix's own attention then adds exactly 0
                value_cols = torch.arange(out_dim, device=device).view(num_layers, 2, kv_dim)[:, 1].reshape(-1)
                if self.transform is not None:
                    last.weight[value_cols] = 0
                    last.bias[value_cols] = 0
                else:
                    last.weight[:, value_cols] = 0

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.embedding.weight
        if self.transform is not None:
            x = self.transform(x)
        x = self.dropout(x)
        # (P, L*2*H*D) -> (L*2, H, P, D): one batch-independent copy; the batch dimension is a broadcast view.
        kv = x.view(x.shape[0], self.num_layers * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]


class PrefixCacheLayer(CacheLayerMixin):
    """One layer's read-only prefix. `update` returns [prefix ; new] and stores nothing, so a layer replayed by
    gradient checkpointing sees exactly what it saw the first time."""

    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b = key_states.shape[0]
        keys = self.keys.to(key_states.dtype).expand(b, *self.keys.shape[-3:])
        values = self.values.to(value_states.dtype).expand(b, *self.values.shape[-3:])
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


def prefix_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    return Cache(layers=[PrefixCacheLayer(k.unsqueeze(0), v.unsqueeze(0)) for k, v in prefix])


# ---------------------------------------------------------------------------------------------------------------------
# zero_init_attention: the prefix's own softmax, added to the model's attention over the tokens


def _separate_prefix_attention(base: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        p = key.shape[-2] - query.shape[-2]  # the read-only prefix cache always returns P + T keys
        # eager has no global entry: each modeling file defines its own eager_attention_forward.
        fn = (ALL_ATTENTION_FUNCTIONS[base] if base != "eager"
              else sys.modules[type(module).__module__].eager_attention_forward)
        mask = attention_mask[..., p:] if isinstance(attention_mask, torch.Tensor) else attention_mask
        out, _ = fn(module, query, key[:, :, p:], value[:, :, p:], mask, dropout=dropout, scaling=scaling, **kwargs)
        k, v = key[:, :, :p], value[:, :, :p]
        if query.shape[1] != k.shape[1]:  # grouped-query attention: each key/value head serves several query heads
            k = k.repeat_interleave(query.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(query.shape[1] // v.shape[1], dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probs = torch.softmax((query @ k.transpose(-1, -2)).float() * scale, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p=dropout, training=module.training)
        return out + (probs @ v).transpose(1, 2), None

    return attention


def _use_separate_prefix_attention(model: nn.Module) -> None:
    base = model.config._attn_implementation or "eager"
    if base.startswith("sidetune_prefix_"):
        return
    if base not in ("sdpa", "eager"):
        raise SidetuneError(f"method.zero_init_attention supports attn_implementation sdpa or eager, not {base!r}; "
                            f"set model.attn_implementation=sdpa")
    name = f"sidetune_prefix_{base}"
    # Registered globally under a fixed name per base implementation: registering twice is a no-op.
    AttentionInterface.register(name, _separate_prefix_attention(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name


# ---------------------------------------------------------------------------------------------------------------------
# The module that trains


class PTuningV2Model(nn.Module):
    """The frozen model plus its prefix. forward(**batch) builds the prefix cache, extends the mask, sets positions."""

    def __init__(self, model: nn.Module, prefix: PrefixEncoder, cfg: PTuningV2Config) -> None:
        super().__init__()
        self.model = model
        self.prefix = prefix
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.shift_positions = cfg.shift_positions
        self.config = model.config

    def _inputs(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        b, t = ref.shape[:2]
        p = self.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=ref.device)
        attention_mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        if position_ids is None:
            position_ids = torch.arange(t, device=ref.device).unsqueeze(0).expand(b, -1)
        if self.shift_positions:
            position_ids = position_ids + p
        return dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, past_key_values=prefix_cache(self.prefix()), use_cache=False, **kwargs)

    def forward(self, **batch):
        return self.model(**self._inputs(**batch))

    def lm_hidden_states(self, **inputs) -> torch.Tensor:
        """Final hidden states for the chunked LM loss (sidetune.losses)."""
        return self.model.base_model(**self._inputs(**inputs)).last_hidden_state

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy or sampled decoding with the prefix (causal LMs). transformers' `generate` would append to the
        read-only prefix cache and number positions after the prefix, so this runs the plain loop of
        sidetune.methods._decode: the full forward the model was trained with, once per new token. Returns the
        prompt plus the new tokens, right-padded with `pad_token_id`."""
        if self.model.get_output_embeddings() is None or self.config.is_encoder_decoder:
            raise SidetuneError(f"generate needs a causal LM; this ptuning_v2 model is a {type(self.model).__name__}")
        eos, pad = special_tokens(self.config, eos_token_id, pad_token_id)
        rows = [(ids, lambda s: self(input_ids=s).logits[:, -1]) for ids in unpadded_rows(input_ids, attention_mask)]
        return decode_rows(rows, max_new_tokens, eos, pad, do_sample, temperature, top_k)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint every transformer block, keeping the (read-only) prefix cache. Non-reentrant only: a reentrant
        checkpoint gives no gradient to tensors that enter the block other than as arguments, like the prefix."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise SidetuneError("ptuning_v2 needs non-reentrant gradient checkpointing (use_reentrant=False)")
        blocks = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not blocks:
            raise SidetuneError(f"ptuning_v2 cannot checkpoint {type(self.model).__name__}: its blocks are not "
                                f"transformers GradientCheckpointingLayers; set train.gradient_checkpointing=false")
        for block in blocks:
            # Only the blocks, never the model-level flag: GPT-2's model drops the cache when its own flag is set.
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False, **kwargs)
            block._can_checkpoint_with_cache = True  # the replay reads the same prefix: nothing is appended


def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder-only or encoder-only config."""
    layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


class PTuningV2(Method):
    name: ClassVar[str] = "ptuning_v2"
    Config: ClassVar[type] = PTuningV2Config
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "causal_lm", "chat"})  # no encoder-decoder

    def __init__(self, cfg: PTuningV2Config) -> None:
        self.cfg = cfg

    def start_exact(self, task) -> dict | None:
        # A prefix under the joint softmax always takes attention mass: only zero-init attention starts exact.
        return {"zero_init_attention": True}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        if getattr(model.config, "is_encoder_decoder", False):
            raise SidetuneError(f"ptuning_v2 supports decoder-only and encoder-only models, not encoder-decoder "
                                f"{model.config.model_type}; use method.name=lora or adapter")
        freeze(model)
        device = next(model.parameters()).device
        prefix = PrefixEncoder(self.cfg, *_kv_shape(model.config), device)
        if self.cfg.zero_init_attention:
            _use_separate_prefix_attention(model)
        return PTuningV2Model(model, prefix, self.cfg)
