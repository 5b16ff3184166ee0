"""Initialise LST's side network by structural pruning of the backbone (LST paper, section 3.3).

Importance is the L1 magnitude of weight rows/columns (for pre-norm blocks, an input column is weighted by the gain
of the norm in front of it, since that is the effective weight), or with `init: pruned_fisher` the empirical Fisher
of each weight, sum over calibration batches b of (dL_b/dw * w)^2: the second-order estimate of the loss increase if
w were cut (the diagonal-Fisher / first-order-Taylor score of structured pruning, e.g. LLM-Pruner, arXiv
2305.11627), summed over rows/columns like the L1 scores. The Fisher scores take no norm gain: the gain already
scales the layer's input, so it is in the gradient. What is kept:

- hidden dims: one set K of d/r dims for the whole side network (its residual stream must be consistent across
  blocks), by importance summed over every tapped layer: the input columns of q, k, v, up, gate and the output rows
  of o and down;
- MLP units: per block, the ff/r units with the largest |up| + |gate| rows and |down| columns (restricted to K);
- attention dims: per block and per key/value group, the head_dim/r dims of q/k and of v/o with the largest weights
  (all heads are kept). Under RoPE the q/k dims are fixed, evenly spaced frequency pairs, so that kept dims rotate at
  their original frequencies; the side's rotary embedding uses exactly those frequencies.

Ladders start as the selection of K (down_i(h) = h[K]), so the pruned blocks read the same coordinates they were cut
from. Quantized backbones (4-bit, 8-bit) are dequantized one layer at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sidetune.methods._lora_ga import linear_gradients
from sidetune.methods._lst_blocks import BlockShape, SideStack, Stack, rope_indices, stacks_of, tapped_layers

INPUT_SIDE = {"q": "ln1", "k": "ln1", "v": "ln1", "up": "ln2", "gate": "ln2", "xq": "lnx", "xk": None, "xv": None}
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


def _modules(layer: nn.Module, family: str) -> dict[str, nn.Module]:
    if family == "llama":
        a, m = layer.self_attn, layer.mlp
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "up": m.up_proj, "gate": m.gate_proj,
                "down": m.down_proj, "ln1": layer.input_layernorm, "ln2": layer.post_attention_layernorm}
    if family == "gpt2":
        return {"qkv": layer.attn.c_attn, "o": layer.attn.c_proj, "up": layer.mlp.c_fc, "down": layer.mlp.c_proj,
                "ln1": layer.ln_1, "ln2": layer.ln_2}
    if family == "bert":
        a = layer.attention
        return {"q": a.self.query, "k": a.self.key, "v": a.self.value, "o": a.output.dense, "ln1": a.output.LayerNorm,
                "up": layer.intermediate.dense, "down": layer.output.dense, "ln2": layer.output.LayerNorm}
    sa, ff = layer.layer[0], layer.layer[-1]
    out = {k: getattr(sa.SelfAttention, k) for k in "qkvo"} | {"ln1": sa.layer_norm, "ln2": ff.layer_norm}
    dense = ff.DenseReluDense
    out |= {"gate": dense.wi_0, "up": dense.wi_1} if hasattr(dense, "wi_0") else {"up": dense.wi}
    out["down"] = dense.wo
    if len(layer.layer) == 3:  # decoder block: cross-attention
        out |= {f"x{k}": getattr(layer.layer[1].EncDecAttention, k) for k in "qkvo"} | {"lnx": layer.layer[1].layer_norm}
    return out


def block_weights(layer: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """A backbone block's weights under neutral names (q k v o up gate down xq.. ln1 ln2 lnx), float32, and biases
    under "<name>.bias"."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in _modules(layer, family).items():
        if name.startswith("ln"):
            out[name] = mod.weight.detach().float()
        else:
            out[name] = dense_weight(mod)
        if getattr(mod, "bias", None) is not None:
            out[f"{name}.bias"] = mod.bias.detach().float()
    if "qkv" in out:  # GPT-2's fused projection
        for key, part in zip("qkv", out.pop("qkv").chunk(3, dim=0)):
            out[key] = part
        for key, part in zip("qkv", out.pop("qkv.bias").chunk(3, dim=0)):
            out[f"{key}.bias"] = part
    return out


