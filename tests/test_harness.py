"""`sidetune eval RUN --lm-eval TASKS` (lm-evaluation-harness) against the same scores computed by hand through
sidetune.load: a local multiple-choice task (acc: the choice with the largest sum of completion log-probabilities)
and a local generate_until task (exact_match: greedy decoding cut at the stop string), both a YAML + a jsonl written
here, offline. Tiny random-init runs whose trainable parts are randomised, so the method changes the scores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from sidetune.cli import main
from sidetune.config import load_config
from sidetune.methods import trainable_parameters
from sidetune.rundir import load_run, save_trainable
from sidetune.session import build

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install 'sidetune[lm-eval]')")

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
MAX_GEN = 8


def _run(tmp_path: Path, method: str, task: str = "causal_lm", *extra: str) -> Path:
    """A finished tiny-llama run whose trainable set is randomised (a zero-init LoRA B or LST up-projection would
    score exactly as the frozen base)."""
    out = tmp_path / method
    cfg = load_config(None, [f"method.name={method}", "model.name=tiny-llama", f"data.task={task}",
                             f"train.output_dir={out}", *extra])
    model = build(cfg, torch.device("cpu"), with_data=False).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_trainable(model, cfg, out / "final")
    return out


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


@torch.no_grad()
def _logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), one unpadded forward (the context's tokens as the whole text splits)."""
    ctx, whole = _ids(tok, context), _ids(tok, context + continuation)
    logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = F.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
    return logp.gather(-1, torch.tensor(whole[len(ctx):])[:, None]).sum().item()


@torch.no_grad()
def _greedy(model, tok, prompt: str) -> str:
    """Greedy decoding by full forwards (no cache, no generate), MAX_GEN tokens or the eos; the raw new text."""
    ids = _ids(tok, prompt)
    new = []
    for _ in range(MAX_GEN):
        token = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
        new.append(token)
        if token == tok.eos_token_id:
            break
    return tok.decode(new, skip_special_tokens=False)


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text


