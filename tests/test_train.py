"""The training loop: it learns, it logs, it saves the trainable set only, and a resumed run equals an unbroken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import sidetune
from sidetune.config import load_config
from sidetune.evaluate import evaluate_run
from sidetune.methods import trainable_parameters
from sidetune.train import train


def _cfg(tmp_path, sst2_small, *extra):
    # LoRA's fields unless the test picks its own method (overrides apply in any order: r=4 would reach that one).
    lora = [] if any(e.startswith("method.name=") for e in extra) else ["method.name=lora", "method.r=4",
                                                                         "method.dropout=0.1"]
    return load_config(None, [
        "model.name=tiny-bert", *lora,
        f"data.train={sst2_small['train']}", f"data.eval={sst2_small['dev']}", "data.max_length=32",
        "train.batch_size=8", "train.eval_batch_size=32", "train.lr=1e-3", "train.log_every=1",
        "train.eval_every=3", "train.progress=false", f"train.output_dir={tmp_path}", *extra])


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_uninterrupted(tmp_path, sst2_small):
    full = tmp_path / "full"
    train(_cfg(full, sst2_small, "train.max_steps=6"))
    broken = tmp_path / "broken"
    train(_cfg(broken, sst2_small, "train.max_steps=6", "train.save_every=3"))
    ckpt = broken / "checkpoints" / "step-0000003"
    assert (ckpt / "trainable.safetensors").is_file()
    resumed = tmp_path / "resumed"
    train(_cfg(resumed, sst2_small, "train.max_steps=6", f"train.resume={ckpt}"))

    a = load_file(full / "final" / "trainable.safetensors")
    b = load_file(resumed / "final" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(b[key], a[key], rtol=0, atol=1e-6)
    losses_full = {r["step"]: r["loss"] for r in _rows(full) if "loss" in r}
    losses_resumed = {r["step"]: r["loss"] for r in _rows(resumed) if "loss" in r}
    assert set(losses_resumed) == {4, 5, 6}
    for step, loss in losses_resumed.items():
        assert abs(loss - losses_full[step]) < 1e-5, (step, loss, losses_full[step])


def test_metrics_checkpoint_and_reload(tmp_path, sst2_small):
    out = tmp_path / "run"
    metrics = train(_cfg(out, sst2_small, "train.max_steps=6", "train.save_every=6"))
    rows = _rows(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert all("eval_accuracy" in r and 0 <= r["eval_accuracy"] <= 1 for r in eval_rows)
    assert all(r["eval_examples"] == 128 for r in eval_rows)  # every dev row scored, counted once
    assert all(r["peak_rss_gib"] > 0 for r in train_rows)
    assert (out / "config.yaml").is_file()

    # Checkpoints and final weights hold exactly the trainable set: LoRA A/B and the new classifier head.
    model, tok = sidetune.load(out)
    saved = load_file(out / "final" / "trainable.safetensors")
    assert set(saved) == set(trainable_parameters(model))
    assert all(".lora_" in k or k.startswith("classifier.") for k in saved)
    assert set(load_file(out / "checkpoints" / "step-0000006" / "trainable.safetensors")) == set(saved)

    # The reloaded model reproduces the run's final eval metrics.
    again = evaluate_run(out)
    assert abs(again["eval_accuracy"] - metrics["eval_accuracy"]) < 1e-9
    assert abs(again["eval_loss"] - metrics["eval_loss"]) < 1e-5
    enc = tok(["a great film", "a dull mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 2)


def test_loss_goes_down_with_accumulation(tmp_path, sst2_small):
    out = tmp_path / "acc"
    train(_cfg(out, sst2_small, "train.max_steps=12", "train.grad_accum=2", "method.name=full", "train.lr=1e-3",
               "data.max_train_samples=16",
               "train.eval_every=0", "train.scheduler=cosine", "train.warmup_steps=2"))
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_causal_lm_label_accuracy_picks_the_likelier_completion(tmp_path, sst2_small):
    """A causal LM with label names is scored by picking, per dev row, the label completion (+ EOS) with the higher
    log-likelihood after its prompt: the trainer's eval_accuracy equals that computed here by hand."""
    out = tmp_path / "lm"
    metrics = train(load_config(None, [
        "model.name=tiny-llama", "method.name=lora", "data.task=causal_lm", f"data.train={sst2_small['train']}",
        f"data.eval={sst2_small['dev']}", "data.text_field=sentence", "data.max_eval_samples=24",
        "data.prompt_template=Review: {sentence}\nSentiment:", "data.completion_template= {label_name}",
        "data.label_names=[negative,positive]", "data.max_length=128", "train.batch_size=4", "train.max_steps=1",
        "train.lr=1e-2", "train.progress=false", f"train.output_dir={out}"]))
    model, tok = sidetune.load(out)
    rows = [line.split("\t") for line in Path(sst2_small["dev"]).read_text().splitlines()[1:25]]
    correct = 0
    with torch.no_grad():
        for sentence, gold in rows:
            prompt = tok(f"Review: {sentence}\nSentiment:")["input_ids"]
            scores = []
            for name in ("negative", "positive"):
                completion = tok(f" {name}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids = torch.tensor([prompt + completion])
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                targets = ids[0, len(prompt):]
                scores.append(logp[len(prompt) - 1:].gather(1, targets[:, None]).sum().item())
            correct += int(max(range(2), key=scores.__getitem__) == int(gold))
    assert metrics["eval_examples"] == 24
    assert metrics["eval_accuracy"] == correct / 24, (metrics["eval_accuracy"], correct)


def test_evaluating_does_not_change_what_trains(tmp_path, sst2_small):
    """An eval pass draws nothing from the training RNG: with dropout on, a run that evaluates every 2 steps logs the
    same losses and saves the same weights as one that never evaluates."""
    runs = {}
    for every in (0, 2):
        out = tmp_path / f"every{every}"
        train(_cfg(out, sst2_small, "train.max_steps=6", f"train.eval_every={every}"))
        runs[every] = ([r["loss"] for r in _rows(out) if "loss" in r], load_file(out / "final" / "trainable.safetensors"))
    assert runs[0][0] == runs[2][0]
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[2][1][key]), key


