"""data.task=chat (sidetune.chat) and the named instruction formats (sidetune.formats): which tokens carry the loss,
role styles, templates, truncation, and a short training run whose loss falls."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from sidetune import chat, data
from sidetune.config import DataConfig, ModelConfig, load_config
from sidetune.errors import SidetuneError
from sidetune.models import load_tokenizer
from tests.conftest import read_metrics

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20, which is 5 times 4."},
]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CONVERSATION]
# ChatML with {% generation %} markers and no default system prompt.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="tiny-llama"))  # SmolLM2's tokenizer and its ChatML template


def _runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled tokens."""
    runs, current = [], []
    for t in [*labels, -100]:
        if t != -100:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs


def test_only_assistant_turns_carry_loss_in_a_multi_turn_conversation_with_a_system_prompt(tok):
    ids, labels = chat.encode(tok, CONVERSATION, 512)
    assert len(ids) == len(labels)
    # Labels are the inputs where they are kept (the loss shifts them), -100 elsewhere.
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))
    # One run per assistant turn: its content and the end-of-turn marker, nothing of the system or user turns.
    assert [tok.decode(r) for r in _runs(labels)] == ["5.<|im_end|>", "20, which is 5 times 4.<|im_end|>"]
    unlabelled = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    for m in CONVERSATION:
        assert (m["content"] in unlabelled) == (m["role"] != "assistant")
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)


def test_sharegpt_keys_and_a_json_string_give_the_same_labels(tok):
    expected = chat.encode(tok, CONVERSATION, 512)
    assert chat.encode(tok, chat.normalize(SHAREGPT, "row"), 512) == expected
    assert chat.encode(tok, chat.normalize(json.dumps(CONVERSATION), "row"), 512) == expected


def test_generation_blocks_and_prefix_rendering_agree(tok):
    """Two independent ways of finding the assistant tokens: the template's own {% generation %} mask and
    sidetune's incremental rendering (the same template without the markers)."""
    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    tok.chat_template = GENERATION_TEMPLATE
    assert chat.has_generation_blocks(tok.chat_template)
    by_mask = chat.encode(tok, CONVERSATION, 512)
    tok.chat_template = GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    by_prefix = chat.encode(tok, CONVERSATION, 512)
    assert by_mask == by_prefix
    assert len(_runs(by_mask[1])) == 2


def test_truncation_keeps_the_start_and_drops_conversations_left_without_an_assistant_token(tmp_path, tok, capsys):
    ids, labels = chat.encode(tok, CONVERSATION, 512)
    first_label = next(i for i, t in enumerate(labels) if t != -100)
    short_ids, short_labels = chat.encode(tok, CONVERSATION, first_label + 1)
    assert short_ids == ids[: first_label + 1] and short_labels == labels[: first_label + 1]
    path = tmp_path / "train.jsonl"
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (CONVERSATION, long_prompt)) + "\n")
    cfg = DataConfig(task="chat", train=str(path), eval=None, max_length=64)
    built = data.build(cfg, tok)
    assert len(built.train) == 1 and max(len(r) for r in built.train["input_ids"]) <= 64
    assert "dropped 1 of 2 conversations" in capsys.readouterr().out


def test_no_chat_template_is_one_line_and_data_chat_template_overrides(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"dialog": CONVERSATION}) + "\n")
    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    tok.chat_template = None
    with pytest.raises(SidetuneError, match=r"needs a chat template.*set data\.chat_template"):
        data.build(DataConfig(task="chat", train=str(path), eval=None, messages_field="dialog"), tok)
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(GENERATION_TEMPLATE)
    cfg = DataConfig(task="chat", train=str(path), eval=None, messages_field="dialog", chat_template=str(template_file))
    built = data.build(cfg, tok)
    assert cfg.chat_template == GENERATION_TEMPLATE  # resolved into the config the run saves
    assert tok.decode(built.train[0]["input_ids"]).startswith("<|im_start|>system\nYou answer briefly.")
    with pytest.raises(SidetuneError, match=r"data\.messages_field"):
        data.build(DataConfig(task="chat", train=str(path), eval=None), tok)
    with pytest.raises(SidetuneError, match="neither a file nor a Jinja template"):
        chat.resolve_template("no/such/file.jinja")


