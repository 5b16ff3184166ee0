"""The one summary of bench/gpu_check.sh: read what each step left in OUT and print it as Markdown.

    python bench/gpu_summary.py OUT

Per step its exit status and seconds (steps.tsv); the environment; lst_bench's phases and Q-LST's ratios against
their targets; each profile row's measured and predicted peak with the prediction error (the claim under test:
within 10% on CUDA); the real-weight runs' dev accuracy. A step that failed shows the last lines of its log.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 2**30


def _tail(path: Path, n: int = 8) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
    return "\n".join("    " + line for line in lines[-n:])


def steps(out: Path) -> list[str]:
    lines = ["## Steps", "", "| step | exit | seconds | command |", "|---|---|---|---|"]
    failed = []
    for row in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds, command = row.split("\t", 3)
        status = {"0": "ok", "124": "timed out", "137": "killed (timeout)", "skipped": "skipped (budget spent)"}.get(
            rc, f"failed ({rc})")
        lines.append(f"| {name} | {status} | {seconds} | `{command[:150]}` |")
        if rc != "0":
            failed.append(name)
    for name in failed:
        lines += ["", f"Last lines of {name}.log:", "", _tail(out / f"{name}.log", 12)]
    return lines


def env(out: Path) -> list[str]:
    log = out / "env.log"
    return ["## Environment", "", *("    " + line for line in log.read_text().splitlines())] if log.is_file() else []


def lst_bench(out: Path) -> list[str]:
    path = out / "lst_bench.json"
    if not path.is_file():
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lst_bench import table  # the bench's own table: targets and verdicts in one place

    result = json.loads(path.read_text())
    args = result["args"]
    return [f"## lst_bench: {args['model']}, {args['batch']} x {args['seq']}, {result['device']}", "", table(result)]


def profile(out: Path, name: str) -> list[str]:
    path = out / name / "profile.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    first = next((r for r in rows if "model" in r), {})  # a failed worker's row holds only its label and error
    lines = [f"## {name}: {first.get('model', '?')}, {first.get('batch', '?')} x {first.get('seq', '?')}, "
             f"{first.get('device', '?')}", "",
             "| row | trainable | measured peak GiB | reserved GiB | predicted peak GiB | error | step ms | x floor |",
             "|---|---|---|---|---|---|---|---|"]
    floors = {r["quantize"]: r["measured_peak_bytes"] for r in rows
              if not r.get("error") and r["method"] is None and r["measured_peak_bytes"]}
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | failed: {str(r['error'])[:120]} | | | | | | |")
            continue
        measured, predicted = r["measured_peak_bytes"], r["predicted_peak_bytes"]
        floor = floors.get(r["quantize"])
        err = r.get("prediction_error")
        lines.append(
            f"| {r['label']} | {r['params_trainable']:,} | {measured / GiB:.2f} | "
            f"{(r.get('cuda_max_reserved_bytes') or 0) / GiB:.2f} | {predicted / GiB:.2f} | "
            f"{'n/a' if err is None else f'{err:+.1%}'} | {r['step_time_s'] * 1000:.1f} | "
            f"{measured / floor:.2f} |" if measured and floor else
            f"| {r['label']} | {r['params_trainable']:,} | n/a | n/a | {(predicted or 0) / GiB:.2f} | n/a | | |")
    errors = [abs(r["prediction_error"]) for r in rows if r.get("prediction_error") is not None]
    if errors:
        worst = max(errors)
        lines += ["", f"Largest |prediction error|: {worst:.1%} ({'within' if worst <= 0.10 else 'OUTSIDE'} 10%)."]
    return lines


def train(out: Path) -> list[str]:
    lines = ["## Real-weight training (all-MiniLM-L6-v2, SST-2 dev)", "",
             "| run | steps | dev accuracy | eval loss | peak memory |", "|---|---|---|---|---|"]
    found = False
    for run in sorted(out.glob("run_*")):
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            continue
        found = True
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "eval_accuracy" in r]
        trains = [r for r in rows if "loss" in r]
        last = evals[-1] if evals else {}
        peak = max((v for r in trains for k, v in r.items() if "peak" in k and isinstance(v, (int, float))),
                   default=None)
        lines.append(f"| {run.name[4:]} | {last.get('step', trains[-1]['step'] if trains else '?')} | "
                     f"{last.get('eval_accuracy', float('nan')):.3f} | {last.get('eval_loss', float('nan')):.3f} | "
                     f"{'n/a' if peak is None else f'{peak:.2f} GiB'} |")
    return lines if found else []


def gpu_paths(out: Path) -> list[str]:
    path = out / "gpu_paths" / "gpu_paths.json"
    if not path.is_file():
        return []
    lines = ["## CUDA-only paths (bench/gpu_paths_check.py)", "", "| check | ok | seconds | detail |", "|---|---|---|---|"]
    for name, r in json.loads(path.read_text()).items():
        detail = r.get("error") or json.dumps({k: v for k, v in r.items() if k not in ("ok", "seconds", "trace")})
        lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r.get('seconds', '')} | {detail[:300]} |")
    return lines


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "bench/out/gpu_check")
    parts = [["# sidetune GPU check", ""], steps(out), env(out), lst_bench(out), profile(out, "profile8b"),
             profile(out, "profile1b"), train(out), gpu_paths(out)]
    print("\n".join("\n".join(p) + "\n" for p in parts if p))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
