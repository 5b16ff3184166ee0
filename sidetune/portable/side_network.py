"""LST's side network, importable without sidetune (torch and transformers only): ladders, gates and the side
transformer blocks of width d/r, and the hook that taps the backbone's blocks. sidetune trains with it
(`sidetune/methods/_lst_blocks.py` builds it from the model's anatomy) and `sidetune export --hf` ships it beside
`modeling_sidetune.py`, so an exported run computes with this very code.

A block's shape is any object with BlockShape's attributes (`sidetune.anatomy.BlockShape` in training, a namespace
read from config.json in an export): width d, heads, kv_heads, head_dim, ff, norm ("rms" | "layer"), eps, pre_norm,
gated, act, biases, scale, causal, cross, rope, rel_bias, rope_dims, qk_norm, sandwich, parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN
from transformers.masking_utils import find_packed_sequence_indices

from .common import to_input

NEG_INF = float("-inf")


def _with(shape: Any, **changes) -> Any:
    """A copy of a block shape (a frozen dataclass or a namespace) with some attributes changed."""
    if dataclasses.is_dataclass(shape):
        return dataclasses.replace(shape, **changes)
    return SimpleNamespace(**{**vars(shape), **changes})


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(b, t, h * d) -> (b, h, t, d)"""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


@contextlib.contextmanager
def capture(layers: nn.ModuleList, tapped: list[int], project=None):
    """Record the input of the first block (the embeddings) as taps[-1] and the outputs of the tapped blocks.

    project(key, h) (key -1 or the block index), when given, is applied in the hook and its result recorded instead
    of h: LST's ladders project each tap as the backbone emits it, so no B x T x d tap outlives its block (at long
    context 17 bf16 taps held until the backbone's last block were the step's peak)."""
    taps: dict[int, torch.Tensor] = {}
    keep = project or (lambda key, h: h)

    def first(module, args, kwargs):
        taps[-1] = keep(-1, args[0] if args else kwargs["hidden_states"])

    def output(i):
        def hook(module, args, out):
            taps[i] = keep(i, out[0] if isinstance(out, tuple) else out)
        return hook

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [layers[i].register_forward_hook(output(i)) for i in tapped]
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


class SideNorm(nn.Module):
    def __init__(self, d: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layer" else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x32 = x.float()  # RMS statistics in fp32, as Llama and T5 compute them
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))


