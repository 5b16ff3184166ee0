"""Initialise LST's side network by structural pruning of the backbone (LST paper, section 3.3).

Importance is the L1 magnitude of weight rows/columns (for pre-norm blocks, an input column is weighted by the gain
of the norm in front of it, since that is the effective weight). What is kept:

- hidden dims: one set K of d/r dims for the whole side network (its residual stream must be consistent across
  blocks), by importance summed over every tapped layer: the input columns of q, k, v, up, gate and the output rows
  of o and down;
- MLP units: per block, the ff/r units with the largest |up| + |gate| rows and |down| columns (restricted to K);
- attention dims: per block and per key/value group, the head_dim/r dims of q/k and of v/o with the largest weights
  (all heads are kept). Under RoPE the q/k dims are fixed, evenly spaced frequency pairs, so that kept dims rotate at
  their original frequencies; the side's rotary embedding uses exactly those frequencies.

Ladders start as the selection of K (down_i(h) = h[K]), so the pruned blocks read the same coordinates they were cut
from. Quantized backbones (4-bit, 8-bit) are dequantized one layer at a time.

`init: pruned_fisher` keeps the same structure but ranks by Fisher importance on calibration batches of the training
data instead of weight magnitude (the mask-based Fisher of Kwon et al. 2022, arXiv 2204.09656): a mask m = 1 scales
each unit, and a unit's score is sum over examples of (dL/dm)^2, dL/dm = sum over tokens of (activation x its
gradient). The masks sit on the outputs of k and v (or a fused qkv: the q/k and v/o dims per key/value group), on
the input of down (the MLP units) and, one mask shared by every tapped block, on the blocks' outputs (the residual
dims). The loss is the task's as LST computes it at step 0; for a classifier that is a freshly initialised head,
so there the scores rank what moves a random readout (an LM head is the model's own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sidetune.anatomy import BlockShape, Stack, block_modules, qkv_rows
from sidetune.methods._lst_blocks import SideStack, rope_indices

INPUT_SIDE = {"q": "ln1", "k": "ln1", "v": "ln1", "qkv": "ln1", "up": "ln2", "gate": "ln2", "xq": "lnx", "xk": None,
              "xv": None}
OUTPUT_SIDE = ("o", "down", "xo")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight of a linear layer: nn.Linear, GPT-2's Conv1D, or bitsandbytes 4/8-bit."""
    w = layer.weight
    if isinstance(layer, Conv1D):
        return w.detach().float().t()
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if w.dtype == torch.int8:
        cb, scb = getattr(w, "CB", None), getattr(w, "SCB", None)
        if cb is None:
            cb, scb = layer.state.CB, layer.state.SCB
        return cb.float() * (scb.float()[:, None] / 127)
    return w.detach().float()


