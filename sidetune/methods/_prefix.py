"""Shared machinery of the key/value-prefix methods (prefix_tuning, ptuning_v2): the trainable prefix, the read-only
KV cache that carries it into the model's own attention, zero-init attention, and the module that trains.

Every attention layer l gets P trainable key/value vectors that each real token attends to besides the sequence:

    head_l(x) = softmax(q [K_l^p ; K_x]^T / sqrt(d)) [V_l^p ; V_x]          (one softmax over prefix + tokens)

The prefix (K_l^p, V_l^p for all layers) is a P x (L * 2 * d_kv) embedding, or, reparameterized (Li & Liang 2021,
arXiv 2101.00190, eq. 5), the output of a two-layer tanh MLP over a smaller P x d_kv embedding:

    [K^p ; V^p] = W_2 tanh(W_1 E + b_1) + b_2,      E in R^{P x d_kv}, W_1: d_kv -> h, W_2: h -> L * 2 * d_kv.

The prefix reaches the model through the KV cache: a transformers `Cache` whose layers are read-only prefixes
(`update` returns [prefix ; new] without storing the new keys), so the model's own attention, masks and kernels do
the work. The attention mask gets P ones in front; the real tokens keep positions 0..T-1 unless `shift_positions`
moves them to P..P+T-1 (what PEFT and THUDM's BERT code do implicitly).

Zero-init attention (LLaMA-Adapter, arXiv 2303.16199): a zero prefix is NOT invisible under the joint softmax (its
logits q.0 = 0 add P * e^0 to each denominator), so the prefix can instead get its own softmax, added to the
unchanged attention over the tokens, with V^p = 0 at init:

    head_l(x) = softmax(q K_x^T / sqrt(d)) V_x  +  softmax(q K_l^p^T / sqrt(d)) V_l^p.

Gradient checkpointing works (PEFT refuses it, peft PR #2191): transformers drops `past_key_values` inside
checkpointed layers because a growing cache would be appended twice on replay; the prefix cache never grows, so
`gradient_checkpointing_enable` checkpoints each block itself (non-reentrant, so the prefix, which enters through the
cache rather than as an argument, still gets its gradient) and keeps the cache.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from sidetune.anatomy import read
from sidetune.compat import block_checkpointing_keeps_cache, cache_kwargs, query_count
from sidetune.distributed import ShardsLikeInner
from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive
from sidetune.methods._decode import decode_rows, special_tokens, stop_on_strings, unpadded_rows
from sidetune.methods._inject import freeze
from sidetune.methods._readout import POOLINGS, classifier_name, classify, pool
from sidetune.methods.base import HFExport
from sidetune.tasks import Task

# ---------------------------------------------------------------------------------------------------------------------
# The prefix and the cache that carries it


class PrefixEncoder(nn.Module):
    """The trainable prefix: per layer, keys and values of shape (kv_heads, P, head_dim). Parameter layout follows
    PEFT's PrefixEncoder (row p, column ((2 l + kv) h + head) d + i), so the two can share weights in tests.

    `projection_dim`: None for a direct P x (L*2*d_kv) table, else the hidden width h of the reparameterization MLP.
    `zero_values`: zero every value column of the last layer (zero-init attention then adds exactly 0 at step 0).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_heads: int, head_dim: int,
                 projection_dim: int | None, dropout: float, zero_values: bool, device: torch.device) -> None:
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        kv_dim = kv_heads * head_dim
        out_dim = num_layers * 2 * kv_dim
        # fp32 master weights; the cache casts them to the dtype of the model's keys.
        kw: dict[str, Any] = {"device": device, "dtype": torch.float32}
        if projection_dim is not None:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(kv_dim, projection_dim, **kw), nn.Tanh(),
                                           nn.Linear(projection_dim, out_dim, **kw))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, **kw)
            self.transform = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if zero_values:
            with torch.no_grad():  # zero every value column: the prefix's own attention then adds exactly 0
                cols = rearrange(torch.arange(out_dim, device=device), "(l kv c) -> l kv c", l=num_layers, kv=2)
                value_cols = cols[:, 1].reshape(-1)
                if self.transform is not None:
                    self.transform[-1].weight[value_cols] = 0
                    self.transform[-1].bias[value_cols] = 0
                else:
                    self.embedding.weight[:, value_cols] = 0

    def table(self) -> torch.Tensor:
        """The (P, L*2*d_kv) prefix before dropout."""
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.dropout(self.table())
        # One batch-independent copy per layer and kind (key, value); the batch dimension is a broadcast view.
        kv = rearrange(x, "p (lk h d) -> lk h p d", lk=self.num_layers * 2, h=self.kv_heads)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def materialize(self) -> None:
        """Drop the reparameterization: replace embedding + MLP by the P x (L*2*d_kv) table they produce (Li &
        Liang: "once training is complete, these reparametrization parameters can be dropped")."""
        if self.transform is None:
            return
        table = self.table()
        self.embedding = nn.Embedding.from_pretrained(table.clone(), freeze=False)
        self.transform = None


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

    def get_mask_sizes(self, query) -> tuple[int, int]:
        return self.get_seq_length() + query_count(query), 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.13 (abstract there)


