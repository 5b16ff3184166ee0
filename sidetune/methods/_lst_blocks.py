"""LST's side network: the backbone families it follows and the transformer blocks of width d/r it is made of.

A `Stack` describes one stack of backbone blocks (a decoder-only or encoder-only body, or T5's encoder or decoder):
its blocks, its final norm and its `BlockShape`. The side network mirrors that shape at a reduced width
(`BlockShape.reduced`) with its own small blocks: the same norm (RMS or LayerNorm, pre- or post-norm), MLP (gated or
not, same activation), attention (RoPE with the backbone's frequencies, T5's relative position bias, or nothing
when the positions live in the embeddings) and mask semantics (causal for decoders, padding for encoders, cross-
attention to the side encoder for T5). Families are recognised by their module structure, not by model_type, so
Llama-style models (Llama, Mistral, Qwen2, SmolLM2), GPT-2, BERT-style encoders and T5 all work without forked
modeling code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from sidetune.errors import SidetuneError
from sidetune.methods._inject import to_input

NEG_INF = float("-inf")


@dataclass(frozen=True)
class BlockShape:
    family: str  # llama | gpt2 | bert | t5
    d: int  # residual width
    heads: int
    kv_heads: int  # < heads: grouped-query attention
    head_dim: int
    ff: int  # MLP inner width
    norm: str  # rms | layer
    eps: float
    pre_norm: bool  # False: BERT's post-norm blocks
    gated: bool  # MLP is down(act(gate(x)) * up(x))
    act: str
    biases: frozenset[str]  # which projections (q k v o up gate down) carry a bias
    scale: float | None  # attention score scale; None = 1/sqrt(head_dim)
    causal: bool
    cross: bool  # blocks cross-attend to an encoder (T5 decoder)
    rope: bool
    rel_bias: tuple[int, int] | None  # T5: (num_buckets, max_distance)

    def reduced(self, r: int) -> BlockShape:
        """The side blocks' shape: width, head dims and MLP divided by r (heads kept, so attention keeps its
        structure; RoPE needs an even head dim)."""
        head_dim = max(2, self.head_dim // r // 2 * 2) if self.rope else max(1, self.head_dim // r)
        return replace(self, d=self.d // r, head_dim=head_dim, ff=max(1, self.ff // r))


@dataclass
class Stack:
    layers: nn.ModuleList  # the backbone's blocks; ladders read their outputs
    final_norm: nn.Module | None
    shape: BlockShape
    inv_freq: torch.Tensor | None = None  # RoPE frequencies of the backbone (Llama family)
    rope_scaling: float = 1.0


def family_of(layer: nn.Module) -> str:
    if hasattr(layer, "self_attn") and hasattr(getattr(layer, "mlp", None), "down_proj"):
        return "llama"
    if hasattr(getattr(layer, "attn", None), "c_attn"):
        return "gpt2"
    if hasattr(getattr(layer, "attention", None), "self") and hasattr(layer, "intermediate"):
        return "bert"
    if hasattr(layer, "layer") and hasattr(layer.layer[0], "SelfAttention"):
        return "t5"
    raise SidetuneError(f"LST does not know the block type {type(layer).__name__}; it supports Llama-style decoders "
                        f"(Llama, Mistral, Qwen2, SmolLM2), GPT-2, BERT-style encoders and T5")


def stacks_of(model: nn.Module) -> list[Stack]:
    """The backbone stacks the side network follows: [body] for decoder/encoder-only models, [encoder, decoder] for
    T5."""
    config = model.config
    if config.is_encoder_decoder:
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            raise SidetuneError(f"LST needs an encoder and a decoder on {type(model).__name__}; use data.task=seq2seq")
        return [_stack(model.encoder, model.encoder.block, config, causal=False, cross=False),
                _stack(model.decoder, model.decoder.block, config, causal=True, cross=True)]
    body = model.base_model
    n = config.num_hidden_layers
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise SidetuneError(f"LST found no list of {n} blocks in {type(body).__name__}")
    layers = lists[0]
    family = family_of(layers[0])
    return [_stack(body, layers, config, causal=family != "bert", cross=False)]


def _stack(body: nn.Module, layers: nn.ModuleList, c, causal: bool, cross: bool) -> Stack:
    layer = layers[0]
    family = family_of(layer)
    if family == "llama":
        attn, mlp = layer.self_attn, layer.mlp
        heads = c.num_attention_heads
        projections = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj, "up": mlp.up_proj,
                       "gate": mlp.gate_proj, "down": mlp.down_proj}
        rotary = body.rotary_emb
        shape = BlockShape(family, c.hidden_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                           getattr(c, "head_dim", None) or c.hidden_size // heads, c.intermediate_size, "rms",
                           layer.input_layernorm.variance_epsilon, True, True, c.hidden_act,
                           frozenset(k for k, p in projections.items() if getattr(p, "bias", None) is not None),
                           None, causal, cross, True, None)
        return Stack(layers, body.norm, shape, rotary.inv_freq.detach().float().clone(),
                     float(getattr(rotary, "attention_scaling", 1.0)))
    if family == "gpt2":
        shape = BlockShape(family, c.n_embd, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_inner or 4 * c.n_embd,
                           "layer", layer.ln_1.eps, True, False, c.activation_function,
                           frozenset({"q", "k", "v", "o", "up", "down"}), None if c.scale_attn_weights else 1.0,
                           causal, cross, False, None)
        return Stack(layers, body.ln_f, shape)
    if family == "bert":
        shape = BlockShape(family, c.hidden_size, c.num_attention_heads, c.num_attention_heads,
                           c.hidden_size // c.num_attention_heads, c.intermediate_size, "layer",
                           layer.output.LayerNorm.eps, False, False, c.hidden_act,
                           frozenset({"q", "k", "v", "o", "up", "down"}), None, causal, cross, False, None)
        return Stack(layers, None, shape)
    # T5: no biases, unscaled scores (the scale is folded into the init), a relative position bias shared by all
    # blocks of a stack.
    shape = BlockShape(family, c.d_model, c.num_heads, c.num_heads, c.d_kv, c.d_ff, "rms",
                       layer.layer[0].layer_norm.variance_epsilon, True, c.is_gated_act, c.dense_act_fn, frozenset(),
                       1.0, causal, cross, False,
                       (c.relative_attention_num_buckets, c.relative_attention_max_distance))
    return Stack(layers, body.final_layer_norm, shape)


def tapped_layers(spec: str | list[int], n: int | None) -> list[int]:
    """Block indices for `side_layers` on a stack of n blocks (n=None: check the syntax only)."""
    if isinstance(spec, str):
        every = spec.removeprefix("every:")
        if spec != "all" and not (spec.startswith("every:") and every.isdigit() and int(every) >= 1):
            raise SidetuneError(f"method.side_layers={spec!r} is not understood; use all, every:K (e.g. every:2) or "
                                f"a list of block indices like [0, 2, 5]")
        k = 1 if spec == "all" else int(every)
        return [] if n is None else [i for i in range(n) if (n - 1 - i) % k == 0]
    if not spec:
        raise SidetuneError("method.side_layers is an empty list; name at least one block")
    if n is None:
        return []
    bad = [i for i in spec if not -n <= i < n]
    if bad:
        raise SidetuneError(f"method.side_layers={spec} names block {bad[0]}, but the model has {n} (0..{n - 1})")
    return sorted({i % n for i in spec})


@contextlib.contextmanager
def capture(layers: nn.ModuleList, tapped: list[int]):
    """Record the input of the first block (the embeddings) as taps[-1] and the outputs of the tapped blocks."""
    taps: dict[int, torch.Tensor] = {}

    def first(module, args, kwargs):
        taps[-1] = args[0] if args else kwargs["hidden_states"]

    def output(i):
        def hook(module, args, out):
            taps[i] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [layers[i].register_forward_hook(output(i)) for i in tapped]
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------------
# Side modules


class SideNorm(nn.Module):
    def __init__(self, d: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x32 = x.float()  # RMS statistics in fp32, as Llama and T5 compute them
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))


class SideAttention(nn.Module):
    def __init__(self, s: BlockShape) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.head_dim
        self.scale = s.scale if s.scale is not None else 1 / math.sqrt(s.head_dim)
        b = s.biases
        self.q = nn.Linear(s.d, s.heads * s.head_dim, bias="q" in b)
        self.k = nn.Linear(s.d, s.kv_heads * s.head_dim, bias="k" in b)
        self.v = nn.Linear(s.d, s.kv_heads * s.head_dim, bias="v" in b)
        self.o = nn.Linear(s.heads * s.head_dim, s.d, bias="o" in b)

    def forward(self, x, mask, is_causal: bool, rope=None, kv=None, dropout: float = 0.0):
        src = x if kv is None else kv
        (b, t, _), s = x.shape, src.shape[1]
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(src).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(src).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = (r.to(q.dtype) for r in rope)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
                                             dropout_p=dropout if self.training else 0.0, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SideMLP(nn.Module):
    def __init__(self, s: BlockShape) -> None:
        super().__init__()
        self.up = nn.Linear(s.d, s.ff, bias="up" in s.biases)
        self.gate = nn.Linear(s.d, s.ff, bias="gate" in s.biases) if s.gated else None
        self.down = nn.Linear(s.ff, s.d, bias="down" in s.biases)
        self.act = ACT2FN[s.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


class SideBlock(nn.Module):
    """One side transformer block: self-attention, cross-attention to the side encoder (T5 decoder), MLP."""

    def __init__(self, s: BlockShape, dropout: float) -> None:
        super().__init__()
        self.pre_norm, self.dropout = s.pre_norm, dropout
        self.ln1, self.attn = SideNorm(s.d, s.norm, s.eps), SideAttention(s)
        self.lnx = SideNorm(s.d, s.norm, s.eps) if s.cross else None
        self.xattn = SideAttention(replace(s, rope=False)) if s.cross else None
        self.ln2, self.mlp = SideNorm(s.d, s.norm, s.eps), SideMLP(s)

    def forward(self, x, mask, is_causal, rope, enc=None, enc_mask=None):
        drop = (lambda y: F.dropout(y, self.dropout, self.training)) if self.dropout else (lambda y: y)
        if not self.pre_norm:  # BERT: normalise after each residual add
            x = self.ln1(x + drop(self.attn(x, mask, is_causal, rope, dropout=self.dropout)))
            return self.ln2(x + drop(self.mlp(x)))
        x = x + drop(self.attn(self.ln1(x), mask, is_causal, rope, dropout=self.dropout))
        if self.xattn is not None and enc is not None:
            x = x + drop(self.xattn(self.lnx(x), enc_mask, False, kv=enc, dropout=self.dropout))
        return x + drop(self.mlp(self.ln2(x)))


class SideStack(nn.Module):
    """Ladders, gates and side blocks following one backbone stack.

    s = down_0(embeddings); for each tapped layer i: s = g_i * s + (1 - g_i) * down_i(h_i), s = block_i(s);
    output norm(s). g_i = sigmoid(alpha_i / T).
    """

    def __init__(self, stack: Stack, side: BlockShape, tapped: list[int], temperature: float, gate_init: float,
                 dropout: float) -> None:
        super().__init__()
        self.tapped, self.temperature, self.causal = tapped, temperature, side.causal
        d = stack.shape.d
        # ladders[0] reads the embeddings, ladders[j + 1] the output of backbone block tapped[j].
        self.ladders = nn.ModuleList(nn.Linear(d, side.d) for _ in range(len(tapped) + 1))
        self.alpha = nn.Parameter(torch.full((len(tapped),), float(gate_init)))
        self.blocks = nn.ModuleList(SideBlock(side, dropout) for _ in tapped)
        self.norm = SideNorm(side.d, side.norm, side.eps)
        self.rel_bias = nn.Embedding(side.rel_bias[0], side.heads) if side.rel_bias else None
        self.rel_spec = side.rel_bias
        self.checkpointing = False
        inv_freq = None
        if side.rope:
            # A fixed, evenly spaced subset of the backbone's rotary frequencies: the kept query/key dims rotate as
            # they did in the backbone (pruning keeps exactly these frequency pairs). Recomputed, not saved.
            half = stack.inv_freq.numel()
            inv_freq = stack.inv_freq[rope_indices(half, side.head_dim // 2).to(stack.inv_freq.device)]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = stack.rope_scaling

    def forward(self, emb: torch.Tensor, taps: list[torch.Tensor], attention_mask: torch.Tensor | None,
                enc: torch.Tensor | None = None, enc_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = emb.shape[1]
        mask, is_causal = self._self_mask(attention_mask, t, emb.device)
        rope = self._rope(t, emb.device) if self.inv_freq is not None else None
        cross_mask = enc_mask.bool()[:, None, None, :] if enc_mask is not None else None
        s = self.ladders[0](to_input(emb, self.ladders[0].weight))
        gates = torch.sigmoid(self.alpha / self.temperature)
        for j, block in enumerate(self.blocks):
            # The ladder input h_i is the one backbone tensor autograd keeps: down_i needs it for its weight grad.
            down = self.ladders[j + 1](to_input(taps[j], self.ladders[j + 1].weight))
            s = gates[j] * s + (1 - gates[j]) * down
            if self.checkpointing and self.training:
                # Side-only checkpointing: keep the block's input, recompute its inside in backward.
                s = checkpoint(block, s, mask, is_causal, rope, enc, cross_mask, use_reentrant=False)
            else:
                s = block(s, mask, is_causal, rope, enc, cross_mask)
        return self.norm(s)

    def _self_mask(self, attention_mask, t: int, device) -> tuple[torch.Tensor | None, bool]:
        if attention_mask is None and self.rel_bias is None:
            return None, self.causal  # SDPA's own causal path (flash-capable on GPU)
        allowed = torch.ones(1, 1, t, t, dtype=torch.bool, device=device)
        if self.causal:
            allowed = allowed.tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        # Every query may see itself, so a fully padded row (left padding) gets no NaN; its output is unused.
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=device)
        if self.rel_bias is None:
            return allowed, False
        from transformers.models.t5.modeling_t5 import T5Attention

        pos = torch.arange(t, device=device)
        buckets = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=not self.causal,
                                                        num_buckets=self.rel_spec[0], max_distance=self.rel_spec[1])
        bias = self.rel_bias(buckets).permute(2, 0, 1)[None]  # 1 x heads x t x t
        return bias.masked_fill(~allowed, NEG_INF), False

    def _rope(self, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        # Positions 0..t-1, as the backbone uses them when no position_ids are given.
        freqs = torch.arange(t, device=device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling


def rope_indices(half: int, keep: int) -> torch.Tensor:
    """`keep` evenly spaced indices out of `half` rotary frequencies (fast and slow ones both survive)."""
    # keep <= half, so the rounded points are distinct. Built on the CPU: this also runs under a meta device context.
    return torch.linspace(0, half - 1, keep, device="cpu").round().long()