def _tasks(tmp_path: Path, run: Path) -> tuple[Path, dict]:
    """The two task YAMLs + jsonl files in tmp_path/tasks, and the scores sidetune.load gives by hand. The
    generation task's stop string is a piece of the run's own greedy output (so the cut is exercised), and half of
    its answers are that output (so exact_match is neither 0 nor 1 by construction)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    model, tok = load_run(run)
    g = torch.Generator().manual_seed(1)

    def pick(n: int) -> list[str]:
        return [WORDS[i] for i in torch.randperm(len(WORDS), generator=g)[:n].tolist()]

    mc = [{"question": f"Which word goes with {a} and {b}?", "choices": pick(4), "label": n % 4}
          for n, (a, b) in enumerate(pick(2) for _ in range(10))]
    scores = [[_logprob(model, tok, d["question"], " " + c) for c in d["choices"]] for d in mc]
    acc = sum(max(range(4), key=s.__getitem__) == d["label"] for s, d in zip(scores, mc)) / len(mc)

    prompts = [f"Q: what follows {a} {n}?\nA:" for n, a in enumerate(pick(6))]
    raw = [_greedy(model, tok, p) for p in prompts]
    # A stop string from inside a generation (its second new token's text, when it has one), plus the harness's
    # usual blank line; the harness adds the eos text itself.
    stop = next((tok.decode(_ids(tok, r)[1:2]) for r in raw if len(_ids(tok, r)) > 2 and
                 tok.decode(_ids(tok, r)[1:2]).strip()), "\n\n")
    eos = tok.decode([tok.eos_token_id])
    outputs = [_cut(r, [stop, "\n\n", eos]) for r in raw]
    answers = [o if n % 2 == 0 else "no such answer" for n, o in enumerate(outputs)]
    em = sum(o == a for o, a in zip(outputs, answers)) / len(outputs)

    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"q": p, "answer": a}) + "\n"
                                              for p, a in zip(prompts, answers)))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps([stop, chr(10) * 2])}\n  max_gen_toks: {MAX_GEN}\n"
        "  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return folder, {"acc": acc, "scores": scores, "exact_match": em, "outputs": outputs, "stop": stop}


def _results(run: Path) -> list[Path]:
    return sorted((run / "lm_eval").glob("results_*.json"))


def _samples(run: Path, task: str) -> list[dict]:
    (path,) = (run / "lm_eval").glob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])


@pytest.mark.parametrize("method", ["lst", "lora"])
def test_harness_scores_equal_sidetune_load_by_hand(tmp_path, capsys, method):
    run = _run(tmp_path, method)
    folder, hand = _tasks(tmp_path, run)
    capsys.readouterr()
    # Batch 3: the 40 choice requests of different lengths share padded batches; HF_DATASETS_OFFLINE stays set.
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert main(["eval", str(run), "--lm-eval", "tiny_mc,tiny_gen", "--include-path", str(folder),
                 "--batch-size", "3", "--log-samples"]) == 0
    out = capsys.readouterr().out
    assert "|tiny_mc " in out and "|acc" in out and "exact_match" in out  # the harness's table
    (path,) = _results(run)
    results = json.loads(path.read_text())
    print(method, "acc", results["results"]["tiny_mc"]["acc,none"], "hand", hand["acc"],
          "exact_match", results["results"]["tiny_gen"]["exact_match,none"], "hand", hand["exact_match"],
          "stop", repr(hand["stop"]))
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(hand["acc"])
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(hand["exact_match"])
    assert 0 < hand["exact_match"] < 1
    assert results["sidetune"]["written_by"] == "sidetune" and results["sidetune"]["method"] == method
    # Per document: every choice's log-likelihood (float tolerance: padded batch against one unpadded row) and every
    # generated text exactly.
    for row, expected in zip(_samples(run, "tiny_mc"), hand["scores"]):
        got = [r[0][0] for r in row["resps"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-4)
    assert [r["resps"][0][0] for r in _samples(run, "tiny_gen")] == hand["outputs"]


def _same_through_the_hf_model(tmp_path: Path, method: str, export) -> None:
    """`sidetune eval --lm-eval` on a `method` run, then the harness's own `hf` model on `export(run, OUT)` (the
    exported directory): the same scores, per-choice log-likelihoods and generations, from two implementations of
    request construction, tokenization, padding and stop handling."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    run = _run(tmp_path, method)
    folder, hand = _tasks(tmp_path, run)
    assert main(["eval", str(run), "--lm-eval", "tiny_mc,tiny_gen", "--include-path", str(folder),
                 "--batch-size", "4", "--log-samples"]) == 0
    ours = json.loads(_results(run)[0].read_text())["results"]
    out = tmp_path / "exported"
    export(run, out)
    hf = HFLM(pretrained=str(out), device="cpu", batch_size=4, dtype="float32", trust_remote_code=True)
    theirs = simple_evaluate(model=hf, tasks=["tiny_mc", "tiny_gen"], log_samples=True,
                             task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none")):
        assert theirs["results"][task][metric] == pytest.approx(ours[task][metric]), task
    for row, expected in zip(sorted(theirs["samples"]["tiny_mc"], key=lambda r: r["doc_id"]), hand["scores"]):
        torch.testing.assert_close(torch.tensor([r[0][0] for r in row["resps"]]), torch.tensor(expected),
                                   rtol=1e-5, atol=1e-4)
    generated = [r["filtered_resps"][0] for r in sorted(theirs["samples"]["tiny_gen"], key=lambda r: r["doc_id"])]
    assert generated == [r["resps"][0][0] for r in _samples(run, "tiny_gen")] == hand["outputs"]


def test_merged_export_scores_the_same_through_the_harness_hf_model(tmp_path):
    """`sidetune export --merge` of a LoRA run, through the harness's `hf` model."""
    from sidetune.export import export_merged

    _same_through_the_hf_model(tmp_path, "lora", lambda run, out: export_merged(run, out, "float32"))


@pytest.mark.parametrize("method", ["lst", "ptuning_v2"])
def test_hf_export_scores_the_same_through_the_harness_hf_model(tmp_path, method):
    """`sidetune export --hf` of a run that cannot merge (LST: the side network; P-tuning v2: the prefix), loaded by
    the harness's own `hf` model with trust_remote_code."""
    _same_through_the_hf_model(tmp_path, method, lambda run, out: main(["export", str(run), "--hf", str(out)]))


@pytest.mark.parametrize("method", ["prefix_tuning", "ptuning_v2", "prompt_tuning", "ptuning_v1", "adapter", "ia3"])
def test_every_method_batched_equals_one_row_at_a_time(tmp_path, method):
    """SidetuneLM directly: batched, right-padded loglikelihoods and batched generate_until equal each request
    scored / decoded alone by hand (the prefix methods number positions from the row's start)."""
    from lm_eval.api.instance import Instance

    from sidetune.harness_lm import SidetuneLM

    run = _run(tmp_path, method)
    model, tok = load_run(run)
    lm = SidetuneLM(model, tok, device=torch.device("cpu"), batch_size=4, max_length=512)
    pairs = [(f"The {w} is", f" {v}") for w, v in zip(WORDS, reversed(WORDS))] + [("A much longer context about "
                                                                                  "the river and the stone", " moon")]
    reqs = [Instance("loglikelihood", {}, p, n) for n, p in enumerate(pairs)]
    got = [s for s, _ in lm.loglikelihood(reqs)]
    expected = [_logprob(model, tok, c, x) for c, x in pairs]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-4)
    # loglikelihood_rolling (perplexity tasks): one window here, every token after the prefix token (BOS / EOS).
    text = "The river and the stone and the moon"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.prefix_token_id, *_ids(tok, text)]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    assert rolling == pytest.approx(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-4)
    prompts = ["Q: what follows red?\nA:", "hello", "The river and the stone and the moon"]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": MAX_GEN}), n)
           for n, p in enumerate(prompts)]
    eos = tok.decode([tok.eos_token_id])
    assert lm.generate_until(gen) == [_cut(_greedy(model, tok, p), ["\n\n", eos]) for p in prompts]
    # The model's own generate stops at a stop string (transformers' stop_strings, or the plain loops' own check):
    # with the text of its second new token as the stop, it ends there, not MAX_GEN tokens later.
    ids = torch.tensor([_ids(tok, prompts[2])])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    full = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
    assert len(full) == MAX_GEN and tok.eos_token_id not in full
    stopped = model.generate(input_ids=ids, stop_strings=[tok.decode(full[1:2])], tokenizer=tok, **kwargs)
    assert stopped[0, ids.shape[1]:].tolist() in (full[:1], full[:2])


