"""LoRA: low-rank adaptation (Hu et al., 2021, arXiv 2106.09685); QLoRA when the base is 4-bit (arXiv 2305.14314).

A frozen linear layer y = W x gains a trainable low-rank update:

    y = W x + (alpha / r) * B A dropout(x),      A: r x in,  B: out x r

(rsLoRA, arXiv 2312.03732, scales by alpha / sqrt(r) instead, which keeps the update's size stable as r grows.)
With the standard init (A Kaiming-uniform, B = 0) the update is zero, so step 0 equals the frozen model. The
`a_zero` init swaps the roles (A = 0, B random), and `gaussian` draws A from N(0, 1/r). `lora_ga` (arXiv 2407.05000)
sets A and B from the SVD of the full-weight gradient on a few training batches and subtracts the initial B A from
the frozen weight, so that the first steps follow full fine-tuning's gradient (`_lora_ga.py`). `pissa` (arXiv
2404.02948) and `olora` (arXiv 2406.01775) read A and B from the weight itself (its top-r SVD, its QR) and keep the
residual as the frozen weight, and `loftq` (arXiv 2310.08659, a quantized base) fits the 4-bit base and B A to the
16-bit weight together (`_lora_weight_init.py`).

DoRA (arXiv 2402.09353, `dora: true`) splits the adapted weight into a direction and a trained magnitude m (one per
output row, initialised to the row norms of W + s B A, as PEFT does):

    y = m / ||W + s B A||_row * (W + s B A) x + bias

with the norm detached from the graph (the paper's memory-saving variant, as PEFT does), so the backward needs no
per-row norm gradient; it does keep W x and B A x for m's gradient (DoRA's extra activations). A 4-bit base is
dequantized for the norm in every forward. Names and arithmetic follow PEFT's `use_dora=True`.

LoRA+ (arXiv 2402.12354) trains B with a learning rate `loraplus_lr_ratio` times larger than A's.

Default targets: the attention query and value projections of every block (the paper's choice and PEFT's default),
read from the model by `sidetune.anatomy`, so every family it reads gets them. A fused qkv projection (GPT-2's
c_attn, GPT-NeoX's and Falcon's query_key_value, Phi3's qkv_proj, MPT's Wqkv) gets its update on its query and value
ROWS only: B keeps PEFT's full (out x r) shape, and a fixed 0/1 row mask multiplies it, so the key rows of B A are
exactly 0, their rows of B get no gradient and stay 0, and a merge or a PEFT export (a whole-layer LoRA whose key rows
are 0) computes the same function. `method.targets` names layers instead (then whole layers, as before).

The wrapper keeps the original layer as `self.base` (an nn.Linear, a bitsandbytes Linear4bit/Linear8bitLt, or GPT-2's
Conv1D) and never subclasses it, so a 4-bit base needs no special code: QLoRA is LoRA on a 4-bit model. Parameter
names (`lora_A.weight`, `lora_B.weight`) and the forward arithmetic follow PEFT, so PEFT serves as a test oracle.

Still paid (the gradient-to-input cost): every wrapped layer sits in the backbone, so backward must carry dL/dx
through all the layers above the lowest adapter, and autograd keeps their activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import sidetune.methods._lora_ga as _lora_ga
import sidetune.methods._lora_weight_init as _weight_init
from sidetune.anatomy import read
from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive, check_targets, opt
from sidetune.methods._inject import (
    Switchable,
    WrappedLinear,
    find_targets,
    float32_linear,
    freeze,
    is_quantized_linear,
    linear_features,
    module_device,
    parts_off,
    replace_module,
    to_input,
)
from sidetune.methods.base import Context, Method

# Inits that move the frozen weight (declared through `changed_base`), and those that read it.
WEIGHT_INITS = ("pissa", "olora")
CHANGES_BASE = ("lora_ga", "loftq", *WEIGHT_INITS)


@dataclass
class LoRAConfig:
    name: Literal["lora"] = opt("lora", "Selects this method.")
    targets: list[str] | None = opt(
        None,
        "Layers to wrap: names (matched as a suffix of the module name), \"re:<regex>\" for a full-name "
        "regex, or \"all-linear\" (every linear layer except the output head, as QLoRA does). null: every "
        "block's attention query and value projections, read from the model (a fused qkv layer: its q and v rows).",
    )
    r: int = opt(8, "Rank of the update.")
    alpha: float = opt(16.0, "Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = opt(0.0, "Dropout on the LoRA branch's input.")
    rslora: bool = opt(False, "Rank-stabilised scaling alpha / sqrt(r).")
    init: Literal["standard", "a_zero", "gaussian", "lora_ga", "pissa", "olora", "loftq"] = opt(
        "standard",
        "standard (A Kaiming-uniform, B = 0), a_zero (A = 0, B Kaiming-uniform), gaussian (A ~ N(0, 1/r), B = 0), "
        "lora_ga (A, B from the SVD of the weight gradient on calibration batches), pissa (A, B from the top-r SVD "
        "of W, the residual frozen), olora (A, B from the QR of W, the residual frozen): these three change the "
        "frozen weight, so float bases only; loftq (a quantized base, model.quantize: the 4-bit base and A, B "
        "fitted to W by alternating quantization and rank-r SVD).",
    )
    loftq_iter: int = opt(1, "loftq: alternating steps (quantize W - s B A, refit B A to W - Q); PEFT's default 1, "
                             "the paper uses up to 5.")
    pissa_niter: int = opt(0, "pissa: 0 = exact SVD; K > 0 = randomized SVD with K subspace iterations (PEFT's "
                              "pissa_niter_K; much faster on large layers).")
    dora: bool = opt(False, "DoRA: a trained magnitude per output row times the normalised direction W + s B A "
                            "(norm detached). Whole layers only (not a fused qkv layer's q/v rows).")
    calibration_batches: int = opt(8, "lora_ga: training batches the weight gradient is averaged over.")
    ga_gamma: float = opt(16.0, "lora_ga: gamma of the stable scale d_out^(1/4) / sqrt(gamma) on A and B.")
    ga_direction: Literal["ArB2r", "A2rBr"] = opt(
        "ArB2r",
        "lora_ga: ArB2r (A from the top r right singular vectors, B from left vectors r+1..2r: the paper's) or "
        "A2rBr (A from right vectors r+1..2r, B from the top r left ones).",
    )
    loraplus_lr_ratio: float = opt(1.0, "LoRA+: learning rate of B relative to A (1 = plain LoRA; the paper uses 16).")
    init_from: str | None = opt(
        None,
        "A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to start from: its weights "
        "replace the init; its r, lora_alpha, use_rslora and target layers must match this config.",
    )

    def __post_init__(self) -> None:
        check_targets("method.targets", self.targets)
        check_positive("method.r", self.r)
        check_dropout("method.dropout", self.dropout)
        check_positive("method.calibration_batches", self.calibration_batches)
        check_positive("method.loftq_iter", self.loftq_iter)
        if self.pissa_niter < 0:
            raise SidetuneError(f"method.pissa_niter must be >= 0 (0 = exact SVD), got {self.pissa_niter}")
        if self.dora and self.init_from is not None:
            raise SidetuneError("method.init_from loads plain LoRA adapters; drop method.dora or method.init_from")
        if self.alpha <= 0 or self.ga_gamma <= 0:
            raise SidetuneError(f"method.alpha and method.ga_gamma must be > 0, got {self.alpha} and {self.ga_gamma}")
        if self.alpha <= 0 or self.loraplus_lr_ratio <= 0:
            raise SidetuneError(f"method.alpha and method.loraplus_lr_ratio must be > 0, got {self.alpha} and "
                                f"{self.loraplus_lr_ratio}")


class LoRALinear(Switchable, WrappedLinear):
    """A frozen linear layer plus a trainable low-rank update; `rows` (a fused qkv layer's query and value rows)
    confines the update to those output rows."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "standard", rows: torch.Tensor | None = None, dora: bool = False) -> None:
        super().__init__()
        self.base = base
        in_features, out_features = linear_features(base)
        device = module_device(base)
        # fp32 master weights whatever the base stores (bf16 or 4-bit): autocast picks the matmul dtype.
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False
        mask = None
        if rows is not None:  # (out, 1) of 0/1: the adapted rows of B (not saved: the targets rebuild it)
            mask = torch.zeros(out_features, 1, device=device, dtype=torch.float32)
            mask[rows.to(device)] = 1.0
        self.register_buffer("row_mask", mask, persistent=False)
        self.reset_parameters(init)
        # DoRA's magnitude, named as PEFT saves it (`<layer>.lora_magnitude_vector`): fp32, one per output row.
        self.lora_magnitude_vector = None
        self._dora_scale: torch.Tensor | None = None  # m / norm at merge time, for unmerge
        if dora:
            if mask is not None:
                raise SidetuneError("method.dora adapts whole layers, but this target is a fused qkv layer adapted "
                                    "on its query and value rows; set method.targets to the fused layer's name")
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=device, dtype=torch.float32))
            self.reset_magnitude()

    def reset_parameters(self, init: str = "standard") -> None:
        with torch.no_grad():
            if init == "standard":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
                nn.init.zeros_(self.lora_B.weight)
            elif init == "a_zero":
                nn.init.zeros_(self.lora_A.weight)
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                raise SidetuneError(f"method.init={init!r} is unknown; use standard, a_zero or gaussian")
            if self.row_mask is not None:
                self.lora_B.weight.mul_(self.row_mask)  # rows outside the mask start (and stay) at 0

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = the row norms of W + s B A (so step 0 equals the base, whatever the init put in B A)."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def adapted_rows(self) -> torch.Tensor | None:
        """The output rows the update may touch (a fused qkv layer's query and value rows), or None for all."""
        return None if self.row_mask is None else self.row_mask[:, 0].nonzero()[:, 0]

    @torch.no_grad()
    def start_from(self, a: torch.Tensor, b: torch.Tensor, offset_base: bool = True) -> None:
        """A data- or weight-derived init (LoRA-GA, PiSSA, OLoRA, LoftQ): A = a, B = b on the adapted rows (0
        elsewhere), and (`offset_base`) s B A subtracted from the float base weight, so that step 0 still equals
        the base (LoftQ sets its own base)."""
        rows = self.adapted_rows()
        self.lora_A.weight.copy_(a)
        if rows is None:
            self.lora_B.weight.copy_(b)
        else:
            self.lora_B.weight.zero_()
            self.lora_B.weight[rows] = b
        if not offset_base:
            return
        weight = self.base.weight
        # In fp32, rounded once to the base dtype (a bf16 base keeps step 0 equal to bf16 precision only).
        weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))

    def dense_weight(self) -> torch.Tensor:
        """The base weight as float32 (out, in), dequantized from 4-bit/8-bit storage; no graph."""
        base = self.base
        if is_quantized_linear(base):
            base = float32_linear(base)
        w = base.weight.detach().float()
        return w.T if isinstance(self.base, Conv1D) else w

    def weight_norm(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A|| of each output row, float32, detached (the paper's memory-saving variant)."""
        with torch.no_grad():
            w = self.dense_weight() if w is None else w
            delta = (self.b_weight() @ self.lora_A.weight).float() * self.scaling
            return torch.linalg.norm(w + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged or self.off:  # off: a DPO step's reference forward (the frozen layer)
            return result
        dropped = self.dropout(to_input(x, self.lora_A.weight))
        h = self.lora_A(dropped)
        update = (self.lora_B(h) if self.row_mask is None else F.linear(h, self.b_weight())) * self.scaling
        if self.lora_magnitude_vector is None:
            return result + update.to(result.dtype)
        # DoRA: m / n * (W x' + s B A x') - W x, with x' = dropout(x) (x' = x without dropout: W x is the base's).
        w = self.dense_weight()
        scale = self.lora_magnitude_vector / self.weight_norm(w)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base.bias
            base_out = result if bias is None else result - bias
        else:
            base_out = F.linear(dropped, w.to(dropped.dtype))
        return result + ((scale - 1) * base_out + scale * update).to(result.dtype)

    def b_weight(self) -> torch.Tensor:
        """B as it acts: with a row mask, its rows outside the mask are 0 (and get no gradient)."""
        return self.lora_B.weight if self.row_mask is None else self.lora_B.weight * self.row_mask

    def delta_weight(self) -> torch.Tensor:
        """The update B A * scaling, in the layout of the base weight (Conv1D stores W transposed)."""
        delta = (self.b_weight() @ self.lora_A.weight) * self.scaling
        return delta.T if isinstance(self.base, Conv1D) else delta

    def merge(self) -> None:
        """Fold the update into the base weight for zero-latency inference (float bases only). DoRA: W' = m / n *
        (W + s B A), each output row scaled (a Conv1D column)."""
        if self.merged:
            return
        weight = self._float_weight()
        with torch.no_grad():
            if self.lora_magnitude_vector is not None:
                self._dora_scale = self.lora_magnitude_vector / self.weight_norm()
            weight.add_(self.delta_weight().to(weight.dtype))
            if self._dora_scale is not None:
                weight.mul_(self._row_scale(self._dora_scale).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._float_weight()
        with torch.no_grad():
            if self._dora_scale is not None:
                weight.div_(self._row_scale(self._dora_scale).to(weight.dtype))
                self._dora_scale = None
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def _row_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """A per-output-row factor shaped to broadcast over the base weight's layout."""
        return scale[None, :] if isinstance(self.base, Conv1D) else scale[:, None]

    def _float_weight(self) -> torch.Tensor:
        weight = self.base.weight
        if not weight.is_floating_point():
            raise SidetuneError(
                "cannot merge LoRA into a quantized base in place; use `sidetune export RUN_DIR --merge OUT`, which "
                "dequantizes first"
            )
        return weight


class LoRA(Method):
    name: ClassVar[str] = "lora"
    Config: ClassVar[type] = LoRAConfig

    def __init__(self, cfg: LoRAConfig) -> None:
        self.cfg = cfg

    def calibration_batches(self) -> int:
        return self.cfg.calibration_batches if self.cfg.init == "lora_ga" else 0

    def targets(self, model: nn.Module) -> dict[str, torch.Tensor | None]:
        """The layers to wrap, each with the output rows its update is confined to (None: all of them)."""
        if self.cfg.targets is not None:
            return dict.fromkeys(find_targets(model, self.cfg.targets))
        anatomy = read(model)
        found = anatomy.require({"attention query projection": ("q", "qkv"),
                                 "attention value projection": ("v", "qkv")}, "method.targets")
        wanted = {*found["attention query projection"], *found["attention value projection"],
                  *anatomy.names("xq", "xv")}  # cross-attention too (T5, as PEFT's q/v default)
        return {n: anatomy.rows(n, "qv") for n, _ in model.named_modules() if n in wanted}

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        targets = self.targets(model)
        freeze(model)
        names = list(targets)
        if not names:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise SidetuneError(
                f"method.targets={self.cfg.targets} matched no linear layer; this model's linear layers end in: "
                f"{', '.join(linear)} (or use all-linear)"
            )
        c = self.cfg
        grads = {}
        if c.init == "lora_ga" and not ctx.reload:  # a reload copies the stored A, B and offset base (changed_base)
            batches = list(ctx.batches(self.name, c.calibration_batches))
            grads = _lora_ga.mean_gradients(model, {n: model.get_submodule(n) for n in names}, batches)
        if c.dora and any(rows is not None for rows in targets.values()):
            fused = next(n for n, rows in targets.items() if rows is not None)
            raise SidetuneError(f"method.dora adapts whole layers, but {fused} is a fused qkv layer adapted on its "
                                f"query and value rows; set method.targets=[{fused.rsplit('.', 1)[-1]}] (whole "
                                f"layers) or drop method.dora")
        from_weight = c.init in WEIGHT_INITS
        if from_weight:
            for name in names:  # refused before any layer is touched
                _weight_init.check_float_base(name, model.get_submodule(name), c.init)
        if c.init == "loftq" and not ctx.reload:
            _weight_init.check_loftq(names, model, ctx.quantize)
        for name in names:
            if c.dora and targets[name] is not None:  # the rows of a fused qkv: DoRA's norm is of whole rows of W
                raise SidetuneError(f"method.dora adapts whole layers, but {name} is a fused qkv layer adapted on its "
                                    f"query and value rows; set method.targets=[{name.rsplit('.', 1)[-1]}] to adapt "
                                    f"it whole")
            layer = LoRALinear(model.get_submodule(name), c.r, c.alpha, c.dropout, c.rslora,
                               "standard" if c.init in CHANGES_BASE else c.init, targets[name], c.dora)
            if name in grads:
                _lora_ga.apply_init(layer, grads.pop(name), c.r, c.ga_gamma, c.ga_direction)
            elif from_weight and not ctx.reload:  # a reload copies the stored A, B and residual base
                _weight_init.apply_init(layer, c.r, c.init, c.pissa_niter)
            elif c.init == "loftq" and not ctx.reload:  # a reload reads the stored 4-bit base
                _weight_init.apply_loftq(layer, c.r, c.loftq_iter, ctx.quantize)
            if layer.lora_magnitude_vector is not None:
                layer.reset_magnitude()  # after the init: m = ||W_res + s B A|| = ||W||
            replace_module(model, name, layer)
        if c.init_from is not None:  # start from a PEFT adapter trained elsewhere (sidetune/peft_io.py)
            from sidetune.methods._peft import load_peft_adapter

            load_peft_adapter(model, c.init_from, c.r, c.alpha, c.rslora)
            for name, layer in model.named_modules():
                if isinstance(layer, LoRALinear) and layer.row_mask is not None and \
                        (layer.lora_B.weight * (1 - layer.row_mask)).any():
                    raise SidetuneError(f"method.init_from: the adapter updates every row of {name}, but this run "
                                        f"adapts only its query and value rows; set method.targets="
                                        f"[{name.rsplit('.', 1)[-1]}] to adapt the whole layer as the adapter does")
        return model

    def reads_float_base(self) -> bool:
        """LoftQ fits A, B to the error of quantizing W: it needs W itself, before the base is quantized."""
        return self.cfg.init == "loftq"

    def reference(self, from_trained: bool) -> str:
        # B A = 0 at the start (standard, a_zero, gaussian inits): the layers switched off are the starting model.
        # Inits that move the base (LoRA-GA, PiSSA, OLoRA), a PEFT adapter or a trained run to start from: not.
        exact = self.cfg.init in ("standard", "a_zero", "gaussian") and self.cfg.init_from is None
        return "parts_off" if exact and not from_trained else "precomputed"

    def reference_off(self, model: nn.Module):
        return parts_off(model)

    def changed_base(self, model: nn.Module) -> list[str]:
        """The base weights an init moved: LoRA-GA's W - s B0 A0, PiSSA's and OLoRA's residual W - s B A, LoftQ's
        4-bit Q (its bytes and block scales: `rundir.changed_state`)."""
        if self.cfg.init not in CHANGES_BASE:
            return []
        return [f"{n}.base.weight" for n, m in model.named_modules() if isinstance(m, LoRALinear)]

    def merge(self, model: nn.Module) -> nn.Module:
        for layer in lora_layers(model):
            # Merge in float32: a bf16 add of a small B A onto W loses most of the update's low bits.
            layer.base = float32_linear(layer.base)
        return merge_and_unwrap(model)

    def peft_config(self, model: nn.Module) -> dict:
        """PEFT's LoRA fields: sidetune's parameter names and arithmetic are PEFT's (sidetune/peft_io.py)."""
        from sidetune.methods._peft import lora_peft_config

        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        conv1d = any(isinstance(m.base, Conv1D) for m in layers.values())
        config = lora_peft_config(model, layers, self.cfg.r, self.cfg.alpha, self.cfg.dropout, self.cfg.rslora,
                                  conv1d)
        return {**config, "use_dora": True} if self.cfg.dora else config

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """LoRA+: B matrices at lr * ratio; everything else trainable (A, task head) at lr."""
        b_params = [m.lora_B.weight for m in model.modules() if isinstance(m, LoRALinear)]
        b_ids = {id(p) for p in b_params}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in b_ids]
        groups = [{"params": rest, "lr": lr}]
        if b_params:
            groups.append({"params": [p for p in b_params if p.requires_grad], "lr": lr * self.cfg.loraplus_lr_ratio})
        return groups


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its base weight (reversible with unmerge)."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base layers back: the result is an ordinary transformers model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            replace_module(model, name, module.base)
    return model
