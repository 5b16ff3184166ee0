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

The base changes, so the run declares those weights through `Method.changed_base` (stored with the run; a reload
reads them instead of recomputing), and `export --peft` converts to a plain LoRA on the original base, as PEFT's
`path_initial_model_for_weight_conversion` does. A 4-bit base is refused: W_res would have to be requantized, which
changes it (PEFT requantizes; LoftQ is the init that accounts for that error).
"""

from __future__ import annotations

import torch
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
