"""Preference tuning (data.task=preference, train.objective dpo / simpo; sidetune.pairs, sidetune.preference):
the losses against TRL's own code on the same log-probabilities, the pair data (labels, truncation, bad rows),
each method's reference (LST's from the same forward equals the frozen model exactly, before and after steps),
loss going down, metrics, kill -9 and resume, two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, read_metrics, run_cli, tiny
from safetensors.torch import load_file
from torch.testing import assert_close

from sidetune import pairs
from sidetune.config import DataConfig, ModelConfig, load_config
from sidetune.errors import SidetuneError
from sidetune.models import load_model, load_tokenizer
from sidetune.preference import dpo_loss, hidden_logps, sequence_logps, simpo_loss
from sidetune.rundir import init_from
from sidetune.session import build, train_step

PROMPT = [{"role": "user", "content": "Write a positive movie review."}]
GOOD = ["a wonderful film", "great acting and a moving story", "I loved every minute", "charming and funny"]
BAD = ["a boring mess", "terrible acting", "I hated it", "dull and far too long"]


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": f"{GOOD[i % 4]} {i}"}],
             "rejected": [{"role": "assistant", "content": f"{BAD[i % 4]} {i}"}]} for i in range(start, start + n)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pairs")
    return {"train": _jsonl(root / "train.jsonl", _rows(16)), "eval": _jsonl(root / "eval.jsonl", _rows(8, 16))}


def _cfg(files: dict[str, str], method: str, out: Path | str = "unused", *extra: str):
    return load_config(None, [f"method.name={method}", "model.name=tiny-llama", "data.task=preference",
                              f"data.train={files['train']}", f"data.eval={files['eval']}", "data.max_length=48",
                              "train.objective=dpo", "train.batch_size=4", "train.eval_batch_size=8",
                              "train.lr=1e-3", "train.warmup_steps=0", "train.progress=false", "train.log_every=1",
                              f"train.output_dir={out}", *extra])


# ---------------------------------------------------------------------------------------------------------------------
# The losses against TRL


def _logps(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 5) for _ in range(4)]


def test_dpo_loss_equals_trls_dpo_trainer_sigmoid_loss():
    """TRL's DPOTrainer._compute_loss (its own code: a stand-in model returns per-token log-probs whose sums are
    the given ones, the reference log-probs come precomputed) against sidetune's dpo_loss."""
    trl = pytest.importorskip("trl.trainer.dpo_trainer")
    pc, pr, rc, rr = _logps()
    n, t = pc.numel(), 5
    per_token = torch.zeros(2 * n, t - 1, dtype=torch.float64)
    per_token[:, 0] = torch.cat([pc, pr]) / 2
    per_token[:, 2] = torch.cat([pc, pr]) / 2
    completion = torch.ones(2 * n, t, dtype=torch.long)

    def model(**kw):
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())

    for beta in (0.1, 0.5):
        fake = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
                device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
            aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
            loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
            _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": torch.ones(2 * n, t, dtype=torch.long), "attention_mask": completion,
                  "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
        theirs = trl.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
        assert_close(losses.mean(), theirs, rtol=1e-12, atol=1e-12)
        m = fake._metrics["train"]
        assert_close(chosen.mean().item(), m["rewards/chosen"][0])
        assert_close(rejected.mean().item(), m["rewards/rejected"][0])
        assert_close((chosen > rejected).double().mean().item(), m["rewards/accuracies"][0])
        assert_close((chosen - rejected).mean().item(), m["rewards/margins"][0])


