"""Profile reports: the Markdown table, a one-paragraph reading of which method fits and why, and the PNG of where
each row's memory goes."""

from __future__ import annotations

import json
from pathlib import Path

from sidetune.profiling.rows import GiB, MiB


def peak_of(row: dict) -> int | None:
    """The row's peak as the report shows it: measured where measured, else predicted."""
    return row.get("measured_peak_bytes") or row.get("predicted_peak_bytes")


def _unit(rows: list[dict]) -> tuple[float, str]:
    biggest = max((peak_of(r) or 0 for r in rows), default=0)
    return (GiB, "GiB") if biggest >= GiB else (MiB, "MiB")


def _fmt(value, scale: float) -> str:
    return "–" if value is None else f"{value / scale:.2f}" if scale > MiB else f"{value / scale:.1f}"


def _flops(value) -> str:
    if value is None:
        return "–"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def markdown_table(rows: list[dict]) -> str:
    scale, unit = _unit(rows)
    floors = {r.get("quantize"): r for r in rows if r.get("method") is None and peak_of(r)}
    head = ("| row | trainable params | weights | grads + optim | act: backbone (grad-to-input) | act: method | "
            "act: head | fwd FLOPs | bwd dL/dx backbone | bwd dL/dW | measured peak | predicted peak | error | "
            "step ms | tokens/s | x floor | init once: s, measured / predicted |")
    lines = [f"Memory in {unit}; FLOPs per step.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error") and not peak_of(r):
            lines.append(f"| {r['label']} | {r['error']} |" + " |" * (head.count("|") - 3))
            continue
        floor = floors.get(r.get("quantize"))
        ratio = f"{peak_of(r) / peak_of(floor):.2f}" if floor and peak_of(r) else "–"
        err = r.get("prediction_error")
        lines.append("| " + " | ".join([
            r["label"], f"{r['params_trainable']:,}",
            _fmt(r["weights_bytes"], scale), _fmt(r["grads_bytes"] + r["optimizer_bytes"], scale),
            _fmt(r["act_backbone_bytes"], scale), _fmt(r["act_method_bytes"], scale), _fmt(r["act_head_bytes"], scale),
            _flops(r["fwd_flops"]), _flops(r["bwd_dx_flops_backbone"]), _flops(r["bwd_dw_flops"]),
            _fmt(r.get("measured_peak_bytes"), scale), _fmt(r.get("predicted_peak_bytes"), scale),
            "–" if err is None else f"{100 * err:+.1f}%",
            "–" if r.get("step_time_s") is None else f"{1000 * r['step_time_s']:.1f}",
            "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}", ratio, _init(r, scale),
        ]) + " |")
    hosted = [r for r in rows if r.get("host_bytes")]
    if hosted:
        lines += ["", "Kept in host memory, outside the peaks above: " + ", ".join(
            f"{r['label']} {_fmt(r['host_bytes'], scale)}" for r in hosted) + " (LST's method.ladder_offload)."]
    return "\n".join(lines)


def _init(r: dict, scale: float) -> str:
    """The method's one-time apply (its init): seconds, and its peak measured / predicted."""
    if r.get("method") is None or (r.get("init_peak_bytes") is None and r.get("predicted_init_peak_bytes") is None):
        return "–"
    secs = "–" if r.get("init_s") is None else f"{r['init_s']:.2f} s"
    return f"{secs}, {_fmt(r.get('init_peak_bytes'), scale)} / {_fmt(r.get('predicted_init_peak_bytes'), scale)}"


