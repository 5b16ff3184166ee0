"""`sidetune generate`, `sidetune chat` and `sidetune plot` on finished runs: the CLI's text is the model's own greedy
decoding of the prompt the chat template renders, the chat loop keeps the conversation, LoRA and LST alike."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch

import sidetune
from sidetune import chat
from sidetune.cli import main
from sidetune.config import load_config
from sidetune.train import train

CHAT = ["model.name=tiny-llama", "data.task=chat", "data.train=chat/train.jsonl", "data.eval=chat/eval.jsonl",
        "data.max_train_samples=16", "data.max_eval_samples=8", "data.max_length=48", "train.batch_size=4",
        "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=0", "train.progress=false", "train.eval_every=1",
        "train.log_every=1"]


def _run(path, *overrides):
    train(load_config(None, [*CHAT, f"train.output_dir={path}", *overrides]))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lora"), "method.name=lora", "method.targets=all-linear")


@pytest.fixture(scope="module")
def lst_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lst"), "method.name=lst")


def _reference(run, messages, n=6):
    """Greedy decoding by hand: argmax of the loaded model's logits, one token at a time, no cache."""
    model, tok = sidetune.load(run)
    ids = torch.tensor([chat.prompt_ids(tok, messages)])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            token = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if token.item() == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["lora", "lst"])
def test_generate_prints_the_greedy_continuation_of_the_chat_prompt(which, lora_run, lst_run, capsys, tmp_path):
    run = {"lora": lora_run, "lst": lst_run}[which]
    expected = _reference(run, [{"role": "user", "content": "What is 2 plus 3?"}])
    assert expected.strip()  # some text, not an immediate end of turn
    assert main(["generate", str(run), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "6", "--greedy"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # A prompt file: messages rows (multi-turn, with a system prompt) and plain prompts.
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Spell cat backwards."}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"prompt": "What is 2 plus 3?"}) + "\n")
    assert main(["generate", str(run), "--file", str(prompts), "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == [_reference(run, conversation), expected]


def test_chat_keeps_the_conversation_through_stdin(lora_run, lst_run, monkeypatch, capsys):
    for run in (lora_run, lst_run):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nWhat is 2 plus 3?\nAnd times 4?\n/exit\nnever read\n"))
        assert main(["chat", str(run), "--max-new-tokens", "5", "--system", "Be brief."]) == 0
        replies = capsys.readouterr().out.splitlines()
        assert len(replies) == 3
        system = {"role": "system", "content": "Be brief."}
        assert replies[0] == _reference(run, [system, {"role": "user", "content": "Hi"}], 5).strip()
        # After /reset the first exchange is gone; the third reply sees the second exchange.
        history = [system, {"role": "user", "content": "What is 2 plus 3?"}]
        assert replies[1] == _reference(run, history, 5).strip()
        history += [{"role": "assistant", "content": replies[1]}, {"role": "user", "content": "And times 4?"}]
        assert replies[2] == _reference(run, history, 5).strip()


def test_chat_cli_reads_stdin_in_a_subprocess(lora_run):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "-m", "sidetune", "chat", str(lora_run), "--max-new-tokens", "4"],
                            input="Hello\nWhat is 2 plus 3?\n", capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert replies[0] == _reference(lora_run, [{"role": "user", "content": "Hello"}], 4).strip()
    assert len(replies) == 2  # EOF ended the loop after the second message


def test_a_classification_run_keeps_its_label_names_evaluates_on_its_own_and_cannot_generate(sst2_small, tmp_path,
                                                                                              capsys):
    import shutil

    train_file = tmp_path / "train.tsv"
    shutil.copy(sst2_small["train"], train_file)
    run = tmp_path / "cls"
    train(load_config(None, ["model.name=tiny-llama", "method.name=lora", f"data.train={train_file}",
                             "data.eval=null", "data.max_train_samples=8", "data.max_length=16", "train.batch_size=4",
                             "data.label_names=[negative,positive]", "train.max_steps=1", "train.progress=false",
                             f"train.output_dir={run}"]))
    train_file.unlink()  # `sidetune eval --data X` needs X and the run, nothing else
    capsys.readouterr()
    assert main(["eval", str(run), "--data", sst2_small["dev"]]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["label_names"] == ["negative", "positive"] and 0 <= metrics["eval_accuracy"] <= 1
    model, _ = sidetune.load(run)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert "this run classifies" in capsys.readouterr().err


def test_plot_overlays_runs(lora_run, lst_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(lora_run), str(lst_run), "--out", str(out)]) == 0
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 500 and height > 300
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_plot_without_out_never_replaces_a_file_sidetune_did_not_write(lora_run, tmp_path, monkeypatch, capsys):
    # The run wrote its own curves.png at its end and lists it: a plain `sidetune plot RUN` replaces it.
    assert "curves.png" in json.loads((lora_run / "sidetune-run.json").read_text())["files"]
    assert main(["plot", str(lora_run)]) == 0
    assert (lora_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A directory with metrics but no manifest: its curves.png is someone else's, kept; one line asks for --out.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.jsonl").write_text((lora_run / "metrics.jsonl").read_text())
    (theirs / "curves.png").write_text("mine")
    capsys.readouterr()
    assert main(["plot", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sidetune did not write it" in err and "--out" in err
    assert (theirs / "curves.png").read_text() == "mine"
    (theirs / "curves.png").unlink()
    assert main(["plot", str(theirs)]) == 0 and (theirs / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # Several runs default to ./curves.png, which is never replaced; --out says where.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "curves.png").write_text("mine")
    assert main(["plot", str(lora_run), str(theirs)]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "curves.png").read_text() == "mine"
    assert main(["plot", str(lora_run), str(theirs), "--out", str(tmp_path / "both.png")]) == 0
