"""`sidetune export RUN --hf OUT`: a self-contained transformers directory for every method. Its logits equal
`sidetune.load`'s, its `generate` keeps a KV cache (each cached step equals the full forward) and picks sidetune's
tokens, it loads in a Python where `import sidetune` fails, and bad input writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from sidetune.cli import main
from sidetune.config import load_config
from sidetune.hf_export import MARK
from sidetune.methods import trainable_parameters
from sidetune.rundir import load_run, save_trainable
from sidetune.session import build

# Two rows, the second right-padded; no token equals a tiny model's bos/eos/pad (0-2), so transformers infers no
# padding of its own.
IDS = torch.tensor([[5, 9, 33, 70, 12, 8, 11, 40], [7, 3, 4, 99, 100, 6, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def _run(tmp_path, method: str, preset: str, task: str = "causal_lm", *overrides: str):
    """A finished run whose trainable set is moved off its init (an up-projection, prefix or adapter left at zero
    would hide a part the export dropped), saved as the trainer saves it."""
    cfg = load_config(None, [f"method.name={method}", f"model.name={preset}", f"data.task={task}",
                             f"train.output_dir={tmp_path}/run", *overrides])
    cfg.data.num_labels = 2 if task == "classification" else None
    model = build(cfg, torch.device("cpu"), with_data=False).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_trainable(model, cfg, tmp_path / "run" / "final")
    return tmp_path / "run"


def _export(run, out, *args: str) -> None:
    assert main(["export", str(run), "--hf", str(out), *args]) == 0


def _logits(model, ids=IDS, mask=MASK) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _check_lm(run, out) -> None:
    """Logits on a padded batch; cached generation against the full forward and against sidetune's tokens."""
    ref, _ = load_run(run)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")  # the directory's code, not sidetune's
    real = MASK.bool()
    assert_close(_logits(model)[real], _logits(ref)[real], rtol=1e-5, atol=1e-5)

    prompt = IDS[:1, :5]
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    seq = got.sequences
    assert got[next(k for k in ("cache", "past_key_values") if k in got)] is not None
    for i, step in enumerate(got.logits):  # each cached step is the full forward's last position
        with torch.no_grad():
            full = model(input_ids=seq[:, :5 + i], use_cache=False).logits[:, -1]
        assert_close(step, full, rtol=1e-4, atol=1e-4)
    expected = ref.generate(prompt, max_new_tokens=6)
    n = min(seq.shape[1], expected.shape[1])
    assert seq[0, :n].tolist() == expected[0, :n].tolist()