def reading(rows: list[dict], vram: int | None) -> str:
    """One paragraph: which method fits and why, from the numbers in the rows."""
    scale, unit = _unit(rows)
    methods = [r for r in rows if r.get("method") is not None and peak_of(r)]
    if not methods:
        return "No method row has a peak to read."
    gib = lambda b: f"{b / scale:.2f} {unit}"  # noqa: E731
    best = min(methods, key=peak_of)
    floors = {r.get("quantize"): r for r in rows if r.get("method") is None and peak_of(r)}
    full = next((r for r in methods if r["label"] == "full"), None)
    source = next((r["measured_peak_source"] for r in methods if r.get("measured_peak_source")), None)
    parts = [f"Peaks are {'measured (' + source + ')' if source else 'predicted on fake tensors'}."]
    if vram is not None:
        fit = [r["label"] for r in methods if peak_of(r) <= vram]
        parts.append(f"Within {gib(vram)}: {', '.join(fit) if fit else 'no method'} fits"
                     + ("" if len(fit) == len(methods) else
                        f"; {', '.join(r['label'] for r in methods if peak_of(r) > vram)} does not") + ".")
    floor = floors.get(best.get("quantize"))
    ratio = f", {peak_of(best) / peak_of(floor):.2f}x the no-grad forward of the same batch" if floor else ""
    parts.append(f"{best['label']} needs the least: {gib(peak_of(best))}{ratio}"
                 + (f", {peak_of(best) / peak_of(full):.2f}x full fine-tuning" if full and full is not best else "")
                 + ".")
    paying = sorted((r for r in methods if r["act_backbone_bytes"]), key=lambda r: -r["act_backbone_bytes"])
    free = [r["label"] for r in methods if not r["act_backbone_bytes"] and not r["bwd_dx_flops_backbone"]]
    pefts = [r for r in paying if r["label"] != "full"]
    if pefts:
        worst = pefts[0]
        share = worst["act_backbone_bytes"] / peak_of(worst)
        counts = sorted(r["params_trainable"] for r in pefts)
        trained = f"{counts[0]:,}" + (f" to {counts[-1]:,}" if counts[-1] != counts[0] else "")
        parts.append(f"The gradient-to-input cost is what separates them: {', '.join(r['label'] for r in pefts)} "
                     f"train {trained} parameters yet backpropagate through the frozen backbone, which keeps up to "
                     f"{gib(worst['act_backbone_bytes'])} of activations for backward ({100 * share:.0f}% of "
                     f"{worst['label']}'s peak) and spends {_flops(worst['bwd_dx_flops_backbone'])} backward FLOPs "
                     f"on dL/dx.")
    if free:
        parts.append(f"{', '.join(free)} keep{'s' if len(free) == 1 else ''} no backbone activation and run no "
                     f"backbone dL/dx: only {'its' if len(free) == 1 else 'their'} own modules and the head are "
                     f"backpropagated.")
    elif not pefts and paying:
        parts.append("Every method here backpropagates through the backbone.")
    return " ".join(parts)


