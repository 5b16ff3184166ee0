"""One tiny run per method family through the whole life a user gives it: train with a checkpoint, resume from that
checkpoint, load the finished run, generate (cached decoding equals greedy decoding by full forwards), export (a merge
gives the run's logits; a method that cannot merge refuses in one line). Besides the main suite, `.ci/floors` runs
this file at the lowest dependency versions pyproject.toml allows."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import sidetune
from sidetune.cli import main
from sidetune.config import load_config
from sidetune.decoding import complete
from sidetune.methods import METHODS
from sidetune.methods.base import Method
from sidetune.rundir import open_run
from sidetune.train import train

SST2 = ["data.train=sst2/train.tsv", "data.eval=sst2/dev.tsv", "data.text_field=sentence", "data.max_train_samples=16",
        "data.max_eval_samples=4", "data.max_length=32"]
LM = ["model.name=tiny-llama", "data.task=causal_lm", *SST2]
CLASSIFY = ["model.name=tiny-llama", "data.task=classification", *SST2]
STEPS = ["train.batch_size=4", "train.max_steps=4", "train.save_every=2", "train.lr=1e-2", "train.warmup_steps=0",
         "train.eval_every=0", "train.log_every=1", "train.progress=false"]

# One row per family: (overrides, generates). QLoRA is LoRA on a 4-bit base: the bitsandbytes path.
FAMILIES = {
    "full": (["method.name=full", *LM], True),
    "lora": (["method.name=lora", *LM], True),
    "qlora": (["method.name=lora", "model.quantize=nf4", *LM], True),
    "adapter": (["method.name=adapter", *LM], True),
    "ia3": (["method.name=ia3", *LM], True),
    "bitfit": (["method.name=bitfit", *LM, "model.name=tiny-gpt2"], True),  # GPT-2 has biases: it can merge
    "prompt_tuning": (["method.name=prompt_tuning", *LM], True),
    "prefix_tuning": (["method.name=prefix_tuning", *LM], True),
    "ptuning_v2": (["method.name=ptuning_v2", *LM], True),
    "lst": (["method.name=lst", *LM], True),
    "pet": (["method.name=pet", "method.verbalizer=[terrible,great]", *CLASSIFY], False),
}


def _greedy_by_full_forwards(model, ids: list[int], n: int) -> list[int]:
    """The reference decoding: argmax of the whole sequence's logits, one token at a time, no cache."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(ids):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_resume_generate_export(family, tmp_path, capsys):
    overrides, generates = FAMILIES[family]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(load_config(None, [*overrides, *STEPS, f"train.output_dir={whole}"]))
    checkpoint = whole / "checkpoints" / "step-0000002"
    assert (checkpoint / "trainable.safetensors").is_file()
    train(load_config(None, [*overrides, *STEPS, f"train.output_dir={resumed}", f"train.resume={checkpoint}"]))

    # Resuming at step 2 reproduces the unbroken run: same losses for steps 3-4, same trained weights.
    a, b = load_file(whole / "final" / "trainable.safetensors"), load_file(resumed / "final" / "trainable.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert_close(b[key], a[key], rtol=0, atol=1e-6)
    losses = {r["step"]: r["loss"] for r in read_metrics(whole) if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert set(again) == {3, 4} and all(abs(again[s] - losses[s]) < 1e-5 for s in again), (again, losses)
    assert losses[1] != losses[4]  # it trained

    model, tokenizer = sidetune.load(resumed)
    ids = tokenizer("The movie was", add_special_tokens=False)["input_ids"]
    if generates:
        # What `sidetune generate` / `chat` / data.eval_generate decode: the method's own loop (with its caches) or
        # transformers' generate, against full forwards. Four tokens, no eos stop: the tiny model's eos is unlikely.
        expected = _greedy_by_full_forwards(model, ids, 4)
        text = complete(model, tokenizer, ids, "cpu", max_new_tokens=4, greedy=True)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)

    out = tmp_path / "merged"
    if METHODS[_method_name(resumed)].merge is Method.merge:  # cannot merge: one line, nothing written
        capsys.readouterr()
        assert main(["export", str(resumed), "--merge", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sidetune: error: method "), err
        assert not out.exists()
        return
    assert main(["export", str(resumed), "--merge", str(out)]) == 0
    auto = AutoModelForCausalLM if generates else AutoModelForSequenceClassification
    merged = auto.from_pretrained(out).eval()
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert_close(merged(input_ids=batch).logits, model(input_ids=batch).logits, rtol=1e-4, atol=1e-4)


def _method_name(run) -> str:
    return open_run(run).cfg.method.name


def test_tensorboard_tracker_logs_the_run(tmp_path):
    # The `tensorboard` extra; the main CI environment does not install it, .ci/floors does (at its floor).
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(load_config(None, ["method.name=lora", *LM, *STEPS, "train.tracker=tensorboard", f"train.output_dir={out}"]))
    logs = [EventAccumulator(str(d)).Reload() for d in {p.parent for p in out.rglob("events.out.tfevents.*")}]
    (scalars,) = [log.Scalars("loss") for log in logs if "loss" in log.Tags()["scalars"]]
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert [e.value for e in scalars] == pytest.approx([losses[s] for s in (1, 2, 3, 4)], rel=1e-6)
