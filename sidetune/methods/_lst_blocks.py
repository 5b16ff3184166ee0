"""LST's side network: the transformer blocks of width d/r it is made of, following the backbone stacks that
`sidetune.anatomy` reads from the model's own config and modules (blocks, the norm kind and eps, pre- or post-norm,
Gemma's extra "sandwich" norms, q/k/v/o or a fused qkv with its row layout, grouped-query heads, q/k norms (Qwen3,
Gemma3), gated, fused gate+up or plain MLPs with the config's activation, parallel attention + MLP (GPT-NeoX,
Falcon, Phi) and RoPE from the model's rotary embedding (partial rotary: only the first dims of each head rotate)).
The side network mirrors what makes it a sound small transformer and what pruned init needs; it ignores what only
matters inside the backbone (attention soft-capping, sliding windows, ALiBi, learned positions and embedding
scaling: the ladders carry those signals in). Nothing here changes the backbone, so step 0 is the frozen model
whatever the side looks like.

When a block's modules cannot be mapped to these roles (names that do not say q/k/v, an unusual count of norms), the
shape falls back to a plain pre-norm block from the config and `Stack.unmapped` says why: LST then starts the side
network from random init instead of pruned weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN
from transformers.masking_utils import find_packed_sequence_indices

from sidetune.anatomy import BlockShape, Stack, Unmapped, read
from sidetune.errors import SidetuneError
from sidetune.methods._inject import to_input

__all__ = ["BlockShape", "SideCache", "SideStack", "Stack", "Unmapped", "capture", "stacks_of", "tapped_layers"]

NEG_INF = float("-inf")


def stacks_of(model: nn.Module) -> list[Stack]:
    """The backbone stacks the side network follows (`sidetune.anatomy`): [body] for decoder/encoder-only models,
    [encoder, decoder] for T5. A layout LST cannot follow is one SidetuneError naming the model type."""
    anatomy = read(model)
    kind = anatomy.describe
    if anatomy.kind == "encoder-decoder":
        if len(anatomy.stacks) != 2 or not all(s.shape.rel_bias for s in anatomy.stacks):
            raise SidetuneError(f"LST supports T5-style encoder-decoders only, not {kind}; use a decoder-only or "
                                f"encoder-only model, or another method")
        return anatomy.stacks
    if not anatomy.stacks:
        n = getattr(model.config, "num_hidden_layers", None)
        raise SidetuneError(f"LST found no list of {n} blocks of width hidden_size in {kind}: it follows bodies made "
                            f"of embeddings, a list of blocks and a final norm; use another method for this model")
    return anatomy.stacks


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


# ---------------------------------------------------------------------------------------------------------------------
# Side modules


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
    def __init__(self, s: BlockShape) -> None:
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
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q).to(x.dtype)
        if cache is not None and kv is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv is None else kv
            k = rearrange(self.k(src), "b s (h d) -> b h s d", h=self.kv_heads)
            v = rearrange(self.v(src), "b s (h d) -> b h s d", h=self.kv_heads)
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
            k = repeat(k, "b h s d -> b (h g) s d", g=self.heads // self.kv_heads)
            v = repeat(v, "b h s d -> b (h g) s d", g=self.heads // self.kv_heads)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
                                             dropout_p=dropout if self.training else 0.0, scale=self.scale)
        return self.o(rearrange(out, "b h t d -> b t (h d)"))


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
    """One side transformer block: self-attention, cross-attention to the side encoder (T5 decoder), MLP; pre- or
    post-norm, sequential or parallel, with or without norms on the branch outputs (Gemma2's sandwich)."""

    def __init__(self, s: BlockShape, dropout: float) -> None:
        super().__init__()
        self.pre_norm, self.parallel, self.dropout = s.pre_norm, s.parallel, dropout
        self.ln1, self.attn = SideNorm(s.d, s.norm, s.eps), SideAttention(s)
        self.post_attn = SideNorm(s.d, s.norm, s.eps) if s.sandwich else None
        self.lnx = SideNorm(s.d, s.norm, s.eps) if s.cross else None
        self.xattn = SideAttention(replace(s, rope=False, qk_norm=False)) if s.cross else None
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


def _offloads(x: torch.Tensor) -> bool:
    """Is there a host to offload to: a CUDA step, or a prediction standing in for one? (A CPU step has none.)"""
    from sidetune import memory

    return x.device.type == "cuda" or memory.simulated_target() == "cuda"


def _to_host(t: torch.Tensor):
    """Pack hook of `ladder_offload`: a saved tensor that needs no gradient (the ladder input or its int8 copy, not a
    cast of the weight) goes to pinned host memory; the copy is queued on the compute stream (non_blocking), so the
    device block it leaves is only reused by kernels queued after it. On the CPU nothing moves, except in a
    prediction standing in for a CUDA step (`memory.simulating`), where a copy made as host memory stands for it."""
    from torch._subclasses.fake_tensor import is_fake

    from sidetune import memory

    if t.requires_grad:
        return t
    real = t.device.type == "cuda" and not is_fake(t)
    with memory.host_memory():
        if real:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        else:  # a prediction (fake tensors): a copy counted as host memory stands for the transfer
            host = t.clone()
    return t.device, host, real


def _from_host(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host, real = packed
    # A prediction's host copy comes back as a new device tensor too (clone), as the real H2D copy does.
    return host.to(device, non_blocking=True) if real else host.clone()


def ladder(linear: nn.Linear, x: torch.Tensor, int8_saved: bool, offload: bool = False) -> torch.Tensor:
    """A ladder down-projection of a backbone activation x (which needs no gradient). offload: what it saves for
    its weight gradient is kept in host memory (`_to_host`); the forward and the gradients are unchanged."""
    if offload and torch.is_grad_enabled() and _offloads(x):
        with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
            return ladder(linear, x, int8_saved)
    x = to_input(x, linear.weight)
    if not int8_saved or not torch.is_grad_enabled() or x.requires_grad:
        return linear(x) if type(linear) is nn.Linear else F.linear(x, linear.weight, linear.bias)
    if torch.is_autocast_enabled(x.device.type):  # the matmul in the compute dtype, as autocast would run it
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _Int8SavedLinear.apply(x.to(dtype), linear.weight.to(dtype),
                                          linear.bias.to(dtype) if linear.bias is not None else None)
    return _Int8SavedLinear.apply(x, linear.weight, linear.bias)


class Ladder(nn.Linear):
    """A ladder's down-projection d -> d/r, called as a module (so the memory accounting files what it saves under
    the side network) with LSTConfig's storage settings for its input: int8 (`ladder_grad_input`) and host
    offload (`ladder_offload`)."""

    int8_saved: bool = False
    offload: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ladder(self, x, self.int8_saved, self.offload)


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

    def __init__(self, stack: Stack, side: BlockShape, tapped: list[int], temperature: float, gate_init: float,
                 dropout: float) -> None:
        super().__init__()
        self.tapped, self.temperature, self.causal = tapped, temperature, side.causal
        d = stack.shape.d
        # ladders[0] reads the embeddings, ladders[j + 1] the output of backbone block tapped[j].
        self.ladders = nn.ModuleList(Ladder(d, side.d) for _ in range(len(tapped) + 1))
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
            inv_freq = stack.inv_freq[rope_indices(half, side.rope_dims // 2).to(stack.inv_freq.device)]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = stack.rope_scaling

    def project(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """Ladder j's down-projection of its backbone input h (j = 0: the embeddings; j + 1: tapped block j)."""
        return self.ladders[j](h)

    def set_ladder_storage(self, int8: bool, offload: bool) -> None:
        for lad in self.ladders:
            lad.int8_saved, lad.offload = int8, offload

    def forward(self, emb: torch.Tensor, downs: list[torch.Tensor], attention_mask: torch.Tensor | None,
                enc: torch.Tensor | None = None, enc_mask: torch.Tensor | None = None,
                cache: SideCache | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """emb, downs: the ladders' projections (`project`) of the embeddings and of the tapped blocks' outputs,
        B x T x d/r each (LSTModel projects them as the backbone emits them).
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


def rope_indices(half: int, keep: int) -> torch.Tensor:
    """`keep` evenly spaced indices out of `half` rotary frequencies (fast and slow ones both survive)."""
    # keep <= half, so the rounded points are distinct. Built on the CPU: this also runs under a meta device context.
    return torch.linspace(0, half - 1, keep, device="cpu").round().long()