@pytest.mark.parametrize("method,preset,extra", [
    ("lst", "tiny-llama", []),
    ("lst", "tiny-gpt2", ["method.side_layers=every:2"]),
    ("ptuning_v2", "tiny-llama", []),
    ("prefix_tuning", "tiny-gpt2", []),
    ("prompt_tuning", "tiny-llama", []),
    ("ptuning_v1", "tiny-llama", []),
    ("adapter", "tiny-llama", []),
    ("adapter", "tiny-llama", ["method.variant=parallel"]),
])
def test_hf_export_equals_sidetune_load_and_generates_with_a_cache(tmp_path, method, preset, extra):
    run = _run(tmp_path, method, preset, "causal_lm", *extra)
    out = tmp_path / "hf"
    _export(run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sidetune.SidetuneForCausalLM"
    assert config["sidetune"]["kind"] in ("lst", "prefix", "soft_prompt", "adapter")
    for name in ("model.safetensors", "modeling_sidetune.py", "side_network.py", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    _check_lm(run, out)


@pytest.mark.parametrize("method,preset", [("lst", "tiny-bert"), ("lst", "tiny-llama"), ("ptuning_v2", "tiny-bert")])
def test_hf_export_classifier(tmp_path, method, preset):
    run = _run(tmp_path, method, preset, "classification")
    out = tmp_path / "hf"
    _export(run, out)
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    ref, _ = load_run(run)
    got = _logits(model)
    assert got.shape == (2, 2)
    assert_close(got, _logits(ref), rtol=1e-5, atol=1e-5)


def test_qlst_exports_its_dequantized_base_in_the_asked_dtype(tmp_path, capsys):
    run = _run(tmp_path, "lst", "tiny-llama", "causal_lm", "model.quantize=nf4")
    _export(run, tmp_path / "fp32", "--dtype", "float32")
    line = capsys.readouterr().out
    assert "4-bit base dequantized to float32" in line and "MiB" in line
    _check_lm(run, tmp_path / "fp32")  # the dequantized weights are the ones the run trained against

    _export(run, tmp_path / "bf16", "--dtype", "bfloat16")
    assert "4-bit base dequantized to bfloat16" in capsys.readouterr().out
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert weights["backbone.model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert weights["side_up.weight"].dtype == torch.float32
    assert weights["side_network.ladders.0.weight"].dtype == torch.float32
    small, big = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp32"))
    assert small < 0.6 * big
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", trust_remote_code=True).eval()
    assert model.backbone.dtype == torch.bfloat16 and model.side_up.weight.dtype == torch.float32
    ref, _ = load_run(run)
    assert (_logits(model) - _logits(ref)).abs().max() < 0.1  # bf16 rounding only


def test_mergeable_run_with_hf_is_a_plain_directory(tmp_path):
    run = _run(tmp_path, "lora", "tiny-llama", "causal_lm", "method.targets=all-linear")
    _export(run, tmp_path / "hf")
    assert "auto_map" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no remote code
    ref, _ = load_run(run)
    real = MASK.bool()
    assert_close(_logits(model)[real], _logits(ref)[real], rtol=1e-4, atol=1e-4)


# The load in a Python where sidetune cannot be imported: isolated mode (-I: no PYTHONPATH, no script or working
# directory on sys.path), a working directory outside the checkout, and sidetune blocked in sys.modules (the test
# environment also has it installed in site-packages).
_OUTSIDE = textwrap.dedent("""
    import sys
    sys.modules["sidetune"] = None
    try:
        import sidetune
    except ImportError:
        pass
    else:
        raise SystemExit("sidetune is importable")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    inputs = load_file("inputs.safetensors")
    out = {}
    for name, auto in (("lst", AutoModelForCausalLM), ("ptuning_v2", AutoModelForCausalLM),
                       ("adapter", AutoModelForCausalLM), ("cls", AutoModelForSequenceClassification)):
        model = auto.from_pretrained(name, trust_remote_code=True).eval()
        assert "sidetune" not in sys.modules or sys.modules["sidetune"] is None
        with torch.no_grad():
            out[name] = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
        if auto is AutoModelForCausalLM:
            p = inputs["ids"][:1, :5]
            out[name + "_gen"] = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=5,
                                                do_sample=False)
    save_file(out, "outputs.safetensors")
""")


def test_hf_export_loads_where_sidetune_cannot_be_imported(tmp_path):
    runs = {"lst": _run(tmp_path / "a", "lst", "tiny-llama"), "ptuning_v2": _run(tmp_path / "b", "ptuning_v2",
                                                                                 "tiny-llama"),
            "adapter": _run(tmp_path / "c", "adapter", "tiny-gpt2"),
            "cls": _run(tmp_path / "d", "lst", "tiny-bert", "classification")}
    where = tmp_path / "outside"
    where.mkdir()
    for name, run in runs.items():
        _export(run, where / name)
    save_file({"ids": IDS, "mask": MASK}, where / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "-I", "-c", _OUTSIDE], cwd=where, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(where / "outputs.safetensors")
    real = MASK.bool()
    for name, run in runs.items():
        ref, _ = load_run(run)
        expected = _logits(ref)
        if name == "cls":
            assert_close(got[name], expected, rtol=1e-5, atol=1e-5)
            continue
        assert_close(got[name][real], expected[real], rtol=1e-5, atol=1e-5)
        want = ref.generate(IDS[:1, :5], max_new_tokens=5)
        n = min(want.shape[1], got[name + "_gen"].shape[1])
        assert got[name + "_gen"][0, :n].tolist() == want[0, :n].tolist()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = _run(tmp_path, "lst", "tiny-llama")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--hf", str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("sidetune: error:") == 1 and "not an earlier `sidetune export --hf`" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    with pytest.raises(SystemExit) as e:  # argparse: one usage line and one error line
        main(["export", str(run), "--hf", str(tmp_path / "x"), "--merge", str(tmp_path / "y")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--hf", str(tmp_path / "x"), "--dtype", "float8"])
    assert e.value.code == 2

    t5 = _run(tmp_path / "t5", "lst", "tiny-t5", "seq2seq")
    assert main(["export", str(t5), "--hf", str(tmp_path / "t5out")]) == 2
    assert capsys.readouterr().err.count("sidetune: error:") == 1
    soft = _run(tmp_path / "soft", "prompt_tuning", "tiny-bert", "classification")
    assert main(["export", str(soft), "--hf", str(tmp_path / "softout")]) == 2
    assert "sidetune: error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "t5out").exists()
    assert not (tmp_path / "softout").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    _export(run, tmp_path / "again")  # an earlier export is replaced with --overwrite only
    assert (tmp_path / "again" / MARK).is_file()
    assert main(["export", str(run), "--hf", str(tmp_path / "again")]) == 2
    _export(run, tmp_path / "again", "--overwrite")


def test_base_ref_stores_only_the_runs_tensors_and_loads_the_base_as_the_run_did(tmp_path, capsys):
    from sidetune.models import load_model

    base = tmp_path / "base"
    load_model(load_config(None, ["model.name=tiny-llama"]).model, "causal_lm").save_pretrained(base)
    model_args = [f"model.name={base}", "model.tokenizer=smollm2-135m"]
    for name, task, extra in (("qlst", "causal_lm", ["model.quantize=nf4"]), ("adapter", "causal_lm", []),
                              ("cls", "classification", [])):
        method = "adapter" if name == "adapter" else "lst"
        run = _run(tmp_path / name, method, str(base), task, *model_args[1:], *extra)
        out = tmp_path / name / "hf"
        _export(run, out, "--base-ref")
        line = capsys.readouterr().out
        assert f"base referred to at {base}" in line
        assert ("4-bit with bitsandbytes" in line) == (name == "qlst")
        config = json.loads((out / "config.json").read_text())
        assert config["sidetune"]["base_ref"]["path"] == str(base)
        weights = load_file(out / "model.safetensors")
        assert "backbone.model.embed_tokens.weight" not in weights  # the base stays in its directory
        assert (out / "model.safetensors").stat().st_size < 0.05 * (base / "model.safetensors").stat().st_size
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        model = auto.from_pretrained(out, trust_remote_code=True).eval()
        ref, _ = load_run(run)
        assert_close(_logits(model, IDS[:1], MASK[:1]), _logits(ref, IDS[:1], MASK[:1]), rtol=1e-5, atol=1e-5)

    assert main(["export", str(tmp_path / "qlst" / "run"), "--hf", str(tmp_path / "x"), "--base-ref", "--dtype",
                 "bfloat16"]) == 2
    preset = _run(tmp_path / "preset", "lst", "tiny-llama")
    assert main(["export", str(preset), "--hf", str(tmp_path / "y"), "--base-ref"]) == 2
    err = capsys.readouterr().err
    assert err.count("sidetune: error:") == 2 and "random-init preset" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