@pytest.mark.parametrize("method", ["lst", "lora"])
def test_seq2seq_runs_score_context_as_encoder_input(tmp_path, method):
    """An encoder-decoder run (T5): the context goes to the encoder, the continuation is the decoder's labels, as
    the harness's hf model scores seq2seq models; generation is the decoder's greedy sequence, cut at the stops."""
    from lm_eval.api.instance import Instance

    from sidetune.harness_lm import SidetuneLM

    run = _run(tmp_path, method, "seq2seq", "model.name=tiny-t5")
    model, tok = load_run(run)
    lm = SidetuneLM(model, tok, device=torch.device("cpu"), batch_size=4, max_length=512, seq2seq=True)
    pairs = [(f"The {w} is", f" {v} and {w}") for w, v in zip(WORDS[:6], reversed(WORDS))]
    got = [s for s, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, n) for n, p in enumerate(pairs)])]
    expected = []
    with torch.no_grad():
        for context, continuation in pairs:
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([_ids(tok, context)]), labels=torch.tensor([cont])).logits[0]
            logp = F.log_softmax(logits.float(), dim=-1)
            expected.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-4)

    def greedy(prompt: str) -> str:  # the decoder by full forwards from its start token
        enc, dec = torch.tensor([_ids(tok, prompt)]), [model.config.decoder_start_token_id]
        with torch.no_grad():
            for _ in range(MAX_GEN):
                dec.append(model(input_ids=enc, decoder_input_ids=torch.tensor([dec])).logits[0, -1].argmax().item())
                if dec[-1] == model.config.eos_token_id:  # BERT's [SEP]: tiny-t5 borrows its tokenizer
                    break
        return tok.decode(dec[1:], skip_special_tokens=False)

    prompts = ["translate: the red cat", "hello", "the river and the stone and the moon"]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": MAX_GEN}), n)
           for n, p in enumerate(prompts)]
    eos = tok.decode([model.config.eos_token_id])  # BERT's [SEP]: tiny-t5 reads text with BERT's tokenizer
    outputs = [_cut(greedy(p), ["\n\n", eos]) for p in prompts]
    assert lm.generate_until(gen) == outputs and any(outputs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_score_as_one(tmp_path):
    """accelerate launch, 2 CPU processes: each scores its share of the documents, the main process gathers, prints
    and writes one results file, with the one-process scores."""
    run = _run(tmp_path, "lst")
    folder, hand = _tasks(tmp_path, run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(_free_port()),
           "-m", "sidetune", "eval", str(run), "--lm-eval", "tiny_mc,tiny_gen", "--include-path", str(folder),
           "--batch-size", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("|tiny_mc ") == 1  # printed once, by the main process
    (path,) = _results(run)
    results = json.loads(path.read_text())
    assert results["sidetune"]["processes"] == 2
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(hand["acc"])
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(hand["exact_match"])
    assert results["n-samples"]["tiny_mc"]["effective"] == 10


def test_chat_run_renders_prompts_with_its_template(tmp_path):
    run = _run(tmp_path, "lora", "chat")
    folder, _ = _tasks(tmp_path, run)
    _, tok = load_run(run)
    assert main(["eval", str(run), "--lm-eval", str(folder / "tiny_mc.yaml"), "--limit", "2", "--log-samples"]) == 0
    context = _samples(run, "tiny_mc")[0]["arguments"][0][0]
    question = json.loads((folder / "mc.jsonl").read_text().splitlines()[0])["question"]
    assert context == tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                              add_generation_prompt=True)
    # --apply-chat-template no: the bare question.
    assert main(["eval", str(run), "--lm-eval", str(folder / "tiny_mc.yaml"), "--limit", "2", "--log-samples",
                 "--apply-chat-template", "no"]) == 0
    assert len(_results(run)) == 2  # a second eval writes a new file, the first one stays


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sidetune: error: "), err
    return err[0]


def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path, "lora")
    folder = tmp_path / "tasks"
    folder.mkdir()
    assert "no harness task named 'nope'" in _error(capsys, ["eval", str(run), "--lm-eval", "nope",
                                                             "--include-path", str(folder)])
    (folder / "broken.yaml").write_text("task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                                        f"{folder / 'missing.jsonl'}\ntest_split: test\noutput_type: "
                                        "multiple_choice\ndoc_to_text: x\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    assert "could not be loaded" in _error(capsys, ["eval", str(run), "--lm-eval", "broken",
                                                    "--include-path", str(folder)])
    (folder / "ok.jsonl").write_text('{"a": 1}\n')
    (folder / "sampled.yaml").write_text((folder / "broken.yaml").read_text().replace("missing", "ok").replace(
        "task: broken", "task: sampled").replace("multiple_choice", "generate_until").replace(
        "doc_to_choice: [a, b]\n", "generation_kwargs: {until: [x], do_sample: true, top_p: 0.9}\n"))
    assert "generation_kwargs ['top_p'] are not supported" in _error(
        capsys, ["eval", str(run), "--lm-eval", str(folder / "sampled.yaml")])
    (folder / "plain.yaml").write_text((folder / "sampled.yaml").read_text().replace("task: sampled", "task: plain")
                                       .replace(", do_sample: true, top_p: 0.9", ""))
    assert "generation_kwargs ['top_p'] are not supported" in _error(  # --gen-kwargs is checked the same way
        capsys, ["eval", str(run), "--lm-eval", str(folder / "plain.yaml"), "--gen-kwargs", "top_p=0.5"])
    assert "apply to --lm-eval only" in _error(capsys, ["eval", str(run), "--limit", "3"])
    assert "--limit must be > 0" in _error(capsys, ["eval", str(run), "--lm-eval", "x", "--limit", "0"])
    assert not (run / "lm_eval").exists()
    classifier = _run(tmp_path / "c", "lora", "classification", "data.num_labels=2")
    assert "is a classifier" in _error(capsys, ["eval", str(classifier), "--lm-eval", "x"])
    (run / "lm_eval").write_text("someone else's file")
    (folder / "ok.yaml").write_text((folder / "broken.yaml").read_text().replace("missing", "ok").replace(
        "task: broken", "task: ok"))
    assert "is not a directory" in _error(capsys, ["eval", str(run), "--lm-eval", str(folder / "ok.yaml")])
    assert (run / "lm_eval").read_text() == "someone else's file"
    # Without the extra: one line naming it.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert "pip install 'sidetune[lm-eval]'" in _error(capsys, ["eval", str(run), "--lm-eval", "x"])