def _cpo(loss_type: str, beta: float, eps: float, gamma: float = 0.0):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    fake = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                           accelerator=SimpleNamespace(device="cpu"))
    return lambda c, r: cpo.CPOTrainer.cpo_loss(fake, c, r)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_dpo_label_smoothing_equals_trls_conservative_sigmoid_loss(eps):
    """Conservative DPO: TRL's sigmoid loss with label_smoothing (CPOTrainer.cpo_loss, which is DPO's with the
    reference log-probs at 0) on the log-ratios pi - ref is DPO's smoothed loss."""
    pc, pr, rc, rr = _logps(1)
    theirs, _, _ = _cpo("sigmoid", 0.2, eps)(pc - rc, pr - rr)
    ours, _, _ = dpo_loss(pc, pr, rc, rr, 0.2, eps)
    assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_loss_equals_trls_cpo_trainer_simpo(eps):
    """SimPO: TRL's CPOTrainer loss_type=simpo (cpo_alpha=0) on the length-normalised log-probs."""
    pc, pr, _, _ = _logps(2)
    lengths_c, lengths_r = torch.tensor([3., 7, 9, 4, 12, 5]), torch.tensor([8., 2, 6, 10, 3, 5])
    ac, ar = pc / lengths_c, pr / lengths_r
    theirs, tc, tr = _cpo("simpo", 2.0, eps, gamma=0.7)(ac, ar)
    ours, oc, orr = simpo_loss(ac, ar, 2.0, 0.7, eps)
    assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert_close((oc, orr), (tc, tr))


def test_sequence_logps_chunked_from_hidden_states_equal_the_logits_path():
    model = tiny("tiny-llama", "causal_lm")
    ids = torch.randint(3, 500, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, -2:] = -100
    hidden = model.model(input_ids=ids).last_hidden_state
    want, n = sequence_logps(model.lm_head(hidden), labels)
    manual = torch.log_softmax(model.lm_head(hidden).float(), -1)[0, 3:9].gather(1, ids[0, 4:10, None]).sum()
    assert_close(want[0], manual)
    got, n2 = hidden_logps(hidden, model.lm_head, labels, chunk_size=3)
    assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert n.tolist() == n2.tolist() == [6, 4, 6, 6]


# ---------------------------------------------------------------------------------------------------------------------
# The pairs


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="tiny-llama"))


def test_pairs_label_only_the_answers_in_text_conversational_and_implicit_rows(tok, tmp_path):
    cfg = DataConfig(task="preference", max_length=128)
    text = {"prompt": "Write a review.", "chosen": " Great film.", "rejected": " Awful film."}
    conv = _rows(1)[0]
    implicit = {"chosen": PROMPT + conv["chosen"], "rejected": PROMPT + conv["rejected"]}
    for row, answers in ((text, (" Great film.", " Awful film.")), (conv, ("a wonderful film 0", "a boring mess 0")),
                         (implicit, ("a wonderful film 0", "a boring mess 0"))):
        import datasets

        enc = pairs.tokenize(cfg, tok, datasets.Dataset.from_list([row]), "data.train")[0]
        for side, answer in zip(("chosen", "rejected"), answers):
            ids, labels = enc[f"{side}_input_ids"], enc[f"{side}_labels"]
            learnt = tok.decode([t for t in labels if t != -100])
            assert learnt.startswith(answer) and learnt.removeprefix(answer) in (tok.eos_token, "<|im_end|>")
            first = next(i for i, t in enumerate(labels) if t != -100)
            prompt = tok.decode(ids[:first])
            assert ("Write a" in prompt) and answer.strip() not in prompt


def test_long_pairs_keep_the_prompt_and_cut_the_answers_and_are_counted(tok, capsys):
    import datasets

    cfg = DataConfig(task="preference", max_length=24)
    rows = [{"prompt": "Write a review.", "chosen": " good" * 40, "rejected": " bad" * 3},
            {"prompt": "Write a review.", "chosen": " good", "rejected": " bad"}]
    enc = pairs.tokenize(cfg, tok, datasets.Dataset.from_list(rows), "data.train")
    assert "1 of 2 pairs are longer than data.max_length=24" in capsys.readouterr().out
    ids, labels = enc[0]["chosen_input_ids"], enc[0]["chosen_labels"]
    assert len(ids) == 24 and tok.decode(ids).startswith("Write a review.")
    assert labels[:len(tok("Write a review.")["input_ids"])] == [-100] * len(tok("Write a review.")["input_ids"])
    assert enc[0]["rejected_input_ids"] == tok("Write a review.")["input_ids"] + tok(" bad" * 3)["input_ids"] + \
        [tok.eos_token_id]
    long_prompt = [{"prompt": "word " * 60, "chosen": " yes", "rejected": " no"}]
    enc = pairs.tokenize(cfg, tok, datasets.Dataset.from_list(long_prompt), "data.train")[0]
    assert len(enc["chosen_input_ids"]) <= 24 and tok.decode([t for t in enc["chosen_labels"] if t != -100]) == \
        " yes" + tok.eos_token
    assert "the prompt's start cut" in capsys.readouterr().out