@torch.no_grad()
def norm_gain(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective per-dim gain (and bias) of a norm module, float32. Most norms scale by their weight; Gemma's
    RMSNorm scales by (1 + weight). The module is probed with a zero-mean, unit-RMS input z and -z (its output is
    gain * z + bias up to eps), and the gain is snapped to weight or 1 + weight when it is one of them."""
    w = norm.weight.detach().float() if getattr(norm, "weight", None) is not None else None
    b = getattr(norm, "bias", None)
    b = b.detach().float() if isinstance(b, torch.Tensor) else None
    if isinstance(norm, nn.LayerNorm) or w is None:
        return (w if w is not None else torch.ones(norm.normalized_shape)), b
    z = torch.ones(w.numel(), device=w.device)
    z[1::2] = -1
    dtype = norm.weight.dtype
    plus, minus = norm(z[None].to(dtype)).float()[0], norm(-z[None].to(dtype)).float()[0]
    gain = (plus - minus) / (2 * z)
    for offset in (0.0, 1.0):
        if ((gain - (w + offset)).abs() <= 0.05 * (1 + w.abs())).all():
            return w + offset, b
    return gain, (plus + minus) / 2 if b is not None else b


def block_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A backbone block's weights under neutral names (q k v o up gate down xq.. ln1 ln2 lnx post_attn post_ff q_norm
    k_norm), float32, and biases under "<name>.bias"; norms as their effective gain (`norm_gain`). A fused qkv
    projection stays "qkv" (`split_qkv` cuts it, given the block's shape); a fused gate+up is split here. Raises
    `_lst_blocks.Unmapped` when the block's modules cannot be given these roles."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in block_modules(layer).items():
        if name.startswith(("ln", "post_")) or name.endswith("_norm"):
            out[name], bias = norm_gain(mod)
            if bias is not None:
                out[f"{name}.bias"] = bias
            continue
        out[name] = dense_weight(mod)
        if getattr(mod, "bias", None) is not None:
            out[f"{name}.bias"] = mod.bias.detach().float()
    if "gate_up" in out:  # Phi3: gate rows first, then up
        out["gate"], out["up"] = out.pop("gate_up").chunk(2, dim=0)
        if "gate_up.bias" in out:
            out["gate.bias"], out["up.bias"] = out.pop("gate_up.bias").chunk(2, dim=0)
    return out


def split_qkv(w: dict[str, torch.Tensor], shape: BlockShape) -> dict[str, torch.Tensor]:
    """w with a fused "qkv" projection (and bias) cut into q, k and v, by the block's row layout."""
    if "qkv" not in w:
        return w
    w = dict(w)
    rows = qkv_rows(shape.qkv_layout, shape.heads, shape.kv_heads, shape.head_dim)
    for suffix in ("", ".bias"):
        fused = w.pop(f"qkv{suffix}", None)
        if fused is not None:
            w |= {f"{key}{suffix}": fused[rows[key].to(fused.device)] for key in "qkv"}
    return w


def hidden_importance(w: dict[str, torch.Tensor], pre_norm: bool) -> torch.Tensor:
    """Importance of each residual dim in one block: L1 of the columns that read it and the rows that write it."""
    imp = 0
    for name, norm in INPUT_SIDE.items():
        if name in w:
            col = w[name].abs().sum(0)
            gain = w.get(norm, w.get("ln1")) if pre_norm and norm is not None else None  # parallel: one norm
            imp = imp + (col * gain.abs() if gain is not None else col)
    for name in OUTPUT_SIDE:
        if name in w:
            imp = imp + w[name].abs().sum(1)
    return imp


def keep_hidden(stacks: list[Stack], tapped: list[list[int]], d_side: int,
                scores: Scores | None = None) -> torch.Tensor:
    """The d/r residual dims the side network keeps (one set for all its stacks), sorted. `scores`: Fisher
    importance (`fisher_scores`) instead of weight magnitude."""
    if scores is not None:
        return _top(scores.hidden, d_side)
    imp = 0
    for stack, layers in zip(stacks, tapped):
        for i in layers:
            imp = imp + hidden_importance(block_weights(stack.layers[i]), stack.shape.pre_norm)
    return torch.topk(imp, d_side).indices.sort().values


def _top(imp: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(imp, k, dim=-1).indices.sort(dim=-1).values


def _prune_attention(w, p: str, keep, src: BlockShape, side: BlockShape, rope: bool,
                     fisher: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    h, kv, hd, hd_s = src.heads, src.kv_heads, src.head_dim, side.head_dim
    group = torch.arange(h, device=keep.device) // (h // kv)
    q = w[f"{p}q"].reshape(h, hd, -1)[:, :, keep]
    k = w[f"{p}k"].reshape(kv, hd, -1)[:, :, keep]
    v = w[f"{p}v"].reshape(kv, hd, -1)[:, :, keep]
    o = w[f"{p}o"][keep].view(len(keep), h, hd)
    qk_imp = torch.zeros(kv, hd, device=keep.device).index_add_(0, group, q.abs().sum(-1)) + k.abs().sum(-1)
    if fisher is not None:  # scaling key dim i of a group scales its q.k term in every head of the group
        qk_imp = fisher[f"{p}k"].view(kv, hd).to(keep.device)
    if rope:  # rotating dims: fixed frequency pairs; the rest of a partial-rotary head: by importance
        rd, rd_s = src.rope_dims, side.rope_dims
        idx = rope_indices(rd // 2, rd_s // 2).to(keep.device)
        qk_dims = torch.cat((idx, idx + rd // 2)).expand(kv, -1)
        if hd_s > rd_s:
            qk_dims = torch.cat((qk_dims, rd + _top(qk_imp[:, rd:], hd_s - rd_s)), dim=1)
    else:
        qk_dims = _top(qk_imp, hd_s)
    v_imp = v.abs().sum(-1) + torch.zeros(kv, hd, device=keep.device).index_add_(0, group, o.abs().sum(0))
    if fisher is not None:
        v_imp = fisher[f"{p}v"].view(kv, hd).to(keep.device)
    v_dims = _top(v_imp, hd_s)
    heads, kvs = torch.arange(h, device=keep.device)[:, None], torch.arange(kv, device=keep.device)[:, None]
    out = {"q.weight": q[heads, qk_dims[group]].reshape(h * hd_s, -1),
           "k.weight": k[kvs, qk_dims].reshape(kv * hd_s, -1),
           "v.weight": v[kvs, v_dims].reshape(kv * hd_s, -1),
           "o.weight": o[:, heads, v_dims[group]].reshape(len(keep), h * hd_s)}
    for name, dims, n in (("q", qk_dims[group], h), ("k", qk_dims, kv), ("v", v_dims, kv)):
        if f"{p}{name}.bias" in w:
            out[f"{name}.bias"] = w[f"{p}{name}.bias"].view(n, hd)[torch.arange(n, device=keep.device)[:, None],
                                                                   dims].reshape(-1)
    if f"{p}o.bias" in w:
        out["o.bias"] = w[f"{p}o.bias"][keep]
    if side.qk_norm and not p:  # one gain per head dim, shared by all heads: that of the first group's kept dims
        out["q_norm.weight"], out["k_norm.weight"] = w["q_norm"][qk_dims[0]], w["k_norm"][qk_dims[0]]
    return out


def prune_block(w: dict[str, torch.Tensor], keep: torch.Tensor, src: BlockShape, side: BlockShape,
                fisher: dict[str, torch.Tensor] | None = None) -> dict:
    """The state dict of one side block cut from backbone block weights `w`; `fisher`: this block's Fisher scores
    (keys k, v, ff, and xk, xv for cross-attention) rank its units instead of weight magnitude."""
    w = split_qkv(w, src)
    if fisher is not None:
        fisher = split_qkv(fisher, src)
    out: dict[str, torch.Tensor] = {}
    if src.parallel and "ln2" not in w:  # one norm feeds attention and MLP: the side block has two, both from it
        w = w | {k.replace("ln1", "ln2"): v for k, v in w.items() if k.startswith("ln1")}
    for norm in ("ln1", "ln2", "lnx", "post_attn", "post_ff"):
        if norm in w:
            out[f"{norm}.weight"] = w[norm][keep]
            if f"{norm}.bias" in w:
                out[f"{norm}.bias"] = w[f"{norm}.bias"][keep]
            elif side.norm == "layer":  # a LayerNorm without a bias (MPT): the side norm's bias starts at 0
                out[f"{norm}.bias"] = torch.zeros(len(keep), device=keep.device)
    up = w["up"][:, keep]
    gate = w["gate"][:, keep] if "gate" in w else None
    down = w["down"][keep]
    ff_imp = up.abs().sum(1) + down.abs().sum(0) + (gate.abs().sum(1) if gate is not None else 0)
    if fisher is not None:
        ff_imp = fisher["ff"].to(ff_imp.device)
    units = _top(ff_imp, side.ff)
    out["mlp.up.weight"], out["mlp.down.weight"] = up[units], down[:, units]
    if gate is not None:
        out["mlp.gate.weight"] = gate[units]
    for name, idx in (("up", units), ("gate", units), ("down", keep)):
        if f"{name}.bias" in w:
            out[f"mlp.{name}.bias"] = w[f"{name}.bias"][idx]
    for key, value in _prune_attention(w, "", keep, src, side, src.rope, fisher).items():
        out[f"attn.{key}"] = value
    if "xq" in w:
        for key, value in _prune_attention(w, "x", keep, src, side, False, fisher).items():
            out[f"xattn.{key}"] = value
    return out


@torch.no_grad()
def init_pruned(side: SideStack, stack: Stack, side_shape: BlockShape, keep: torch.Tensor,
                fisher: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    """Copy pruned backbone weights into a side stack; ladders start as the selection of the kept dims. `fisher`:
    per tapped block index, its Fisher scores (`Scores.blocks[stack]`)."""
    for block, i in zip(side.blocks, side.tapped):
        w = block_weights(stack.layers[i])
        block.load_state_dict(prune_block(w, keep, stack.shape, side_shape, fisher[i] if fisher else None))
    for ladder in side.ladders:
        ladder.weight.zero_()
        ladder.weight[torch.arange(len(keep), device=keep.device), keep] = 1.0
        ladder.bias.zero_()
    if stack.final_norm is not None:
        gain, bias = norm_gain(stack.final_norm)
        side.norm.weight.copy_(gain[keep])
        if side.norm.bias is not None and bias is not None:
            side.norm.bias.copy_(bias[keep])
    if side.rel_bias is not None:
        side.rel_bias.weight.copy_(stack.rel_bias.weight.float())


# ---------------------------------------------------------------------------------------------------------------------
# Fisher importance (init: pruned_fisher)

MASKED_OUTPUTS = ("k", "v", "qkv", "xk", "xv")  # projections whose output dims are the attention dims pruning picks


@dataclass
class Scores:
    """Fisher importance: `hidden` (d,) for the residual dims; `blocks[stack][layer]` maps k, v (or qkv), xk, xv
    (their output dims) and ff (the MLP units) to a score per unit."""

    hidden: torch.Tensor
    blocks: list[dict[int, dict[str, torch.Tensor]]]


class _Masks:
    """One batch's masks of ones, (B, 1, units) each, made on first use by the forward hooks that apply them."""

    def __init__(self, batch_size: int) -> None:
        self.b, self.masks = batch_size, {}

    def get(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        if key not in self.masks:
            self.masks[key] = torch.ones(self.b, 1, like.shape[-1], device=like.device, dtype=like.dtype,
                                         requires_grad=True)
        return self.masks[key]

    def on_output(self, key: tuple):
        def hook(module, args, out):
            if isinstance(out, tuple):  # a block: (hidden, ...); its residual stream is the first entry
                return (out[0] * self.get(key, out[0]), *out[1:])
            return out * self.get(key, out)
        return hook

    def on_input(self, key: tuple):
        return lambda module, args: (args[0] * self.get(key, args[0]), *args[1:])


def fisher_scores(stacks: list[Stack], tapped: list[list[int]], loss_of: Callable[[dict], torch.Tensor],
                  batches: Iterable[dict[str, torch.Tensor]]) -> Scores:
    """Sum over the calibration examples of (dL/dm)^2 for a mask m = 1 on every unit pruning chooses among.

    Each mask has shape (B, 1, units): one copy per example, so m.grad holds per-example derivatives (the Fisher is
    a mean of squares, not the square of the batch mean). `loss_of(batch)` is the batch's mean loss; the backbone's
    weights stay frozen, only the masks take gradients."""
    hidden = None
    blocks: list[dict[int, dict[str, torch.Tensor]]] = [{i: {} for i in layers} for layers in tapped]
    for batch in batches:
        b = batch["input_ids"].shape[0]
        masks = _Masks(b)
        handles = []
        for k, (stack, layers) in enumerate(zip(stacks, tapped)):
            for i in layers:
                mods = block_modules(stack.layers[i])
                handles += [mods[r].register_forward_hook(masks.on_output((k, i, r)))
                            for r in MASKED_OUTPUTS if r in mods]
                handles.append(mods["down"].register_forward_pre_hook(masks.on_input((k, i, "ff"))))
                # one residual mask for every tapped block: the side network keeps one set of dims throughout
                handles.append(stack.layers[i].register_forward_hook(masks.on_output(("hidden",))))
        try:
            with torch.enable_grad():
                (loss_of(batch).float() * b).backward()  # per-example derivatives of the summed loss
        finally:
            for h in handles:
                h.remove()
        for key, m in masks.masks.items():
            if m.grad is None:
                continue  # a unit this loss does not reach scores 0 (absent)
            sq = m.grad.detach().float()[:, 0].pow(2).sum(0)
            if key == ("hidden",):
                hidden = sq if hidden is None else hidden + sq
            else:
                k, i, role = key
                blocks[k][i][role] = blocks[k][i][role] + sq if role in blocks[k][i] else sq
    if hidden is None:
        raise RuntimeError("the calibration loss reached no tapped block")
    return Scores(hidden, blocks)  # a fused qkv's scores are cut like its weight rows, in prune_block (split_qkv)