def test_build_never_changes_the_config_it_is_given(sst2_small, tmp_path):
    """What a build resolves (the label names and count read from the data, a chat template file's text) comes back
    in Setup.cfg, which the trainer records in the run; the caller's config stays as it was."""
    from sidetune.session import build

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    cfg = load_config(None, ["model.name=tiny-bert", "method.name=lora", f"data.train={sst2_small['train']}",
                             "data.eval=null", "data.max_train_samples=8", "data.max_length=16",
                             f"data.chat_template={template}"])
    before = cfg.to_dict()
    s = build(cfg, "cpu")
    assert cfg.to_dict() == before
    assert before["data"]["num_labels"] is None and s.cfg.data.num_labels == 2
    assert s.cfg.data.label_names is not None and s.cfg.data.chat_template == template.read_text()


@pytest.mark.parametrize("method", [["method.name=lora", "method.init=lora_ga", "method.calibration_batches=1"],
                                    ["method.name=lst", "method.init=pruned_fisher", "method.fisher_batches=1"]],
                         ids=["lora_ga", "lst_pruned_fisher"])
def test_every_init_that_reads_data_reloads_without_it(method, sst2_small, tmp_path):
    """The inits that read training batches (Method.calibration_batches > 0) reload from the run alone: the saved
    trainable set and changed base give the trained model's logits exactly, with the training file gone."""
    import shutil

    from sidetune.rundir import save_trainable
    from sidetune.session import build

    data = tmp_path / "train.tsv"
    shutil.copy(sst2_small["train"], data)
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", f"data.train={data}", "data.eval=null",
                             "data.max_length=16", "data.max_train_samples=8", "train.batch_size=4", *method])
    s = build(cfg, "cpu")
    trained = s.model.eval()
    with torch.no_grad():
        for p in trainable_parameters(trained).values():  # stand-in for training
            p.add_(0.01 * torch.randn_like(p))
    save_trainable(trained, s.cfg, tmp_path / "run" / "final")
    data.unlink()
    reloaded, _ = sidetune.load(tmp_path / "run")
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