class GrowingPrefixCacheLayer(PrefixCacheLayer):
    """Decoding: the prefix followed by every token seen so far. `update` appends, as a KV cache does, so each new
    token costs one token's forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = super().update(key_states, value_states)
        return self.keys, self.values


def prefix_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]], growing: bool = False) -> Cache:
    layer = GrowingPrefixCacheLayer if growing else PrefixCacheLayer
    return Cache(layers=[layer(k.unsqueeze(0), v.unsqueeze(0)) for k, v in prefix])


# ---------------------------------------------------------------------------------------------------------------------
# Zero-init attention: the prefix's own softmax, added to the model's attention over the tokens


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
            k = repeat(k, "b h p d -> b (h g) p d", g=query.shape[1] // k.shape[1])
            v = repeat(v, "b h p d -> b (h g) p d", g=query.shape[1] // v.shape[1])
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probs = torch.softmax((query @ k.transpose(-1, -2)).float() * scale, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p=dropout, training=module.training)
        return out + (probs @ v).transpose(1, 2), None

    return attention


def use_separate_prefix_attention(model: nn.Module, method: str) -> None:
    base = model.config._attn_implementation or "eager"
    if base.startswith("sidetune_prefix_"):
        return
    if base not in ("sdpa", "eager"):
        raise SidetuneError(f"{method} with zero_init_attention supports attn_implementation sdpa or eager, not "
                            f"{base!r}; set model.attn_implementation=sdpa")
    name = f"sidetune_prefix_{base}"
    # Registered globally under a fixed name per base implementation: registering twice is a no-op.
    AttentionInterface.register(name, _separate_prefix_attention(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name


# ---------------------------------------------------------------------------------------------------------------------
# The module that trains


class PrefixModel(ShardsLikeInner, nn.Module):
    """The frozen model plus its prefix. forward(**batch) builds the prefix cache, extends the mask, sets positions."""

    position_offset: int = 0  # the model's first position id (RoBERTa: 2), read by attach_prefix from its anatomy

    def __init__(self, model: nn.Module, prefix: PrefixEncoder, num_virtual_tokens: int, shift_positions: bool,
                 method: str, pooling: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling  # None: the model's own classification head; else see sidetune/methods/_readout.py
        self.prefix = prefix
        self.num_virtual_tokens = num_virtual_tokens
        self.shift_positions = shift_positions
        self.method = method
        self.config = model.config

    def _inputs(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        b, t = ref.shape[:2]
        p = self.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=ref.device)
        attention_mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        if position_ids is None:
            position_ids = torch.arange(t, device=ref.device).unsqueeze(0).expand(b, -1) + self.position_offset
        if self.shift_positions:
            position_ids = position_ids + p
        return dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False, **cache_kwargs(prefix_cache(self.prefix())), **kwargs)

    def forward(self, **batch):
        if self.pooling is None:  # the model's own head (BERT: its pooler over [CLS]; Llama: the last real token)
            return self.model(**self._inputs(**batch))
        labels = batch.pop("labels", None)
        # The hidden states hold the real tokens only (the prefix lives in the cache), so the batch's own mask
        # pools them.
        hidden = self.model.base_model(**self._inputs(**batch)).last_hidden_state
        return classify(self.model, pool(hidden, batch.get("attention_mask"), self.pooling), labels)

    def lm_hidden_states(self, **inputs) -> torch.Tensor:
        """Final hidden states for the chunked LM loss (sidetune.losses)."""
        return self.model.base_model(**self._inputs(**inputs)).last_hidden_state

    def _inner(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None, use_cache: bool = True, stop_strings: list[str] | None = None,
                 tokenizer=None) -> torch.Tensor:
        """Greedy or sampled decoding with the prefix (causal LMs), in the plain loop of sidetune.methods._decode:
        transformers' `generate` would number positions after the prefix and build its own cache. With use_cache
        (default) each row keeps a KV cache that starts as the prefix and grows by the tokens seen, so a new token
        costs one token's forward; without it, the full forward the model was trained with runs once per new token
        (the reference the cached path is tested against). Zero-init attention always takes the full forward: its
        attention tells the prefix from the tokens by the count of new queries, which a growing cache breaks.
        Returns the prompt plus the new tokens, right-padded with `pad_token_id`."""
        if self.model.get_output_embeddings() is None or self.config.is_encoder_decoder:
            raise SidetuneError(f"generate needs a causal LM; this {self.method} model is a "
                                f"{type(self.model).__name__}")
        eos, pad = special_tokens(self.config, eos_token_id, pad_token_id)
        cached = use_cache and not (self.config._attn_implementation or "").startswith("sidetune_prefix_")
        rows = [(ids, self._cached_step() if cached else lambda s: self(input_ids=s).logits[:, -1])
                for ids in unpadded_rows(input_ids, attention_mask)]
        return decode_rows(rows, max_new_tokens, eos, pad, do_sample, temperature, top_k,
                           stop_on_strings(stop_strings, tokenizer))

    def _cached_step(self):
        """One row's decoding step: feeds the model only the tokens its cache has not seen."""
        cache, p = prefix_cache(self.prefix(), growing=True), self.num_virtual_tokens

        def step(seq: torch.Tensor) -> torch.Tensor:
            seen = cache.get_seq_length() - p
            new = seq[:, seen:]
            positions = torch.arange(seen, seq.shape[1], device=seq.device)[None] + (p if self.shift_positions else 0)
            mask = torch.ones(1, p + seq.shape[1], dtype=torch.long, device=seq.device)
            return self.model(input_ids=new, attention_mask=mask, position_ids=positions, use_cache=True,
                              **cache_kwargs(cache)).logits[:, -1]

        return step

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint every transformer block, keeping the (read-only) prefix cache. Non-reentrant only: a reentrant
        checkpoint gives no gradient to tensors that enter the block other than as arguments, like the prefix."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise SidetuneError(f"{self.method} needs non-reentrant gradient checkpointing (use_reentrant=False)")
        if not block_checkpointing_keeps_cache():
            # Older transformers set the cache to None inside every checkpointed block: the prefix would vanish.
            raise SidetuneError(f"{self.method} with gradient checkpointing needs transformers >= 5.15 (older "
                                f"releases drop the prefix cache inside checkpointed blocks); upgrade transformers "
                                f"or set train.gradient_checkpointing=false")
        blocks = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not blocks:
            raise SidetuneError(f"{self.method} cannot checkpoint {type(self.model).__name__}: its blocks are not "
                                f"transformers GradientCheckpointingLayers; set train.gradient_checkpointing=false")
        for block in blocks:
            # Only the blocks, never the model-level flag: GPT-2's model drops the cache when its own flag is set.
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False, **kwargs)
            block._can_checkpoint_with_cache = True  # the replay reads the same prefix: nothing is appended


