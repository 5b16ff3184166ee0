"""A model's anatomy, read once from its config and its modules: the one place that knows how transformers families
name and lay out their parts. Every method takes its default placement from these roles (LoRA: the attention query
and value; adapters: the attention output and the FFN; IA3: keys, values and the FFN's inner activation; BitFit's
groups; the prefix methods' KV layout; LST's side blocks), so a family read here is a family every method supports,
and adding a family is an edit of this file only.

What `read(model)` returns (`Anatomy`):
- its stacks of blocks (`Stack`): [body] for decoder-only and encoder-only models, [encoder, decoder] for
  encoder-decoders; causal or not, with cross-attention or not; the final norm;
- per block, the module name of each role: attention `q k v` (or a fused `qkv`, whose query / key / value rows
  `qkv_rows` gives for the stack's layout: "concat" q|k|v as GPT-2, Phi3, MPT; "grouped" per key/value group as
  GPT-NeoX, Falcon (multi-query too), BLOOM; "codegen", four chunks of q|v|k), the output `o`, q/k norms, the same
  with an `x` prefix for cross-attention (`xq xk xv xo`), the MLP `up gate` (or a fused `gate_up`) and `down`, the
  norms `ln1 ln2` (`lnx` before cross-attention; `post_attn post_ff`: Gemma2's sandwich);
- the block shape (`BlockShape`): widths, heads, key/value heads and head dim (the KV layout), MLP width, norm kind
  and eps, pre-/post-norm, gated MLP and activation, which projections carry biases, parallel attention + MLP, q/k
  norms, RoPE dims; the stack's RoPE frequencies and T5's relative position bias;
- the position scheme (rope, alibi, relative, learned, none), attention and final-logit soft-capping, the input
  embeddings, the LM head and the task head.

Roles come from the module tree, not from per-family name tables: a linear inside an attention module is a query,
key or value when its name says so (q, query, q_proj, q_lin, query_proj ...), a fused qkv when its name is one of the
fused names, else the output; outside attention, the MLP's up and down projections are told apart by their widths
(up reads the residual stream). A block whose roles cannot all be read keeps those it could read, and `problem`
says what was not found; a method that needs a missing role refuses in one line (`Anatomy.require`) naming it and
the `method.targets` override.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from sidetune.errors import SidetuneError

# Layer types a method may wrap. bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2 uses Conv1D,
# a Linear whose weight is stored transposed (in, out).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

# Names of fused query/key/value projections, and the row layout of those that are not "concat" (q | k | v).
FUSED_QKV = {"qkv_proj", "c_attn", "query_key_value", "wqkv", "qkv", "in_proj"}
_GROUPED = {"query_key_value", "in_proj"}  # GPT-NeoX, Falcon, BLOOM, Persimmon; DeBERTa's in_proj (per head q k v)
_LAYOUT_BY_TYPE = {"codegen": "codegen"}  # CodeGen: 4 chunks, each [q | v | k] of a quarter of the heads
_CODEGEN_CHUNKS = 4
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_CROSS = re.compile(r"encdec|enc_dec|cross|encoder_attn", re.IGNORECASE)
_POSITIONAL = {"pos", "rel"}  # DeBERTa's pos_key_proj / pos_query_proj: positions, not tokens


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a bitsandbytes linear or a GPT-2 Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


class Unmapped(Exception):
    """A block whose modules cannot all be given roles (LST then falls back to random init; a method that needs a
    missing role refuses in one line)."""


# ---------------------------------------------------------------------------------------------------------------------
# Norms


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1


def norm_kind(module: nn.Module) -> str:
    return "layer" if isinstance(module, nn.LayerNorm) or getattr(module, "bias", None) is not None else "rms"


def norm_eps(module: nn.Module, config) -> float:
    for owner, key in ((module, "variance_epsilon"), (module, "eps"), (module, "epsilon"), (config, "rms_norm_eps"),
                       (config, "layer_norm_eps"), (config, "layer_norm_epsilon"), (config, "norm_eps")):
        value = getattr(owner, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# One block's roles


def _linear_role(leaf: str, in_attention: bool) -> str | None:
    low = leaf.lower()
    tokens = low.split("_")
    if in_attention:
        if low in FUSED_QKV:
            return "qkv"
        if _POSITIONAL & set(tokens[:-1]):
            return None  # a projection of relative positions (DeBERTa), not of the tokens
        return {"q": "q", "query": "q", "k": "k", "key": "k", "v": "v", "value": "v"}.get(tokens[0], "o")
    if "gate_up" in low:
        return "gate_up"
    if "gate" in low or low in ("w1", "wi_0"):
        return "gate"
    return "mlp"


def _attention_container(path: list[str]) -> str | None:
    """The name of the attention module a path lies in (the deepest component that says attn/attention)."""
    idx = [i for i, p in enumerate(path[:-1]) if _ATTENTION.search(p)]
    return ".".join(path[: idx[-1] + 1]) if idx else None


def read_block(layer: nn.Module, d: int | None = None) -> tuple[dict[str, nn.Module], list[str]]:
    """A block's modules by role (see the module docstring) and what could not be read. d: the residual width (None:
    the width of its first norm outside attention). Two modules claiming one role keep neither (a problem is
    recorded); the caller decides which roles it needs."""
    problems: list[str] = []
    if d is None:
        d = next((m.weight.numel() for n, m in layer.named_modules() if is_norm(m) and m.weight is not None
                  and _attention_container([*n.split("."), ""]) is None), None)
        if d is None:
            return {}, ["it has no norm outside its attention"]
    out: dict[str, nn.Module] = {}
    clash: set[str] = set()
    norms, mlp, containers = [], [], []

    def claim(role: str, mod: nn.Module) -> None:
        if role in out or role in clash:
            clash.add(role)
            out.pop(role, None)
        else:
            out[role] = mod

    for name, mod in layer.named_modules():
        if not name:
            continue
        path = name.split(".")
        container = _attention_container(path)
        if container is not None and container not in containers and isinstance(mod, LINEAR_TYPES):
            containers.append(container)  # attention modules in the order their projections appear
        # Cross-attention: a container named so (T5's EncDecAttention, BART's encoder_attn), or a second one.
        cross = container in containers and (_CROSS.search(container) or containers.index(container) > 0)
        prefix = "x" if cross else ""
        if is_norm(mod):
            if mod.weight is None:
                problems.append(f"its norm {name} has no weight")
                continue
            head = path[-1].lower()[:1]
            if container is not None and head in "qk" and mod.weight.numel() != d:
                claim(f"{prefix}{head}_norm", mod)
            elif container is None or mod.weight.numel() == d:
                norms.append(mod)
        elif isinstance(mod, LINEAR_TYPES):
            role = _linear_role(path[-1], container is not None)
            if role == "mlp":
                mlp.append(mod)
            elif role is not None:
                claim(prefix + role, mod)
    for mod in mlp:  # up reads the residual stream (d -> ff), down writes it (ff -> d); equal widths: in order
        n_in, n_out = linear_features(mod)
        claim("up" if n_in == d and (n_out != d or "up" not in out) else "down", mod)
    problems += [f"two modules look like its {r!r} projection" for r in sorted(clash)]
    cross = any(r.startswith("x") for r in out)
    layouts = {1: ("ln1",), 2: ("ln1", "ln2"), 3: ("ln1", "lnx", "ln2") if cross else None,
               4: ("ln1", "post_attn", "ln2", "post_ff")}
    roles = layouts.get(len(norms))
    if roles is None:
        problems.append(f"it has {len(norms)} norms (1, 2, 4, or 3 with cross-attention, are understood)")
    else:
        out |= dict(zip(roles, norms))
    missing = [r for r in ("o", "down") if r not in out]
    missing += [] if "qkv" in out or all(r in out for r in "qkv") else ["q/k/v"]
    missing += [] if "up" in out or "gate_up" in out else ["up"]
    if missing:
        problems.append(f"no {', '.join(missing)} projection found")
    return out, problems


def block_modules(layer: nn.Module, d: int | None = None) -> dict[str, nn.Module]:
    """All roles of a block (LST's side blocks and pruned init need every one). Raises Unmapped when the roles are
    not clear."""
    out, problems = read_block(layer, d)
    if problems:
        raise Unmapped("; ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Fused q/k/v rows


def qkv_rows(layout: str, heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The output rows of a fused qkv projection that hold the queries, keys and values (in head order)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    if layout == "grouped":  # per key/value group: its heads/kv_heads queries, one key, one value
        per = heads // kv_heads
        g = torch.arange(kv_heads * (per + 2) * head_dim).view(kv_heads, per + 2, head_dim)
        return {"q": g[:, :per].reshape(-1), "k": g[:, per].reshape(-1), "v": g[:, per + 1].reshape(-1)}
    if layout == "codegen":
        local = q // _CODEGEN_CHUNKS
        c = torch.arange(3 * q).view(_CODEGEN_CHUNKS, 3, local)
        return {"q": c[:, 0].reshape(-1), "v": c[:, 1].reshape(-1), "k": c[:, 2].reshape(-1)}
    rows = torch.arange(q + 2 * kv)
    return {"q": rows[:q], "k": rows[q:q + kv], "v": rows[q + kv:]}


# ---------------------------------------------------------------------------------------------------------------------
# A stack's shape


@dataclass(frozen=True)
class BlockShape:
    family: str  # the model_type (for messages)
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
    rope_dims: int = 0  # dims of each head that rotate (partial rotary: < head_dim); 0 without RoPE
    qk_norm: bool = False  # RMS norm of each query/key head before RoPE (Qwen3, Gemma3)
    sandwich: bool = False  # norms on the attention and MLP outputs too (Gemma2, Gemma3)
    parallel: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX, Falcon, Phi)
    # A fused qkv projection's rows (`qkv_rows`): "concat", "grouped" or "codegen"; "" when q, k, v are separate.
    qkv_layout: str = ""

    def reduced(self, r: int) -> BlockShape:
        """LST's side blocks' shape: width, head dims and MLP divided by r (heads kept, so attention keeps its
        structure; RoPE needs an even head dim)."""
        head_dim = max(2, self.head_dim // r // 2 * 2) if self.rope else max(1, self.head_dim // r)
        rope_dims = 0
        if self.rope:
            rope_dims = head_dim if self.rope_dims >= self.head_dim else min(head_dim, max(2, self.rope_dims // r // 2 * 2))
        return replace(self, d=self.d // r, head_dim=head_dim, ff=max(1, self.ff // r), rope_dims=rope_dims)


@dataclass
class Stack:
    """One stack of blocks: a decoder-only or encoder-only body, or an encoder-decoder's encoder or decoder."""

    layers: nn.ModuleList  # the blocks (LST's ladders read their outputs)
    final_norm: nn.Module | None
    shape: BlockShape
    inv_freq: torch.Tensor | None = None  # RoPE frequencies
    rope_scaling: float = 1.0
    unmapped: str | None = None  # which roles of the first block could not be read (None: all)
    out_dim: int | None = None  # width of the body's output when it differs from d (OPT's project_out)
    path: str = ""  # module name of `layers`
    blocks: list[dict[str, str]] = field(default_factory=list)  # per block: role -> full module name
    rel_bias: nn.Module | None = None  # T5's relative position bias (an embedding shared by the stack's blocks)
    cache_heads: int = 0  # key/value heads a KV cache holds (Falcon's new layout caches them broadcast to all heads)

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(blocks, key/value heads, head dim): the shape of a KV cache for this stack."""
        return len(self.layers), self.cache_heads or self.shape.kv_heads, self.shape.head_dim


def _act(config) -> str:
    for key in ("hidden_activation", "hidden_act", "activation_function", "dense_act_fn", "activation"):
        value = getattr(config, key, None)
        if isinstance(value, str) and value in ACT2FN:
            return value
    return "gelu"


def _rotary(body: nn.Module, config) -> tuple[torch.Tensor | None, float]:
    """The RoPE frequencies (the full-attention set where layer types differ) and attention scaling."""
    if getattr(config, "alibi", False):  # Falcon with ALiBi: no rotary embedding is applied
        return None, 1.0
    for mod in body.modules():
        buffers = {n: b for n, b in mod.named_buffers(recurse=False) if n.endswith("inv_freq") and "original" not in n}
        if not buffers:
            continue
        key = next((n for n in ("full_attention_inv_freq", "inv_freq") if n in buffers), next(iter(buffers)))
        prefix = key[: -len("inv_freq")]
        scaling = getattr(mod, f"{prefix}attention_scaling", getattr(mod, "attention_scaling", 1.0))
        return buffers[key].detach().float().clone(), float(scaling or 1.0)
    return None, 1.0


def is_causal_body(config) -> bool:
    return bool(getattr(config, "is_decoder", False)) or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _final_norm(body: nn.Module, layers: nn.ModuleList, causal: bool) -> nn.Module | None:
    inside = {id(m) for m in layers.modules()}
    found = None
    for name, mod in body.named_modules():
        if id(mod) in inside or not is_norm(mod) or "embed" in name.lower():
            continue
        leaf = name.rpartition(".")[2].lower()
        if causal or "final" in leaf or leaf in ("norm", "ln_f", "norm_f"):
            found = mod
    return found


_PROJECTIONS = {"q": ("q",), "k": ("k",), "v": ("v",), "qkv": ("q", "k", "v"), "o": ("o",), "up": ("up",),
                "gate": ("gate",), "gate_up": ("gate", "up"), "down": ("down",)}


def _read_stack(body: nn.Module, layers: nn.ModuleList, path: str, c, causal: bool, cross: bool) -> Stack:
    """A stack, read from the config and its first block's modules."""
    d, heads = c.hidden_size, c.num_attention_heads
    final_norm = _final_norm(body, layers, causal)
    pre_norm = bool(getattr(c, "do_layer_norm_before", True)) if causal else final_norm is not None
    inv_freq, scaling = _rotary(body, c)
    head_dim = getattr(c, "head_dim", None) or d // heads
    roles, problems = read_block(layers[0], d)
    unmapped = f"{type(layers[0]).__name__}: {'; '.join(problems)}" if problems else None
    mods = {} if problems else roles  # a block not fully read: a plain block from the config (LST's random init)
    if "q" in mods and "k" in mods:
        head_dim = getattr(c, "head_dim", None) or linear_features(mods["q"])[1] // heads
        kv_heads = linear_features(mods["k"])[1] // head_dim
    elif "qkv" in mods:
        kv_heads = (linear_features(mods["qkv"])[1] // head_dim - heads) // 2
    else:
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
    if "gate_up" in mods:
        ff = linear_features(mods["gate_up"])[1] // 2
    elif "up" in mods:
        ff = linear_features(mods["up"])[1]
    else:
        ff = getattr(c, "intermediate_size", None) or 4 * d
    ln1 = mods.get("ln1")
    norm = norm_kind(ln1) if ln1 is not None else "rms"
    eps = norm_eps(ln1, c) if ln1 is not None else norm_eps(nn.Module(), c)
    biases = frozenset(part for role, mod in mods.items() if role in _PROJECTIONS
                       and getattr(mod, "bias", None) is not None for part in _PROJECTIONS[role])
    # Parallel attention + MLP: one norm feeding both (Phi, Falcon), or the config says so (GPT-NeoX, Falcon).
    parallel = not cross and bool(mods) and ("ln2" not in mods or bool(getattr(c, "use_parallel_residual", False))
                                             or bool(getattr(c, "new_decoder_architecture", False)))
    rope = inv_freq is not None
    # T5: unscaled scores (the scale is folded into the init) and a relative position bias shared by the blocks.
    buckets = getattr(c, "relative_attention_num_buckets", None) if c.is_encoder_decoder else None
    rel = (buckets, c.relative_attention_max_distance) if buckets else None
    fused = next((n.rpartition(".")[2].lower() for n, m in layers[0].named_modules() if m is mods.get("qkv")), "")
    layout = "" if not fused else _LAYOUT_BY_TYPE.get(c.model_type, "grouped" if fused in _GROUPED else "concat")
    shape = BlockShape(c.model_type, d, heads, max(1, kv_heads), head_dim, ff, norm, eps, pre_norm,
                       "gate" in mods or "gate_up" in mods or not mods, _act(c), biases, 1.0 if rel else None,
                       causal, cross, rope, rel, rope_dims=min(head_dim, 2 * inv_freq.numel()) if rope else 0,
                       qk_norm="q_norm" in mods and "k_norm" in mods, sandwich="post_ff" in mods, parallel=parallel,
                       qkv_layout=layout)
    out_dim = None
    project_out = getattr(getattr(body, "decoder", body), "project_out", None)  # OPT-350m: hidden -> embedding dim
    if isinstance(project_out, nn.Linear):
        out_dim = project_out.out_features
    blocks = []
    for i, layer in enumerate(layers):
        found = roles if i == 0 else read_block(layer, d)[0]
        names = {id(m): n for n, m in layer.named_modules()}
        blocks.append({r: f"{path}.{i}.{names[id(m)]}" for r, m in found.items()})
    rel_bias = next((m for n, m in layers[0].named_modules() if isinstance(m, nn.Embedding)
                     and "relative_attention_bias" in n), None) if rel else None
    # Falcon's new decoder architecture broadcasts its grouped keys and values to every head before caching them.
    cache_heads = heads if getattr(c, "new_decoder_architecture", False) else 0
    return Stack(layers, final_norm, shape, inv_freq, scaling, unmapped, out_dim, path, blocks, rel_bias, cache_heads)


# ---------------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class Anatomy:
    """What `read(model)` found (see the module docstring)."""

    kind: str  # "decoder", "encoder" or "encoder-decoder"
    model_type: str
    model_class: str
    stacks: list[Stack]
    position: str  # rope | alibi | relative | learned | none
    position_offset: int  # the first real token's position id (RoBERTa-style learned positions: padding index + 1)
    attn_softcap: float | None  # Gemma2: scores = cap * tanh(scores / cap)
    final_softcap: float | None  # Gemma2: logits = cap * tanh(logits / cap)
    embeddings: str | None  # the input embedding's module name
    lm_head: str | None  # the output embedding's module name (None: a classifier or an encoder body)
    task_head: list[str]  # modules initialised for the task (models.load_model's `sidetune_head`)
    problem: str | None = None  # why no stack of blocks was found (None: found)

    @property
    def describe(self) -> str:
        return f"{self.model_class} (model_type {self.model_type!r})"

    def names(self, *roles: str) -> list[str]:
        """Module names of these roles in every block of every stack, in model order."""
        return [b[r] for s in self.stacks for b in s.blocks for r in roles if r in b]

    def require(self, groups: dict[str, tuple[str, ...]], key: str) -> dict[str, list[str]]:
        """For each named group of alternative roles (e.g. {"query": ("q", "qkv")}), the module names filling it in
        every block; a block where a group finds none is one SidetuneError naming what was not found and `key`."""
        out: dict[str, list[str]] = {}
        for what, roles in groups.items():
            names = []
            for s in self.stacks:
                for i, b in enumerate(s.blocks):
                    hit = [b[r] for r in roles if r in b]
                    if not hit:
                        why = s.unmapped or self.problem or "no module of that role"
                        raise SidetuneError(f"found no {what} in block {i} of {self.describe} ({why}); set {key} "
                                            f"to the layers' names (or re:<regex>)")
                    names += hit[:1]
            if not names:
                raise SidetuneError(f"found no blocks in {self.describe} ({self.problem}); set {key} to the layers' "
                                    f"names (or re:<regex>)")
            out[what] = names
        return out

    def rows(self, name: str, parts: str) -> torch.Tensor | None:
        """The output rows of `parts` (a subset of "qkv") if `name` is a fused qkv projection; None otherwise."""
        for s in self.stacks:
            for b in s.blocks:
                if b.get("qkv") == name:
                    rows = qkv_rows(s.shape.qkv_layout, s.shape.heads, s.shape.kv_heads, s.shape.head_dim)
                    return torch.cat([rows[p] for p in parts]).sort().values
        return None

    def kv_layout(self) -> tuple[int, int, int]:
        """(blocks, key/value heads, head dim) of a decoder-only or encoder-only model: a prefix's KV cache shape."""
        if len(self.stacks) != 1:
            raise SidetuneError(f"{self.describe} has {len(self.stacks)} stacks of blocks; a key/value prefix needs "
                                f"one (a decoder-only or encoder-only model)")
        return self.stacks[0].kv_layout


def _stacks(model: nn.Module, config, kind: str) -> tuple[list[Stack], str | None]:
    if kind == "encoder-decoder":
        found = []
        for part in ("encoder", "decoder"):
            body = getattr(model, part, None) or getattr(model.base_model, part, None)
            lists = [(n, m) for n, m in body.named_modules() if isinstance(m, nn.ModuleList) and len(m)] if body else []
            if not lists:
                return [], f"no list of blocks in its {part}"
            name, layers = lists[0]
            prefix = next(n for n, m in model.named_modules() if m is body)
            found.append(_read_stack(body, layers, f"{prefix}.{name}", config, causal=part == "decoder",
                                     cross=part == "decoder"))
        return found, None
    body = model.base_model
    n = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in body.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and len(m)]
    if not lists or not isinstance(getattr(config, "hidden_size", None), int):
        return [], f"no list of {n} blocks of width hidden_size"
    name, layers = lists[0]
    prefix = next(p for p, m in model.named_modules() if m is body)
    path = f"{prefix}.{name}" if prefix else name
    return [_read_stack(body, layers, path, config, causal=is_causal_body(config), cross=False)], None


def _position(model: nn.Module, config, stacks: list[Stack]) -> str:
    if any(s.inv_freq is not None for s in stacks):
        return "rope"
    if any(s.shape.rel_bias for s in stacks) or getattr(config, "relative_attention", False):
        return "relative"
    attn_config = getattr(config, "attn_config", None)
    if getattr(config, "alibi", False) or getattr(attn_config, "alibi", False) or config.model_type == "bloom":
        return "alibi"
    if any(isinstance(m, nn.Embedding) and re.search(r"pos|wpe", n) for n, m in model.named_modules()):
        return "learned"
    return "none"


def _position_offset(model: nn.Module) -> int:
    """Learned positions whose embedding has a padding index (RoBERTa, XLM-R, CamemBERT ...) number a sequence from
    padding index + 1 (fairseq's convention); everything else from 0."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and "position" in name and mod.padding_idx is not None:
            return int(mod.padding_idx) + 1
    return 0


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return None if module is None else next((n for n, m in model.named_modules() if m is module), None)


def read(model: nn.Module) -> Anatomy:
    """The anatomy of a transformers model (before any method changed it)."""
    config = model.config
    kind = "encoder-decoder" if config.is_encoder_decoder else "decoder" if is_causal_body(config) else "encoder"
    try:
        stacks, problem = _stacks(model, config, kind)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, IndexError) as e:
        stacks, problem = [], f"{type(e).__name__}: {e}"
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return Anatomy(kind, config.model_type, type(model).__name__, stacks, _position(model, config, stacks),
                   _position_offset(model),
                   getattr(config, "attn_logit_softcapping", None), getattr(config, "final_logit_softcapping", None),
                   _name_of(model, inputs), _name_of(model, outputs), list(getattr(model, "sidetune_head", ())),
                   problem)
