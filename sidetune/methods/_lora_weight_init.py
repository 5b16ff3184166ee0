"""LoRA inits read from the frozen weight itself: PiSSA (Meng, Wang & Zhang, 2024, arXiv 2404.02948) and OLoRA
(Büyükakyüz, 2024, arXiv 2406.01775). Both put the weight's leading low-rank part into B A and keep the rest as the
frozen base, so step 0 equals the base model and training starts on the weight's principal directions.

    PiSSA:  W = U S V^T,  B = U_r (S_r / s)^(1/2),  A = (S_r / s)^(1/2) V_r^T          (s = the LoRA scaling)
    OLoRA:  W = Q R,      B = Q[:, :r],           A = R[:r]
    both:   frozen base W_res = W - s B A

The 1/s inside PiSSA's square roots follows PEFT (its `init_lora_weights="pissa"`), so s B A is exactly the top-r
truncated SVD whatever alpha is; OLoRA, as in PEFT, does not rescale, so s B A is s times the first r columns of the
QR. `pissa_niter > 0` is PEFT's "pissa_niter_K": torch.svd_lowrank of rank r with K subspace iterations (seconds
instead of minutes on a 4096 x 14336 layer), seeded here so that a run is reproducible.

LoftQ (Li et al., 2023, arXiv 2310.08659) is the init for a quantized base (QLoRA): it fits the 4-bit Q and the
low-rank s B A together to the 16-bit W, alternating (PEFT's `loftq_init`, the paper's Algorithm 1)

    Q_t = dequantize(quantize(W - s B_{t-1} A_{t-1})),   s B_t A_t = top-r SVD of W - Q_t      (B_0 A_0 = 0)

for `loftq_iter` steps; the base is the last Q, so Q + s B A is closer to W than plain QLoRA's quantize(W) + 0. The
quantizer is the run's own (model.quantize, double_quant, compute dtype: `models.quantizer`), so the fitted Q is the
exact 4-bit layer the run trains on; PEFT quantizes with NF4 without double quantization, which is the same thing
when the run's settings are those. It needs W, which the 4-bit bytes no longer hold: the build loads the base in
float for such a run (`Method.reads_float_base`) and quantizes the other linears after the init. As for PiSSA, B A
is divided by s (PEFT does not divide, so the two agree where lora_alpha = r, the LoftQ examples' setting).

The base changes, so the run declares those weights through `Method.changed_base` (stored with the run; a reload
reads them instead of recomputing), and `export --peft` converts to a plain LoRA on the original base, as PEFT's
`path_initial_model_for_weight_conversion` does. A 4-bit base is refused: W_res would have to be requantized, which
changes it (PEFT requantizes; LoftQ is the init that accounts for that error). A LoftQ run stores its 4-bit Q (bytes
and block scales), and `export --peft` saves Q dequantized as the adapter's base, as PEFT's LoftQ models are
published: W - Q is not low-rank, so no rank-2r conversion onto W exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sidetune.errors import SidetuneError


def check_float_base(name: str, module, init: str) -> None:
    """One line for a quantized target layer (the unwrapped module), before anything is changed."""
    if not module.weight.is_floating_point():
        raise SidetuneError(f"method.init={init} needs a float base (its B A is subtracted from the frozen weight; "
                            f"{name} is quantized); drop model.quantize, or use method.init=standard for QLoRA")


def factors(w: torch.Tensor, r: int, scaling: float, init: str, niter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: r x in, B: out x r) from a float32 weight w (out x in)."""
    if r > min(w.shape):
        raise SidetuneError(f"method.init={init} needs method.r <= the smaller side of every targeted layer "
                            f"({w.shape[0]} x {w.shape[1]} here); lower method.r to <= {min(w.shape)}")
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if niter > 0:
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


@torch.no_grad()
def apply_init(layer, r: int, init: str, niter: int = 0) -> None:
    """Set a LoRALinear's A and B from its base weight and subtract s B A from that weight. A fused qkv layer
    adapted on some rows: the init reads those rows of W only, and B stays 0 elsewhere."""
    w = layer.base.weight.detach().float()
    if isinstance(layer.base, Conv1D):  # Conv1D stores W as (in, out)
        w = w.T
    rows = layer.adapted_rows()
    layer.start_from(*factors(w if rows is None else w[rows], r, layer.scaling, init, niter))


def check_loftq(names: list[str], model: nn.Module, quantize: Callable | None) -> None:
    """One line, before any layer is touched, where LoftQ cannot run: no quantizer (model.quantize unset, or the
    base already quantized) or a target that is not an nn.Linear (GPT-2's Conv1D is not quantized)."""
    if quantize is None:
        raise SidetuneError("method.init=loftq fits A, B to the error of quantizing the base: set model.quantize "
                            "(nf4, fp4 or int8); for a float base use method.init=pissa")
    for name in names:
        if type(model.get_submodule(name)) is not nn.Linear:
            raise SidetuneError(f"method.init=loftq needs plain linear target layers ({name} is a "
                                f"{type(model.get_submodule(name)).__name__}); set method.targets to linear layers")


@torch.no_grad()
def loftq_fit(w: torch.Tensor, base: nn.Linear, r: int, scaling: float, iters: int, quantize: Callable,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, nn.Module, list[float]]:
    """(A, B, the quantized layer Q, ||W - Q - s B A|| after each step) for a float32 weight w (out x in) of the
    linear `base` (its bias goes onto Q). `rows`: the fit touches those output rows only (a fused qkv layer)."""
    from sidetune.methods._inject import float32_linear

    res, errors = w, []
    for _ in range(iters):
        linear = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(res, requires_grad=False)
        linear.bias = base.bias
        q_layer = quantize(linear)
        err = w - float32_linear(q_layer).weight.to(w.device)
        a, b = factors(err if rows is None else err[rows], r, scaling, "loftq")
        low = scaling * (b @ a)
        if rows is not None:
            low = torch.zeros_like(w).index_copy_(0, rows, low)
        errors.append(float(torch.linalg.norm(err - low)))
        res = w - low
    return a, b, q_layer, errors


@torch.no_grad()
def apply_loftq(layer, r: int, iters: int, quantize: Callable) -> list[float]:
    """LoftQ on a LoRALinear whose base is still float: its base becomes the fitted quantized layer, A, B the
    fitted factors. Returns the fit's error after each step."""
    w = layer.base.weight.detach().float()
    a, b, q_layer, errors = loftq_fit(w, layer.base, r, layer.scaling, iters, quantize, layer.adapted_rows())
    layer.base = q_layer
    layer.start_from(a, b, offset_base=False)
    return errors