@torch.no_grad()
def hf_export_prefix(model: PrefixModel) -> HFExport:
    """The prefix, computed once (the reparameterization MLP run, no dropout), as the keys and values a fresh KV cache
    starts with in sidetune/portable/modeling_sidetune.py (kind "prefix")."""
    if (model.config._attn_implementation or "").startswith("sidetune_prefix_"):
        raise SidetuneError(f"sidetune export --hf cannot write a {model.method} run with zero_init_attention (its "
                            f"separate prefix softmax is sidetune's own attention function); serve it with "
                            f"sidetune.load(RUN_DIR)")
    was = model.training
    model.eval()
    prefix = torch.stack([torch.stack([k, v]) for k, v in model.prefix()]).float()
    model.train(was)
    spec = {"kind": "prefix", "num_virtual_tokens": model.num_virtual_tokens, "kv_layout": [prefix.shape[0], prefix.shape[2], prefix.shape[4]],
            "shift_positions": model.shift_positions, "position_offset": model.position_offset,
            "pooling": model.pooling, "classifier": classifier_name(model.model) if model.pooling else None}
    return HFExport(spec, model.model, {"prefix_kv": prefix})


# ---------------------------------------------------------------------------------------------------------------------
# Building


POOLING_HELP = (
    "Classification readout. model: the model's own head (BERT's pooler, tanh(W h_[CLS] + b), frozen with the "
    "backbone; a decoder's last real token). mean / first / last: the classification layer reads the masked mean of "
    "the final hidden states, the first token or the last real token (sidetune/methods/_readout.py).")