Scores = dict[int, dict[str, torch.Tensor]]  # block index -> neutral name -> per-weight importance (>= 0)


def l1_scores(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-weight L1 importance |w| (norm gains included: pre-norm blocks weight input columns by them)."""
    return {k: v.abs() for k, v in w.items() if not k.endswith(".bias")}


def fisher_scores(model: nn.Module, side_layers, batches) -> list[Scores]:
    """Per-weight empirical Fisher sum_b (dL_b/dw * w)^2 of the tapped blocks' linear layers, one dict per stack,
    from the backbone's own loss on the calibration batches. Gradients come from hooks (`linear_gradients`): no
    backbone parameter requires grad or keeps a .grad, and 4-bit weights work through their dequantized values.
    Costs one fp32 score matrix per tapped weight, plus one batch's gradients."""
    layers: dict[str, nn.Module] = {}
    out: list[Scores] = []
    for k, stack in enumerate(stacks_of(model)):
        out.append({})
        for i in tapped_layers(side_layers, len(stack.layers)):
            out[k][i] = {}
            for name, mod in _modules(stack.layers[i], stack.shape.family).items():
                if name.startswith("ln"):
                    out[k][i][name] = torch.ones_like(mod.weight, dtype=torch.float32)  # gain: in the gradient
                else:
                    layers[f"{k}.{i}.{name}"] = mod
    for grads in linear_gradients(model, layers, batches):
        for key, g in grads.items():
            k, i, name = key.split(".")
            score = (g * dense_weight(layers[key])).square_()
            block = out[int(k)][int(i)]
            block[name] = block[name].add_(score) if name in block else score
    for stack in out:
        for block in stack.values():
            if "qkv" in block:  # GPT-2's fused projection, split as in block_weights
                block.update(zip("qkv", block.pop("qkv").chunk(3, dim=0)))
    return out


def hidden_importance(s: dict[str, torch.Tensor], pre_norm: bool) -> torch.Tensor:
    """Importance of each residual dim in one block: the scores of the columns that read it and the rows that write
    it (s: per-weight scores, l1_scores or fisher_scores)."""
    imp = 0
    for name, norm in INPUT_SIDE.items():
        if name in s:
            col = s[name].sum(0)
            imp = imp + (col * s[norm] if pre_norm and norm is not None else col)
    for name in OUTPUT_SIDE:
        if name in s:
            imp = imp + s[name].sum(1)
    return imp


def keep_hidden(stacks: list[Stack], tapped: list[list[int]], d_side: int,
                scores: list[Scores] | None = None) -> torch.Tensor:
    """The d/r residual dims the side network keeps (one set for all its stacks), sorted. `scores`: Fisher scores
    per stack (fisher_scores); None: L1."""
    imp = 0
    for k, (stack, layers) in enumerate(zip(stacks, tapped)):
        for i in layers:
            s = scores[k][i] if scores else l1_scores(block_weights(stack.layers[i], stack.shape.family))
            imp = imp + hidden_importance(s, stack.shape.pre_norm)
    return torch.topk(imp, d_side).indices.sort().values


def _top(imp: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(imp, k, dim=-1).indices.sort(dim=-1).values


def _prune_attention(w, s, p: str, keep, src: BlockShape, side: BlockShape, rope: bool) -> dict[str, torch.Tensor]:
    h, kv, hd, hd_s = src.heads, src.kv_heads, src.head_dim, side.head_dim
    group = torch.arange(h, device=keep.device) // (h // kv)

    def cut(d):  # q, k, v, o sliced to the kept residual dims, as (heads, head_dim, kept) / (kept, heads, head_dim)
        return (d[f"{p}q"].view(h, hd, -1)[:, :, keep], d[f"{p}k"].view(kv, hd, -1)[:, :, keep],
                d[f"{p}v"].view(kv, hd, -1)[:, :, keep], d[f"{p}o"][keep].view(len(keep), h, hd))

    q, k, v, o = cut(w)
    qs, ks, vs, os_ = cut(s)
    if rope:
        idx = rope_indices(hd // 2, hd_s // 2).to(keep.device)
        qk_dims = torch.cat((idx, idx + hd // 2)).expand(kv, -1)
    else:
        qk_imp = torch.zeros(kv, hd, device=keep.device).index_add_(0, group, qs.sum(-1)) + ks.sum(-1)
        qk_dims = _top(qk_imp, hd_s)
    v_imp = vs.sum(-1) + torch.zeros(kv, hd, device=keep.device).index_add_(0, group, os_.sum(0))
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
    return out


def prune_block(w: dict[str, torch.Tensor], keep: torch.Tensor, src: BlockShape, side: BlockShape,
                s: dict[str, torch.Tensor] | None = None) -> dict:
    """The state dict of one side block cut from backbone block weights `w`, choosing by scores `s` (default L1)."""
    s = l1_scores(w) if s is None else s
    out: dict[str, torch.Tensor] = {}
    for norm in ("ln1", "ln2", "lnx"):
        if norm in w:
            out[f"{norm}.weight"] = w[norm][keep]
            if f"{norm}.bias" in w:
                out[f"{norm}.bias"] = w[f"{norm}.bias"][keep]
    up = w["up"][:, keep]
    gate = w["gate"][:, keep] if "gate" in w else None
    down = w["down"][keep]
    ff_imp = s["up"][:, keep].sum(1) + s["down"][keep].sum(0) + (s["gate"][:, keep].sum(1) if gate is not None else 0)
    units = _top(ff_imp, side.ff)
    out["mlp.up.weight"], out["mlp.down.weight"] = up[units], down[:, units]
    if gate is not None:
        out["mlp.gate.weight"] = gate[units]
    for name, idx in (("up", units), ("gate", units), ("down", keep)):
        if f"{name}.bias" in w:
            out[f"mlp.{name}.bias"] = w[f"{name}.bias"][idx]
    for key, value in _prune_attention(w, s, "", keep, src, side, src.rope).items():
        out[f"attn.{key}"] = value
    if "xq" in w:
        for key, value in _prune_attention(w, s, "x", keep, src, side, False).items():
            out[f"xattn.{key}"] = value
    return out


@torch.no_grad()
def init_pruned(side: SideStack, stack: Stack, side_shape: BlockShape, keep: torch.Tensor,
                scores: Scores | None = None) -> None:
    """Copy pruned backbone weights into a side stack; ladders start as the selection of the kept dims. `scores`:
    this stack's Fisher scores (None: L1)."""
    for block, i in zip(side.blocks, side.tapped):
        w = block_weights(stack.layers[i], stack.shape.family)
        block.load_state_dict(prune_block(w, keep, stack.shape, side_shape, scores[i] if scores else None))
    for ladder in side.ladders:
        ladder.weight.zero_()
        ladder.weight[torch.arange(len(keep), device=keep.device), keep] = 1.0
        ladder.bias.zero_()
    if stack.final_norm is not None:
        side.norm.weight.copy_(stack.final_norm.weight.detach().float()[keep])
        if side.norm.bias is not None and getattr(stack.final_norm, "bias", None) is not None:
            side.norm.bias.copy_(stack.final_norm.bias.detach().float()[keep])
    if side.rel_bias is not None:
        side.rel_bias.weight.copy_(stack.layers[0].layer[0].SelfAttention.relative_attention_bias.weight.float())
