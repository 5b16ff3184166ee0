"""bench/lst_bench.py on tiny-llama (NF4, CPU): the interleaved schedule times every phase once per round, Q-LST's
backbone saves nothing for backward, and sidetune's QLoRA trains exactly PEFT's parameter count on the same model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lst_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lst_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lst_bench"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_interleaved_run_times_every_phase_per_round():
    bench = _bench()
    assert bench.interleaved(["floor", "qlst", "qlora"], 2) == ["floor", "qlst", "qlora", "floor", "qlst", "qlora"]
    args = bench.parse_args(["--model", "tiny-llama", "--device", "cpu", "--batch", "2", "--seq", "8", "--chunk", "8",
                             "--interleave", "--warmup", "0", "--steps", "2"])
    result = bench.run(args)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["floor", "qlst", "qlora", "peft"]
    for r in rows.values():
        assert len(r["step_ms_all"]) == 2 and r["peak_allocated_gib"] is None  # times only when interleaved
        assert r["step_ms"] == pytest.approx(sum(r["step_ms_all"]) / 2)  # the median of two
    assert rows["qlst"]["saved_for_backward_gib"]["backbone"] == 0
    assert rows["qlst"]["saved_for_backward_gib"]["method"] > 0
    assert rows["floor"]["trainable"] == 0 < rows["qlst"]["trainable"]
    assert rows["qlora"]["trainable"] == rows["peft"]["trainable"] > 0
    assert set(result["ratios"]) == {"time_vs_floor", "time_vs_qlora", "time_vs_peft"}
    assert result["ratios"]["time_vs_peft"] == pytest.approx(rows["qlst"]["step_ms"] / rows["peft"]["step_ms"])
    assert "| Q-LST" in bench.table(result)
