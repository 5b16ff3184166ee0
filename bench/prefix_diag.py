"""Does a prefix run's classifier see the input? A short training of a recipe with numbers every 10 steps.

    OMP_NUM_THREADS=1 python bench/prefix_diag.py recipes/sst2_prefix_tuning.yaml [overrides ...] [--steps 20]

On 64 dev sentences: the loss, accuracy, the spread across inputs of the logit difference, of the pooler output and
of h_[CLS] (a readout that squashes the input-dependent part shows a small spread), the RMS of the prefix keys and
values (their scale against the init), and the attention mass the real tokens put on the prefix per layer (eager
attention; BERT-style encoders only, which have a pooler).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from sidetune import session
from sidetune.config import load_config


@torch.no_grad()
def report(tag: str, model, batch) -> None:
    model.eval()
    inner = model.model
    seen = {}
    hook = inner.base_model.pooler.register_forward_hook(
        lambda m, i, o: seen.update(pooled=o, cls=i[0][:, 0]))
    out = model(**batch)
    hook.remove()
    diff = out.logits[:, 1] - out.logits[:, 0]
    acc = (out.logits.argmax(-1) == batch["labels"]).float().mean().item()
    line = (f"[{tag}] loss {out.loss.item():.4f} acc {acc:.3f} | logit diff: spread {diff.std().item():.4f} "
            f"mean {diff.mean().item():.4f}")
    if "pooled" in seen:  # pooling=mean bypasses the pooler, which then never runs
        line += (f" | pooler out spread {seen['pooled'].std(0).mean().item():.4f} | h_CLS spread "
                 f"{seen['cls'].std(0).mean().item():.4f}")
    print(line)
    kv = model.prefix()
    keys, values = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
    impl = inner.config._attn_implementation
    inner.config._attn_implementation = "eager"
    try:
        att = inner.base_model(**model._inputs(**{k: v for k, v in batch.items() if k != "labels"}),
                               output_attentions=True).attentions
    finally:
        inner.config._attn_implementation = impl
    p, real = model.num_virtual_tokens, batch["attention_mask"].bool()
    mass = [a[..., :p].sum(-1).mean(1)[real].mean().item() for a in att]
    print(f"   prefix K rms {keys.pow(2).mean().sqrt().item():.3f} V rms {values.pow(2).mean().sqrt().item():.3f} | "
          f"attention on the prefix per layer {' '.join(f'{m:.3f}' for m in mass)}")
    model.train()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cfg = load_config(args.recipe, args.overrides)
    s = session.build(cfg, "cpu", with_optimizer=True)
    collate = s.task.collator(s.tokenizer)
    loader = DataLoader(s.data.train, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    dev = collate([s.data.eval[i] for i in range(64)])
    report("init", s.model, dev)
    start, it = time.time(), iter(loader)
    for step in range(1, args.steps + 1):
        loss = session.train_step(s.module, next(it), s.optimizer, s.trainable, cfg.train.max_grad_norm)
        if step % 10 == 0:
            print(f"step {step} train loss {loss.item():.4f} ({time.time() - start:.0f} s)")
            report(f"step {step}", s.model, dev)


if __name__ == "__main__":
    main()