def test_bad_messages_are_one_line():
    with pytest.raises(SidetuneError, match="role 'narrator' is unknown"):
        chat.normalize([{"role": "narrator", "content": "x"}], "row 0")
    with pytest.raises(SidetuneError, match="non-empty list"):
        chat.normalize([], "row 0")


def test_chunked_loss_equals_the_one_shot_loss_on_chat_labels(tok):
    from sidetune.losses import ChunkedLMLoss
    from tests.conftest import tiny

    model = tiny("tiny-llama", "causal_lm").eval()
    rows = [chat.encode(tok, CONVERSATION, 512), chat.encode(tok, CONVERSATION[:3], 512)]
    collate = data.collator("chat", tok)
    batch = collate([{"input_ids": i, "attention_mask": [1] * len(i), "labels": lab} for i, lab in rows])
    with torch.no_grad():
        assert_close(ChunkedLMLoss(model, 7)(**batch).loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_alpaca_format_leaves_out_an_empty_input_and_learns_the_output_only(tmp_path, tok):
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    built = data.build(DataConfig(task="causal_lm", train=str(path), eval=None, format="alpaca"), tok)
    texts = [tok.decode(r["input_ids"]) for r in built.train]
    assert "### Input:" not in texts[0] and "### Input:\nabc\n\n### Response:\ncba" in texts[1]
    learnt = [tok.decode([t for t in r["labels"] if t != -100]) for r in built.train]
    assert learnt == ["5" + tok.eos_token, "cba" + tok.eos_token]
    # prompt/completion pairs as a named format
    path.write_text(json.dumps({"prompt": "Q: 1+1?\nA:", "completion": " 2"}) + "\n")
    built = data.build(DataConfig(task="causal_lm", train=str(path), eval=None, format="prompt_completion"), tok)
    assert tok.decode([t for t in built.train[0]["labels"] if t != -100]) == " 2" + tok.eos_token


def test_a_tiny_llama_chat_run_learns(tmp_path):
    from sidetune.train import train

    cfg = load_config(None, [
        "model.name=tiny-llama", "data.task=chat", "data.train=chat/train.jsonl", "data.eval=chat/eval.jsonl",
        "data.max_train_samples=64", "data.max_eval_samples=16", "data.max_length=96", "method.name=full",
        "train.lr=5e-3", "train.batch_size=8", "train.max_steps=20",
        "train.eval_every=10", "train.log_every=5", "train.warmup_steps=0", "train.loss_chunk_size=64",
        "train.progress=false", f"train.output_dir={tmp_path}"])
    train(cfg)
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert evals[-1] < evals[0], evals


def test_a_run_reloads_with_the_chat_template_it_trained_with(tmp_path):
    """data.chat_template is applied by session.build, so sidetune.load (and export, generate, chat, which build the
    same way) render with the run's template, not the tokenizer's own, even once the template file is gone."""
    import sidetune
    from sidetune.generate import Generator
    from sidetune.train import train

    tagged = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' [end]\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    template_file = tmp_path / "tagged.jinja"
    template_file.write_text(tagged)
    run = tmp_path / "run"
    train(load_config(None, ["model.name=tiny-llama", "method.name=lora", "data.task=chat",
                             "data.train=chat/train.jsonl", "data.eval=null", "data.max_train_samples=4",
                             "data.max_length=48", f"data.chat_template={template_file}", "train.batch_size=4",
                             "train.max_steps=1", "train.progress=false", f"train.output_dir={run}"]))
    template_file.unlink()
    _, tok = sidetune.load(run)
    assert tok.chat_template == tagged
    question = [{"role": "user", "content": "What is 2 plus 3?"}]
    expected = "[user] What is 2 plus 3? [end]\n[assistant] "
    assert tok.decode(chat.prompt_ids(tok, question)) == expected
    assert tok.decode(Generator(run, "cpu").prompt_ids({"prompt": "What is 2 plus 3?"})) == expected