HEAD_LR_HELP = "Learning rate of the task head (and of the pooler with train_pooler); null: train.lr."


def check_prefix_config(cfg) -> None:
    """The checks both prefix configs share (run from their __post_init__)."""
    check_positive("method.num_virtual_tokens", cfg.num_virtual_tokens)
    check_positive("method.projection_dim", cfg.projection_dim)
    check_dropout("method.dropout", cfg.dropout)
    if cfg.head_lr is not None and not cfg.head_lr > 0:
        raise SidetuneError(f"method.head_lr must be > 0 (or null for train.lr), got {cfg.head_lr}")
    if cfg.train_pooler and cfg.pooling != "model":
        raise SidetuneError(f"method.train_pooler trains the pooler that pooling=model reads, but "
                            f"method.pooling={cfg.pooling!r} bypasses it; drop one of the two")


def prefix_param_groups(model: PrefixModel, lr: float, head_lr: float | None) -> list[dict] | None:
    """The prefix at `lr`, everything else trainable (the task head, a trained pooler) at `head_lr`. A head trained
    from scratch on a frozen readout wants a larger step than a prefix whose every change moves every layer."""
    if head_lr is None:
        return None
    prefix = [p for p in model.prefix.parameters() if p.requires_grad]
    ids = {id(p) for p in prefix}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": prefix, "lr": lr}] + ([{"params": rest, "lr": head_lr}] if rest else [])


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(blocks, key/value heads, head dim) of a decoder-only or encoder-only model, read from its attention
    projections (`sidetune.anatomy`): a config's head count says nothing of Falcon's multi-query layout, for one."""
    return read(model).kv_layout()


def _check_prefix_reaches_attention(model: PrefixModel, method: str, zero_init_attention: bool) -> None:
    """One forward of 2 x 2 tokens: a model whose attention takes no key/value cache (DistilBERT, DeBERTa, MPNet,
    ...), or whose task head does not pass it on (Megatron-BERT's classifier), fails it on the mask that now covers
    the prefix too; that is one line, not a traceback mid-training. With zero-init attention the output must also
    be the frozen model's: a model that computes attention in its own code (BLOOM, Falcon, MPT, GPT-Neo) never calls
    the prefix's separate softmax, so the option would silently do nothing. Skipped on the meta device and on fake
    tensors (memory predictions)."""
    from torch._subclasses.fake_tensor import is_fake

    param = next(model.model.parameters())
    if param.device.type == "meta" or is_fake(param):  # a memory prediction: shapes only, no values to compare
        return
    ids = torch.full((2, 2), min(3, model.config.vocab_size - 1), dtype=torch.long, device=param.device)
    mask = torch.tensor([[1, 1], [1, 0]], device=param.device)  # not all ones: transformers would drop the mask
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # the path training takes (a head may drop the cache)
            ours = frozen = None
            if zero_init_attention:  # the body's last hidden states (a pooling readout differs from the model's head)
                ours = model.lm_hidden_states(input_ids=ids, attention_mask=mask)
                frozen = model.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise SidetuneError(f"{method} cannot feed a prefix to {type(model.model).__name__}: it does not carry a "
                            f"key/value cache to its attention ({first}); use method.name=lora, adapter, ia3 or "
                            f"ptuning_v1") from None
    finally:
        model.train(training)
    if frozen is not None:
        real = mask.bool()  # a padding position's output is never read
        gap = (ours[real].float() - frozen[real].float()).abs().max().item()
        if gap > 1e-3 * (1 + frozen[real].float().abs().max().item()):
            raise SidetuneError(f"{method} with zero_init_attention does not start at the frozen "
                                f"{type(model.model).__name__} (max |hidden state difference| {gap:.3g}): its attention "
                                f"does not run through transformers' attention functions, where the prefix's separate "
                                f"softmax lives; set method.zero_init_attention=false")


def attach_prefix(model: nn.Module, method: str, *, num_virtual_tokens: int, projection_dim: int | None,
                  dropout: float, zero_init_attention: bool, shift_positions: bool,
                  task: Task, train_pooler: bool = False, pooling: str = "model") -> PrefixModel:
    """Freeze `model` (its new task head stays trainable), add a prefix, return the module to train.

    `pooling`: "model" (the model's own head) or what the classification layer reads instead (`_readout.POOLINGS`);
    only a classifier of `task` has a readout to choose.

    `train_pooler`: also train the encoder's pooler (BERT's tanh dense over [CLS], which its classification head
    reads). A checkpoint's pooler was trained for another objective or not at all (sentence-transformers models pool
    by mean), and a frozen one can squash what the prefix puts into [CLS]."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise SidetuneError(f"{method} supports decoder-only and encoder-only models, not encoder-decoder "
                            f"{model.config.model_type}; use method.name=lora or adapter")
    readout = None if pooling == "model" else pooling
    if readout is not None and (not task.classifies or classifier_name(model) is None or readout not in POOLINGS):
        # only a classifier has a readout to choose; an LM head reads every position
        raise SidetuneError(f"method.pooling={pooling!r} chooses what a classification layer reads; this "
                            f"{type(model).__name__} on data.task={task.name} has none, so set method.pooling=model")
    freeze(model)
    if train_pooler:
        pooler = getattr(model.base_model, "pooler", None)
        if pooler is None:
            raise SidetuneError(f"method.train_pooler: {type(model).__name__} has no pooler (only encoders like BERT "
                                f"do); set method.train_pooler=false")
        pooler.float().requires_grad_(True)  # trainable parts in fp32
    device = next(model.parameters()).device
    anatomy = read(model)
    prefix = PrefixEncoder(num_virtual_tokens, *anatomy.kv_layout(), projection_dim, dropout, zero_init_attention,
                           device)
    if zero_init_attention:
        use_separate_prefix_attention(model, method)
    out = PrefixModel(model, prefix, num_virtual_tokens, shift_positions, method, readout)
    out.position_offset = anatomy.position_offset
    _check_prefix_reaches_attention(out, method, zero_init_attention)
    return out