def test_bad_rows_get_one_error_line_each_and_nothing_is_written(tmp_path):
    rows = _rows(6)
    rows[1]["chosen"] = None  # missing answer
    rows[2]["rejected"] = rows[2]["chosen"]  # chosen == rejected
    rows[3]["prompt"] = []  # empty prompt
    rows[5]["rejected"] = [{"role": "user", "content": "not an answer"}]  # no assistant message
    files = {"train": _jsonl(tmp_path / "bad.jsonl", rows), "eval": _jsonl(tmp_path / "ok.jsonl", _rows(2))}
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    r = run_cli("train", config, "method.name=lora", "model.name=tiny-llama", "data.task=preference",
                f"data.train={files['train']}", f"data.eval={files['eval']}", "train.objective=dpo",
                f"train.output_dir={out}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 4 and all(line.startswith("sidetune: error: data.train row ") for line in lines), lines
    assert [line.split()[4] for line in lines] == ["2", "3:", "4", "6:"]
    assert "empty or missing chosen answer" in lines[0] and "same messages" in lines[1]
    assert "empty or missing prompt" in lines[2] and "no assistant message" in lines[3]
    assert not out.exists()
    text = {"train": _jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"},
                                                   {"prompt": "  ", "chosen": "a", "rejected": "b"},
                                                   {"prompt": "p", "chosen": "a", "rejected": ""}])}
    with pytest.raises(SidetuneError) as e:
        build(_cfg({**text, "eval": files["eval"]}, "lora"), "cpu")
    assert str(e.value).count("sidetune: error:") == 2  # three rows, three lines (the CLI prints the first prefix)


def test_config_refuses_a_preference_task_without_objective_and_the_reverse(pair_files):
    with pytest.raises(SidetuneError, match=r"set train\.objective=dpo"):
        _cfg(pair_files, "lora", "unused", "train.objective=supervised")
    with pytest.raises(SidetuneError, match=r"set data\.task=preference"):
        load_config(None, ["train.objective=dpo"])
    with pytest.raises(SidetuneError, match="label_smoothing"):
        _cfg(pair_files, "lora", "unused", "train.label_smoothing=0.5")


# ---------------------------------------------------------------------------------------------------------------------
# References and training


def _batches(s, n: int = 1):
    collate = s.task.collator(s.tokenizer)
    return [collate([s.data.train[i] for i in range(4 * k, 4 * k + 4)]) for k in range(n)]


def _frozen_logps(batch) -> torch.Tensor:
    # Built as the run's build builds it (train.seed, the tokenizer's pad id): the weights its backbone started from.
    pad = load_tokenizer(ModelConfig(name="tiny-llama")).pad_token_id
    frozen = load_model(ModelConfig(name="tiny-llama"), "causal_lm", None, "cpu", pad, seed=42)
    with torch.no_grad():
        return sequence_logps(frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])[0]


