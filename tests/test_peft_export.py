"""`sidetune export --peft` and `method.init_from`: PEFT loads the exported adapter with sidetune's logits, PEFT's
merge equals sidetune's, and a run starts from a PEFT adapter."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import sidetune
from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.export import export_merged
from sidetune.peft_io import export_peft
from sidetune.train import train
from tests.conftest import run_cli

CHAT = ["data.task=chat", "data.train=chat/train.jsonl", "data.eval=null", "data.max_train_samples=16",
        "data.max_length=48"]


def _train(out, *overrides):
    cfg = load_config(None, ["model.name=tiny-llama", "method.name=lora", "train.batch_size=4", "train.max_steps=3",
                             "train.lr=1e-2", "train.warmup_steps=0", "train.progress=false",
                             f"train.output_dir={out}", *overrides])
    train(cfg)
    return out


def _ids(tok):
    enc = tok(["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n", "Hello"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lm"), *CHAT, "method.targets=[q_proj,v_proj,down_proj]", "method.r=4")


def test_peft_loads_the_causal_lm_adapter_with_sidetunes_logits(lm_run, tmp_path):
    out = tmp_path / "adapter"
    cli = run_cli("export", lm_run, "--peft", out)
    assert cli.returncode == 0 and "note:" not in cli.stdout  # plain LoRA: a LoRA server serves all of it
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # A preset is random weights: the exact base is saved with the adapter and named there.
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys) and len(keys) == 4 * 3 * 2
    assert any(t.abs().max() > 0 for k, t in keys.items() if "lora_B" in k)  # trained, not the zero init

    ours, tok = sidetune.load(lm_run)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    ids, mask = _ids(tok)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
        assert_close(theirs(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
        # PEFT's merge equals sidetune's --merge.
        merged_peft = theirs.merge_and_unload()
        merged_ours = AutoModelForCausalLM.from_pretrained(export_merged(lm_run, tmp_path / "merged", "float32"))
        for name, tensor in merged_ours.state_dict().items():
            assert_close(merged_peft.state_dict()[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
        assert_close(merged_peft(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_a_classification_head_goes_in_modules_to_save(sst2_small, tmp_path, capsys, dora):
    """The trained head PEFT calls modules_to_save (and DoRA's magnitudes): written where PEFT reads them, PEFT
    reproduces the run's logits with them, and the export names them in one line as what vLLM will not serve."""
    run = _train(tmp_path / "run", f"data.train={sst2_small['train']}", "data.eval=null",
                 "data.max_train_samples=16", "data.max_length=32", "data.task=classification",
                 "data.label_names=[negative,positive]", f"method.dora={str(dora).lower()}",
                 "method.targets=[q_proj,v_proj]")
    capsys.readouterr()
    out = export_peft(run, tmp_path / "adapter")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sidetune: note:")]
    assert len(notes) == 1 and "vLLM serves only the LoRA target modules" in notes[0], notes
    assert "modules_to_save score (the new task head)" in notes[0]
    assert ("DoRA magnitudes" in notes[0] and "on 8 layers" in notes[0]) == dora
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert config.get("use_dora", False) == dora
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys  # PEFT's key for a modules_to_save weight
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == (8 if dora else 0)
    assert json.loads((out / "label_names.json").read_text()) == ["negative", "positive"]
    ours, tok = sidetune.load(run)
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"])
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    enc = tok(["a fine film", "dull and long , with bad acting"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ours(**enc).logits
        assert (expected[0] != expected[1]).any()
        assert_close(theirs(**enc).logits, expected, rtol=1e-5, atol=1e-5)
        # What a LoRA-only server computes (the base's own, untrained head; no magnitudes) is another model.
        plain = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"]).eval()
        assert (plain(**enc).logits - expected).abs().max() > 1e-3


def test_init_from_starts_a_lora_run_from_a_peft_adapter(lm_run, tmp_path):
    from sidetune.methods import trainable_parameters
    from sidetune.session import build

    out = export_peft(lm_run, tmp_path / "adapter")
    adapter = {k.removeprefix("base_model.model."): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    same = ["model.name=tiny-llama", "method.name=lora", *CHAT, "method.targets=[q_proj,v_proj,down_proj]",
            "method.r=4"]
    s = build(load_config(None, [*same, f"method.init_from={out}"]), "cpu", with_data=False)
    params = trainable_parameters(s.model)
    assert set(params) == set(adapter)
    for name, tensor in adapter.items():
        assert torch.equal(params[name].detach(), tensor), name
    # And the model computes what the finished run computed.
    ours, tok = sidetune.load(lm_run)
    ids, mask = _ids(tok)
    with torch.no_grad():
        assert_close(s.model.eval()(input_ids=ids, attention_mask=mask).logits,
                     ours(input_ids=ids, attention_mask=mask).logits)
    for override, match in (("method.r=8", r"has r=4 but this run has method\.r=8"), ("method.targets=[q_proj,v_proj]", "targets"),
                            ("method.alpha=4", "lora_alpha=16")):
        cfg = load_config(None, [*same, override, f"method.init_from={out}"])
        with pytest.raises(SidetuneError, match=match):
            build(cfg, "cpu", with_data=False)
    with pytest.raises(SidetuneError, match="not a PEFT adapter directory"):
        build(load_config(None, [*same, f"method.init_from={tmp_path}"]), "cpu", with_data=False)


def test_a_method_without_a_peft_format_refuses_in_one_line(tmp_path):
    run = _train(tmp_path / "run", *CHAT, "method.name=lst", "train.max_steps=1")
    result = run_cli("export", run, "--peft", tmp_path / "adapter")
    assert result.returncode == 2 and "has no PEFT format" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_lora_adapter_loads_in_peft_with_equal_logits(tmp_path, all_cores):
    from sidetune.models import resolve_path

    run = _train(tmp_path / "run", "model.name=smollm2-135m", *CHAT, "data.max_train_samples=2",
                 "data.max_length=32", "train.batch_size=2", "train.max_steps=1", "train.lr=1e-3")
    out = export_peft(run, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(resolve_path("smollm2-135m").resolve())
    ours, tok = sidetune.load(run)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], dtype=torch.float32), out).eval()
    ids, mask = _ids(tok)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
        assert_close(theirs(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-4)
        merged = AutoModelForCausalLM.from_pretrained(export_merged(run, tmp_path / "merged", "float32"))
        assert_close(theirs.merge_and_unload()(input_ids=ids, attention_mask=mask).logits,
                     merged(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