class SideAttention(nn.Module):
    def __init__(self, s: Any) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.head_dim
        self.scale = s.scale if s.scale is not None else 1 / math.sqrt(s.head_dim)
        b = s.biases
        self.q = nn.Linear(s.d, s.heads * s.head_dim, bias="q" in b)
        self.k = nn.Linear(s.d, s.kv_heads * s.head_dim, bias="k" in b)
        self.v = nn.Linear(s.d, s.kv_heads * s.head_dim, bias="v" in b)
        self.o = nn.Linear(s.heads * s.head_dim, s.d, bias="o" in b)
        self.q_norm = SideNorm(s.head_dim, "rms", s.eps) if s.qk_norm else None
        self.k_norm = SideNorm(s.head_dim, "rms", s.eps) if s.qk_norm else None

    def forward(self, x, mask, is_causal: bool, rope=None, kv=None, dropout: float = 0.0, cache: dict | None = None):
        """cache (generation): this layer's keys and values so far; new ones are appended (self-attention) or,
        for cross-attention, computed once."""
        q = _heads(self.q(x), self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q).to(x.dtype)
        if cache is not None and kv is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv is None else kv
            k = _heads(self.k(src), self.kv_heads)
            v = _heads(self.v(src), self.kv_heads)
            if self.k_norm is not None:
                k = self.k_norm(k).to(x.dtype)
            if rope is not None:
                k = _apply_rope(k, *rope)
            if cache is not None:
                if kv is None and "k" in cache:
                    k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
                cache["k"], cache["v"] = k, v
        if rope is not None:
            q = _apply_rope(q, *rope)
        if self.kv_heads != self.heads:  # grouped-query: each key/value head serves heads / kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
                                             dropout_p=dropout if self.training else 0.0, scale=self.scale)
        return self.o(out.transpose(1, 2).flatten(2))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head (all of them, or the partial-rotary part)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    n = cos.shape[-1]
    if n == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :n], x[..., n:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class SideMLP(nn.Module):
    def __init__(self, s: Any) -> None:
        super().__init__()
        self.up = nn.Linear(s.d, s.ff, bias="up" in s.biases)
        self.gate = nn.Linear(s.d, s.ff, bias="gate" in s.biases) if s.gated else None
        self.down = nn.Linear(s.ff, s.d, bias="down" in s.biases)
        self.act = ACT2FN[s.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


class SideBlock(nn.Module):
    """One side transformer block: self-attention, cross-attention to the side encoder (T5 decoder), MLP; pre- or
    post-norm, sequential or parallel, with or without norms on the branch outputs (Gemma2's sandwich)."""

    def __init__(self, s: Any, dropout: float) -> None:
        super().__init__()
        self.pre_norm, self.parallel, self.dropout = s.pre_norm, s.parallel, dropout
        self.ln1, self.attn = SideNorm(s.d, s.norm, s.eps), SideAttention(s)
        self.post_attn = SideNorm(s.d, s.norm, s.eps) if s.sandwich else None
        self.lnx = SideNorm(s.d, s.norm, s.eps) if s.cross else None
        self.xattn = SideAttention(_with(s, rope=False, qk_norm=False)) if s.cross else None
        self.ln2, self.mlp = SideNorm(s.d, s.norm, s.eps), SideMLP(s)
        self.post_ff = SideNorm(s.d, s.norm, s.eps) if s.sandwich else None

    def forward(self, x, mask, is_causal, rope, enc=None, enc_mask=None, cache: dict | None = None):
        drop = (lambda y: F.dropout(y, self.dropout, self.training)) if self.dropout else (lambda y: y)
        self_cache, cross_cache = (None, None) if cache is None else (cache.setdefault("self", {}),
                                                                      cache.setdefault("cross", {}))
        if not self.pre_norm:  # BERT: normalise after each residual add
            x = self.ln1(x + drop(self.attn(x, mask, is_causal, rope, dropout=self.dropout, cache=self_cache)))
            return self.ln2(x + drop(self.mlp(x)))
        a = self.attn(self.ln1(x), mask, is_causal, rope, dropout=self.dropout, cache=self_cache)
        if self.post_attn is not None:
            a = self.post_attn(a)
        if self.parallel:  # attention and MLP both read the block input
            m = self.mlp(self.ln2(x))
            return x + drop(a) + drop(m if self.post_ff is None else self.post_ff(m))
        x = x + drop(a)
        if self.xattn is not None and enc is not None:
            x = x + drop(self.xattn(self.lnx(x), enc_mask, False, kv=enc, dropout=self.dropout, cache=cross_cache))
        m = self.mlp(self.ln2(x))
        return x + drop(m if self.post_ff is None else self.post_ff(m))


class _Int8SavedLinear(torch.autograd.Function):
    """y = x W^T + b, exactly; for dW it keeps x as int8 with one absmax scale per row (x itself never needs a
    gradient: it is a backbone activation), a quarter of fp32 and half of bf16."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x, weight, bias)
        scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-30) / 127
        ctx.save_for_backward((x.detach().float() / scale).round_().to(torch.int8), scale)
        ctx.has_bias, ctx.dtypes = bias is not None, (weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = (q.float() * scale).reshape(-1, q.shape[-1]).to(dy2.dtype)
        dw = dy2.t() @ x2
        db = dy2.sum(0) if ctx.has_bias else None
        return None, dw.to(ctx.dtypes[0]), (db.to(ctx.dtypes[1]) if db is not None else None)


def ladder(linear: nn.Linear, x: torch.Tensor, int8_saved: bool) -> torch.Tensor:
    """A ladder down-projection of a backbone activation x (which needs no gradient)."""
    x = to_input(x, linear.weight)
    if not int8_saved or not torch.is_grad_enabled() or x.requires_grad:
        # F.linear, not linear(x): a ladder module's own forward calls this function.
        return F.linear(x, linear.weight, linear.bias)
    if torch.is_autocast_enabled(x.device.type):  # the matmul in the compute dtype, as autocast would run it
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _Int8SavedLinear.apply(x.to(dtype), linear.weight.to(dtype),
                                          linear.bias.to(dtype) if linear.bias is not None else None)
    return _Int8SavedLinear.apply(x, linear.weight, linear.bias)


@dataclass
class SideCache:
    """The side network's keys and values during generation: one dict per side block, and the positions seen."""

    seen: int = 0
    blocks: list[dict] = field(default_factory=list)


class SideStack(nn.Module):
    """Ladders, gates and side blocks following one backbone stack.

    s = down_0(embeddings); for each tapped layer i: s = g_i * s + (1 - g_i) * down_i(h_i), s = block_i(s);
    output norm(s). g_i = sigmoid(alpha_i / T).
    """

    def __init__(self, d: int, side: Any, tapped: list[int], temperature: float, gate_init: float,
                 dropout: float, inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0,
                 ladder_cls: type[nn.Linear] = nn.Linear) -> None:
        """d: the backbone's width; side: the side blocks' shape; inv_freq: the backbone's rotary frequencies (all
        of them, when side.rope); ladder_cls: the ladders' module (sidetune's trainer passes one that chooses what
        it saves for backward)."""
        super().__init__()
        self.tapped, self.temperature, self.causal = list(tapped), temperature, side.causal
        # ladders[0] reads the embeddings, ladders[j + 1] the output of backbone block tapped[j].
        self.ladders = nn.ModuleList(ladder_cls(d, side.d) for _ in range(len(tapped) + 1))
        self.alpha = nn.Parameter(torch.full((len(tapped),), float(gate_init)))
        self.blocks = nn.ModuleList(SideBlock(side, dropout) for _ in tapped)
        self.norm = SideNorm(side.d, side.norm, side.eps)
        self.rel_bias = nn.Embedding(side.rel_bias[0], side.heads) if side.rel_bias else None
        self.rel_spec = side.rel_bias
        self.checkpointing = False
        self.register_buffer("inv_freq", side_inv_freq(inv_freq, side.rope_dims) if side.rope else None,
                             persistent=False)
        self.rope_scaling = rope_scaling

    def project(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """Ladder j's down-projection of its backbone input h (j = 0: the embeddings; j + 1: tapped block j)."""
        lad = self.ladders[j]
        return lad(to_input(h, lad.weight))

    def set_ladder_storage(self, int8: bool, offload: bool) -> None:
        """What the ladders keep for their weight gradients (read by a ladder_cls that supports it)."""
        for lad in self.ladders:
            lad.int8_saved, lad.offload = int8, offload

    def forward(self, emb: torch.Tensor, downs: list[torch.Tensor], attention_mask: torch.Tensor | None,
                enc: torch.Tensor | None = None, enc_mask: torch.Tensor | None = None,
                cache: SideCache | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """emb, downs: the ladders' projections (`project`) of the embeddings and of the tapped blocks' outputs,
        B x T x d/r each (projected as the backbone emits them, in `capture`'s hooks).
        cache (generation, no grad): emb and downs are the new positions only; keys and values of the earlier
        ones come from the cache, and attention_mask (if any) covers all positions.
        position_ids (B x T): the backbone's positions, for RoPE; without an attention mask, positions that restart
        at 0 mark packed examples (data.packing), each of which attends only to itself, as in the backbone."""
        t, past = emb.shape[1], cache.seen if cache is not None else 0
        if cache is not None and not cache.blocks:
            cache.blocks = [{} for _ in self.blocks]
        packed = None
        if position_ids is not None and attention_mask is None and cache is None:
            packed = find_packed_sequence_indices(position_ids.expand(emb.shape[0], -1))  # None: one example a row
        mask, is_causal = self._self_mask(attention_mask, t, emb.device, past, packed)
        rope = self._rope(t, emb.device, past, position_ids) if self.inv_freq is not None else None
        cross_mask = enc_mask.bool()[:, None, None, :] if enc_mask is not None else None
        s = emb
        gates = torch.sigmoid(self.alpha / self.temperature)
        for j, block in enumerate(self.blocks):
            s = gates[j] * s + (1 - gates[j]) * downs[j]
            if cache is not None:
                s = block(s, mask, is_causal, rope, enc, cross_mask, cache.blocks[j])
            elif self.checkpointing and self.training:
                # Side-only checkpointing: keep the block's input, recompute its inside in backward.
                s = checkpoint(block, s, mask, is_causal, rope, enc, cross_mask, use_reentrant=False)
            else:
                s = block(s, mask, is_causal, rope, enc, cross_mask)
        if cache is not None:
            cache.seen = past + t
        return self.norm(s)

    def _self_mask(self, attention_mask, t: int, device, past: int = 0,
                   packed: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """packed (B x T): the index of each token's example in its row (transformers'
        find_packed_sequence_indices); attention stays inside an example: the block-diagonal causal mask."""
        if attention_mask is None and packed is None and self.rel_bias is None and (past == 0 or t == 1):
            return None, self.causal and past == 0  # SDPA's own causal path (flash-capable on GPU)
        n = past + t
        q_pos, k_pos = torch.arange(past, n, device=device), torch.arange(n, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None] if self.causal else torch.ones(t, n, dtype=torch.bool,
                                                                                   device=device)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, -n:]
        if packed is not None:
            allowed = allowed & (packed[:, None, :, None] == packed[:, None, None, :])
        # Every query may see itself, so a fully padded row (left padding) gets no NaN; its output is unused.
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])
        if self.rel_bias is None:
            return allowed, False
        from transformers.models.t5.modeling_t5 import T5Attention

        buckets = T5Attention._relative_position_bucket(k_pos[None, :] - q_pos[:, None], bidirectional=not self.causal,
                                                        num_buckets=self.rel_spec[0], max_distance=self.rel_spec[1])
        bias = self.rel_bias(buckets).permute(2, 0, 1)[None]  # 1 x heads x t x n
        return bias.masked_fill(~allowed, NEG_INF), False

    def _rope(self, t: int, device, past: int = 0,
              position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # The backbone's position_ids when given (B x T -> cos/sin B x 1 x T x dims, one row per sequence), else
        # positions past..past+t-1, as the backbone numbers them without position_ids (T x dims).
        if position_ids is not None:
            freqs = position_ids.to(device, torch.float32)[:, None, :, None] * self.inv_freq
        else:
            pos = torch.arange(past, past + t, device=device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling


def side_inv_freq(inv_freq: torch.Tensor, rope_dims: int) -> torch.Tensor:
    """The side blocks' rotary frequencies: a fixed, evenly spaced subset of the backbone's, so the kept query/key
    dims rotate as they did in the backbone (pruning keeps exactly these frequency pairs). Recomputed, not saved."""
    return inv_freq[rope_indices(inv_freq.numel(), rope_dims // 2).to(inv_freq.device)]


def rope_indices(half: int, keep: int) -> torch.Tensor:
    """`keep` evenly spaced indices out of `half` rotary frequencies (fast and slow ones both survive)."""
    # keep <= half, so the rounded points are distinct. Built on the CPU: this also runs under a meta device context.
    return torch.linspace(0, half - 1, keep, device="cpu").round().long()