@pytest.mark.parametrize("chunk", [0, 16])
def test_lst_reference_is_the_frozen_model_from_the_same_forward_before_and_after_steps(pair_files, chunk):
    """LST's reference comes from the policy's own forward (one backbone forward: its final hidden state through
    the LM head) and equals the frozen model's log-probs exactly at step 0 and after optimizer steps; the policy
    moves, the backbone gets no gradient, and the loss goes down."""
    s = build(_cfg(pair_files, "lst", "unused", f"train.loss_chunk_size={chunk}", "train.lr=1e-2"), "cpu",
              with_optimizer=True)
    pm = s.preference
    assert pm.reference == "in_forward"
    batch = _batches(s)[0]
    want = _frozen_logps(batch)
    calls = []
    hook = s.model.backbone.model.register_forward_hook(lambda *a: calls.append(1))
    same = torch.equal if not chunk else lambda a, b: assert_close(a, b, rtol=1e-6, atol=1e-5) is None
    assert same(pm.reference_logps(**batch), want)  # chunked: the head on the labelled rows only (float rounding)
    out = pm(**batch)
    assert len(calls) == 2  # reference_logps above, then the step's forward: one backbone forward each
    hook.remove()
    # Step 0: the policy is the reference, every reward 0, loss log 2.
    assert_close(out.pairs["chosen_rewards"], torch.zeros(4), atol=1e-6, rtol=0)
    assert_close(out.loss.item(), 0.6931471805599453, atol=1e-6, rtol=0)
    losses = []
    for _ in range(8):
        s.module.train()
        losses.append(train_step(s.module, batch, s.optimizer, s.trainable, 1.0).item())
        assert all(p.grad is None for p in s.model.backbone.parameters())
    assert losses[-1] < losses[0] - 0.05, losses
    assert same(pm.reference_logps(**batch), want)
    with torch.no_grad():
        after = pm(**batch)
    assert (after.pairs["chosen_rewards"] - after.pairs["rejected_rewards"]).mean() > 0


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3"])
def test_parts_off_reference_is_the_frozen_model_and_loss_goes_down(pair_files, method):
    s = build(_cfg(pair_files, method), "cpu", with_optimizer=True)
    assert s.preference.reference == "parts_off"
    batch = _batches(s)[0]
    want = _frozen_logps(batch)
    losses = [train_step(s.module, batch, s.optimizer, s.trainable, 1.0).item() for _ in range(8)]
    assert losses[-1] < losses[0], losses
    assert_close(s.preference.reference_logps(**batch), want, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        policy = s.preference.policy_logps({k: batch[k] for k in ("input_ids", "attention_mask")},
                                           batch["labels"])[0]
    assert (policy - want).abs().max() > 1e-3  # the policy moved; the reference did not


def test_simpo_needs_no_reference_and_its_loss_goes_down(pair_files):
    s = build(_cfg(pair_files, "lst", "unused", "train.objective=simpo", "train.beta=2.0"), "cpu",
              with_optimizer=True)
    assert s.preference.reference is None and not s.preference.needs_table
    batch = _batches(s)[0]
    losses = [train_step(s.module, batch, s.optimizer, s.trainable, 1.0).item() for _ in range(8)]
    assert losses[-1] < losses[0], losses


def test_full_finetuning_precomputes_the_reference_logs_metrics_and_evaluates(pair_files, tmp_path):
    from sidetune.train import train

    out = tmp_path / "full"
    metrics = train(_cfg(pair_files, "full", out, "train.max_steps=4", "train.lr=1e-4", "train.eval_every=2"))
    table = load_file(out / "reference_logps.safetensors")["reference_logps"]
    assert table.shape == (24, 2)  # 16 training pairs, then the 8 eval pairs
    s = build(_cfg(pair_files, "full"), "cpu")
    first = _batches(s)[0]
    index = first.pop("pair_index")
    want = _frozen_logps(first)
    assert_close(torch.cat([table[index, 0], table[index, 1]]), want, rtol=1e-6, atol=1e-4)
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    for key in ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin"):
        assert all(key in r for r in train_rows) and f"eval_{key}" in metrics
    assert metrics["eval_pairs"] == 8 and 0 <= metrics["eval_rewards_accuracy"] <= 1
    assert len([r for r in rows if "eval_loss" in r]) == 2


def test_init_from_starts_from_a_finished_run_and_takes_it_as_the_reference(pair_files, tmp_path):
    from sidetune.train import train

    first = tmp_path / "first"
    train(_cfg(pair_files, "lst", first, "train.max_steps=3", "train.eval_every=0"))
    cfg = _cfg(pair_files, "lst", "unused", f"model.init_from={first}")
    s = build(cfg, "cpu")
    init_from(s.model, s.method, cfg)
    trained = load_file(first / "final" / "trainable.safetensors")
    for name, p in s.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), trained[name].to(p.dtype)), name
    assert s.preference.reference == "precomputed"  # the starting model is the trained one, not the backbone
    with pytest.raises(SidetuneError, match=r"method\.r="):
        cfg = _cfg(pair_files, "lst", "unused", f"model.init_from={first}", "method.r=2")
        s = build(cfg, "cpu")
        init_from(s.model, s.method, cfg)