def write_reports(rows: list[dict], out: Path, vram: int | None = None) -> None:
    (out / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    first = next((r for r in rows if r.get("model")), rows[0])
    title = (f"# Memory profile: {first.get('model')}, {first.get('task')}, batch {first.get('batch')} x seq "
             f"{first.get('seq')}, device {first.get('device')} (prediction for {first.get('target')})")
    notes = ("Activations are the tensors autograd saves for backward, each storage counted once at its full size, "
             "weights excluded: backbone = the gradient-to-input cost, method = the method's own modules, head = task "
             "head, output embedding and loss. The measured peak is `torch.cuda.max_memory_allocated` on CUDA "
             "(reserved memory and nvidia-smi read higher) and the CPU allocator's peak on CPU; the predicted peak "
             "follows the live storages of the same step on fake tensors. `x floor` divides by the no-grad forward of "
             "the same batch on the same base (4-bit rows by the 4-bit floor).")
    text = "\n\n".join([title, reading(rows, vram), markdown_table(rows), notes, "![profile](profile.png)"])
    (out / "profile.md").write_text(text + "\n")
    plot(rows, out / "profile.png")


# What the peak is made of: the live storages at the peak moment, by kind (memory.LiveTracker's categories). These
# add up to the peak, so the bar ends at its predicted-peak marker. (The previous picture stacked every kind's total,
# but activations, gradients and optimizer state are not all live at once: full fine-tuning's bar ran past its peak.)
PEAK_SEGMENTS = (  # (label, color, hatch, categories of the breakdown)
    ("weights", "#9e9e9e", "", ("weights",)),
    ("gradients", "#5b8bd0", "", ("grads",)),
    ("optimizer state", "#274b86", "", ("optimizer",)),
    ("activations live at the peak", "#f2a7a7", "", ("activations",)),
    ("backward temporaries (logits, loss, dL/dx buffers, dequantized weights)", "#e8e8e8", "..", ("temporaries",)),
    ("batch and other", "#d9d2c3", "", ("inputs", "other")),
)
# What autograd saves for backward, by the module that saved it (a thin bar under the peak's): the backbone's share
# is the gradient-to-input cost. Saved tensors are a part of the activations at the forward's end, which need not be
# the peak's moment, so this bar is drawn apart from the peak's, never stacked onto it.
SAVED_SEGMENTS = (  # (label, color, hatch, bytes of a row)
    ("saved for backward: backbone = gradient-to-input cost", "#d62728", "//", lambda r: r["act_backbone_bytes"]),
    ("saved for backward: method modules", "#2ca02c", "", lambda r: r["act_method_bytes"]),
    ("saved for backward: head + loss", "#ff9f1c", "", lambda r: r["act_head_bytes"]),
)


def peak_segments(row: dict) -> list[tuple[str, int]]:
    """The row's bar: (label, bytes) per kind live at its peak, adding up to the peak the bar is drawn for (the
    predicted peak's breakdown where there is one, else the tracked real step's); [] for a row without either."""
    breakdown = row.get("predicted_breakdown") or row.get("peak_breakdown")
    if not breakdown:
        return []
    return [(label, sum(breakdown.get(c, 0) for c in cats)) for label, _, _, cats in PEAK_SEGMENTS]


def plot(rows: list[dict], path: Path) -> None:
    """One bar per row: what is live at the step's peak, by kind (it ends at the predicted peak); under it a thin bar
    of what autograd saved for backward, by module; the measured and predicted peaks as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("weights_bytes") is not None]
    scale, unit = _unit(rows)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.8 * max(len(rows), 1)), dpi=120)
    ys = [1.0 * i for i in range(len(rows))][::-1]
    bar, thin = 0.5, 0.16
    left = [0.0] * len(rows)
    for k, (label, color, hatch, _) in enumerate(PEAK_SEGMENTS):
        widths = [(peak_segments(r)[k][1] if peak_segments(r) else 0) / scale for r in rows]
        ax.barh([y + thin / 2 for y in ys], widths, left=left, color=color, hatch=hatch, linewidth=0.6, height=bar,
                label=label, edgecolor="#b0b0b0" if hatch else "white")
        left = [a + b for a, b in zip(left, widths)]
    saved_left = [0.0] * len(rows)
    for label, color, hatch, get in SAVED_SEGMENTS:
        widths = [get(r) / scale for r in rows]
        ax.barh([y - bar / 2 - 0.02 for y in ys], widths, left=saved_left, color=color, hatch=hatch, linewidth=0.4,
                height=thin, label=label, edgecolor="#7f0000" if hatch == "//" else "white")
        saved_left = [a + b for a, b in zip(saved_left, widths)]
    ends = [max(a, b, (r.get("predicted_peak_bytes") or 0) / scale, (r.get("measured_peak_bytes") or 0) / scale)
            for a, b, r in zip(left, saved_left, rows)]
    xmax = max([*ends, 1e-9])
    for y, r, end in zip(ys, rows, ends):
        if r.get("measured_peak_bytes"):
            ax.plot(r["measured_peak_bytes"] / scale, y + thin / 2, marker="|", color="black", markersize=22, mew=2.5)
        if r.get("predicted_peak_bytes"):
            ax.plot(r["predicted_peak_bytes"] / scale, y + thin / 2, marker="D", markersize=7, mfc="none", mec="black",
                    mew=1.4)
        peak = peak_of(r)
        text = f"{peak / scale:.2f} {unit}" if peak else ""
        if r.get("method") is not None and peak:
            share = r["act_backbone_bytes"] / peak
            text += f"   grad-to-input {100 * share:.0f}%" if share else "   no grad-to-input"
        ax.text(end + xmax * 0.02, y, text, va="center", ha="left", fontsize=9,
                color="#b00000" if r.get("act_backbone_bytes") else "#1f5f1f" if r.get("method") else "black")
    if any(r.get("measured_peak_bytes") for r in rows):
        ax.plot([], [], marker="|", color="black", ls="none", markersize=12, mew=2.5, label="measured peak")
    if any(r.get("predicted_peak_bytes") for r in rows):
        ax.plot([], [], marker="D", mfc="none", mec="black", ls="none", label="predicted peak")
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=11)
    ax.set_xlim(0, xmax * 1.45)
    ax.set_xlabel(f"{unit}: wide bar = what is live at the step's peak; thin bar = what autograd saved for backward "
                  f"(grad-to-input = backbone's share / peak)", fontsize=9)
    first = rows[0] if rows else {}
    where = first.get("device") if first.get("device") != "meta" else f"predicted for {first.get('target')}"
    ax.set_title(f"Where the memory goes: {first.get('model')} {first.get('task')}, batch {first.get('batch')} x "
                 f"seq {first.get('seq')}, {where}", fontsize=12)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.5 / max(len(rows), 1)), ncol=3, fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
