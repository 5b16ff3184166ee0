"""data.eval_generate (sidetune.decoding): the SQuAD-style metrics against hand-computed values, the prompt /
reference split of tokenized examples, a tiny run whose eval_exact_match / eval_token_f1 equal decoding the same
prompts with `sidetune generate`'s Generator, the same numbers from two `accelerate launch` processes, and the
refusals."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, read_metrics

from sidetune import chat
from sidetune.config import ModelConfig, load_config
from sidetune.data import ASSETS
from sidetune.decoding import exact_match, normalize_answer, split_example, token_f1
from sidetune.errors import SidetuneError
from sidetune.evaluate import evaluate_run
from sidetune.generate import Generator
from sidetune.models import load_tokenizer
from sidetune.tasks import TASKS
from sidetune.train import train

# A constant completion the tiny model learns in a few steps (it does not learn to stop: the text runs on to the
# token limit), and eval references that it matches in part, fully after normalisation, or not at all.
TRAIN_ROWS = [{"prompt": f"Describe item {w} {i}:", "completion": " good movie"}
              for i, w in enumerate(["red", "green", "blue", "small", "large", "old", "new", "fast"] * 2)]
EVAL_ROWS = [{"prompt": "Describe item red 0:", "completion": " good movie"},
             {"prompt": "Describe item blue 9:", "completion": " a good film"},
             {"prompt": "Describe item old 3:", "completion": " bad"},
             {"prompt": "Describe item new 4:", "completion": " The good movie!"},
             {"prompt": "Describe item fast 5:", "completion": " movie good night"}]
MAX_NEW = 4


def test_metrics_match_hand_computed_values():
    assert normalize_answer("  The Cat, sat!  on a mat. ") == "cat sat on mat"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cat sat", "cat") == 0.0
    # pred "cat sat on mat" (4 words), ref "cat on mat" (3): 3 shared, P = 3/4, R = 1, F1 = 2PR / (P + R) = 6/7.
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7, abs=1e-12)
    # Overlap is a multiset: "yes" x3 against "yes" shares one word, P = 1/3, R = 1, F1 = 1/2.
    assert token_f1("yes yes yes", "yes") == pytest.approx(0.5, abs=1e-12)
    # pred "good movie movie movie" against "movie good night": 2 shared, P = 2/4, R = 2/3, F1 = 4/7.
    assert token_f1("good movie movie movie", "movie good night") == pytest.approx(4 / 7, abs=1e-12)
    assert token_f1("red", "blue") == 0.0
    # Empty after normalisation (an article only): 1 when both are, 0 when one is (SQuAD v2).
    assert token_f1("", "The") == 1.0 and token_f1("a", "x") == 0.0


def test_an_example_splits_at_its_last_labelled_run():
    lm = TASKS["causal_lm"]
    ids = list(range(10, 19))
    labels = [-100, -100, 12, 13, -100, -100, 16, 17, 18]  # two assistant turns: the prompt ends before the last
    assert split_example(ids, labels, lm, "row") == (ids[:6], [16, 17, 18])
    with pytest.raises(SidetuneError, match="no prompt before its completion"):
        split_example(ids, ids, lm, "row")  # plain text: every token labelled
    assert split_example([1, 2, 3], [7, 8, -100], TASKS["seq2seq"], "row") == ([1, 2, 3], [7, 8])

    # Chat: the prompt is exactly what `sidetune generate` renders for the conversation before the last assistant
    # turn, and the reference decodes to that turn's text.
    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    rows = [json.loads(line) for line in (ASSETS / "chat" / "eval.jsonl").read_text().splitlines()[:16]]
    for row in rows:
        messages = chat.normalize(row["messages"], "row")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt, reference = split_example(*chat.encode(tok, messages, 4096), TASKS["chat"], "row")
        assert prompt == chat.prompt_ids(tok, messages[:last])
        assert tok.decode(reference, skip_special_tokens=True) == messages[last]["content"]


def _files(tmp_path):
    for name, rows in (("train", TRAIN_ROWS), ("eval", EVAL_ROWS)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}"]


def _overrides(tmp_path, method: str, lr: str) -> list[str]:
    extra = ["method.targets=all-linear"] if method == "lora" else []
    return ["model.name=tiny-llama", f"method.name={method}", *extra, "data.task=causal_lm",
            "data.format=prompt_completion", *_files(tmp_path), "data.max_length=32", "data.eval_generate=true",
            f"data.eval_generate_max_new_tokens={MAX_NEW}", "train.batch_size=8", "train.max_steps=20",
            f"train.lr={lr}", "train.warmup_steps=0", "train.progress=false", "train.eval_every=0",
            "train.log_every=5"]


def _by_hand(run) -> dict[str, float]:
    """The metrics from decoding each eval row's prompt with `sidetune generate`'s Generator (its own prompt
    rendering from the raw row, not the trainer's tokenized split)."""
    g = Generator(run, "cpu")
    texts = [g.complete(g.prompt_ids(r), max_new_tokens=MAX_NEW, greedy=True) for r in EVAL_ROWS]
    refs = [r["completion"] for r in EVAL_ROWS]
    return {"eval_exact_match": sum(map(exact_match, texts, refs)) / len(refs),
            "eval_token_f1": sum(map(token_f1, texts, refs)) / len(refs)}


@pytest.mark.parametrize(("method", "lr"), [("lora", "1e-2"), ("lst", "5e-2")])  # transformers' generate; LST's cache
def test_eval_generate_scores_what_generate_decodes(tmp_path, method, lr):
    out = tmp_path / "run"
    metrics = train(load_config(None, [*_overrides(tmp_path, method, lr), f"train.output_dir={out}"]))
    expected = _by_hand(out)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), (key, metrics, expected)
    # Not a trivial score: the model learnt part of the completion, and no example is matched exactly.
    assert 0 < metrics["eval_token_f1"] < 1 and metrics["eval_exact_match"] < metrics["eval_token_f1"]
    assert read_metrics(out)[-1] == {"step": 20, **metrics}  # logged beside eval_loss
    again = evaluate_run(out)  # `sidetune eval RUN`
    assert again["eval_token_f1"] == pytest.approx(metrics["eval_token_f1"], abs=1e-12)
    assert again["eval_exact_match"] == metrics["eval_exact_match"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_decode_their_shares_and_log_the_whole_set_once(tmp_path):
    """5 eval examples on 2 processes (3 + 2): the logged means are those of one process decoding all five."""
    import os

    out = tmp_path / "ddp"
    (tmp_path / "run.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(_free_port()),
           "-m", "sidetune", "train", str(tmp_path / "run.yaml"), *_overrides(tmp_path, "lora", "1e-2"),
           "train.batch_size=4", "train.eval_every=10", f"train.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in read_metrics(out) if "eval_token_f1" in r]
    assert [r["step"] for r in evals] == [10, 20]  # rank 0 alone writes metrics.jsonl: each eval once
    expected = _by_hand(out)
    for key, value in expected.items():
        assert evals[-1][key] == pytest.approx(value, abs=1e-12), (key, evals[-1], expected)
    assert 0 < evals[-1]["eval_token_f1"] < 1


def test_eval_generate_is_refused_where_nothing_generates(tmp_path):
    with pytest.raises(SidetuneError, match=r"data.eval_generate=true needs a task that generates text") as e:
        load_config(None, ["model.name=tiny-bert", "data.task=classification", "data.eval_generate=true"])
    assert "\n" not in str(e.value)
    with pytest.raises(SidetuneError, match="needs prompt -> completion examples"):
        load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "data.eval_generate=true"])
    with pytest.raises(SidetuneError, match="eval_generate_max_new_tokens must be >= 1"):
        load_config(None, ["data.eval_generate_max_new_tokens=0"])
    # Through the CLI: one line, exit 2, nothing written.
    from sidetune.cli import main

    out = tmp_path / "never"
    assert main(["train", str(ROOT / "recipes" / "sst2_lora.yaml"), "data.eval_generate=true",
                 f"train.output_dir={out}"]) == 2
    assert not out.exists()


def test_fsdp_launch_with_eval_generate_is_refused(monkeypatch):
    """FSDP's all-gathers need the same forward count on every process; decoding shares differ."""
    from sidetune.train import _check_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "data.format=prompt_completion",
                             "data.eval_generate=true"])
    with pytest.raises(SidetuneError, match=r"data.eval_generate=true with FSDP is not supported"):
        _check_launch(cfg)
    cfg.data.eval_generate = False
    _check_launch(cfg)  # the same launch without it passes