def test_kill_then_resume_equals_an_uninterrupted_run(pair_files, tmp_path, monkeypatch):
    """kill -9 after a checkpoint, then train.resume=latest: the same losses and weights as an uninterrupted run,
    with the precomputed reference read back from the run directory (full fine-tuning)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every run on one thread: bit-equality across runs needs it
    args = [f"data.train={pair_files['train']}", f"data.eval={pair_files['eval']}", "method.name=full",
            "model.name=tiny-llama", "data.task=preference", "train.objective=dpo", "data.max_length=48",
            "train.batch_size=4", "train.max_steps=8", "train.save_every=2", "train.eval_every=4", "train.lr=1e-4",
            "train.log_every=1", "train.progress=false"]
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli("train", config, *args, f"train.output_dir={whole}").returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SIDETUNE_TEST_SAVE_DELAY": "0.3"}
    p = subprocess.Popen([sys.executable, "-m", "sidetune", "train", str(config), *args,
                          f"train.output_dir={killed}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if (killed / "checkpoints" / "step-0000002" / "manifest.json").is_file():
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL and not (killed / "final").exists()
    again = run_cli("train", config, *args, f"train.output_dir={killed}", "train.resume=latest")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reference log-probabilities are read from" in again.stdout
    curve = lambda run: [(r["step"], r["loss"], r["rewards_margin"]) for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert curve(killed) == curve(whole)
    got, want = load_file(killed / "final" / "trainable.safetensors"), load_file(whole / "final" / "trainable.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["lst", "lora"])
def test_two_processes_match_one_process(pair_files, tmp_path, method):
    """accelerate launch with 2 CPU processes, batch 2 each, against one process of batch 4: the same curve."""
    from sidetune.train import train

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = [f"method.name={method}", "model.name=tiny-llama", "data.task=preference", "train.objective=dpo",
            f"data.train={pair_files['train']}", f"data.eval={pair_files['eval']}", "data.max_length=48",
            "train.max_steps=4", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
            "train.progress=false"]
    one = tmp_path / "one"
    train(load_config(None, [*args, "train.batch_size=4", f"train.output_dir={one}"]))
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port",
                        str(_free_port()), "-m", "sidetune", "train", str(config), *args, "train.batch_size=2",
                        f"train.output_dir={two}"],
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ([(x["loss"], x["rewards_accuracy"], x["rewards_margin"]) for x in read_metrics(run) if "loss" in x]
            for run in (one, two))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-4, atol=1e-5)
    ea = [x for x in read_metrics(one) if "eval_loss" in x][-1]
    eb = [x for x in read_metrics(two) if "eval_loss" in x][-1]
    assert ea["eval_pairs"] == eb["eval_pairs"] == 8
    assert_close(eb["eval_rewards_margin"], ea["eval_rewards_margin"], rtol=1e-4, atol=1e-5)


def test_profile_dpo_rows_lst_costs_about_its_supervised_step_and_lora_pays_the_second_forward():
    """`sidetune profile --objective dpo` rows, predicted on fake tensors: LST's DPO step on B pairs within 1.15x of
    its supervised step on the same 2B rows (no reference model, no second backbone forward); LoRA's above its own
    supervised step or more (the reference forward's transients; the backward through the backbone)."""
    from sidetune.profile import profile_row, resolve_rows

    def peak(method: str, dpo: bool) -> dict:
        task, batch, sets = ("preference", 2, ["train.objective=dpo"]) if dpo else ("causal_lm", 4, [])
        spec = resolve_rows(method, "tiny-llama", task, batch, 64, [*sets, "train.loss_chunk_size=64"],
                            references=False)[0]
        # A CPU target: predicting LST's side recomputation for CUDA on tiny-llama fails on main too (a
        # CheckpointError under the emulated CUDA autocast policy), supervised or not.
        return profile_row(spec, "meta", "cpu", 0)

    lst, lst_sup = peak("lst", True), peak("lst", False)
    assert lst["objective"] == "dpo" and lst["reference"] == "in_forward" and lst["act_backbone_bytes"] == 0
    assert lst["predicted_peak_bytes"] <= 1.15 * lst_sup["predicted_peak_bytes"]
    lora, lora_sup = peak("lora", True), peak("lora", False)
    assert lora["reference"] == "parts_off" and lora["act_backbone_bytes"] > 0 and lora["bwd_dx_flops_backbone"] > 0
    assert lora["predicted_peak_bytes"] >= lora_sup["predicted_peak_bytes"]
