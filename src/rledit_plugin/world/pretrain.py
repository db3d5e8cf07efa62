"""Pre-training of the tiny LM: the corpus as token lines, length buckets, the loop.

Kept apart from ``tiny_lm`` (config, tokenizer, model, cache), which sets up the
optimiser and calls :func:`train_loop` on a fixed thread count (``cpu_kernels.fixed_threads``).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Tuple

import torch

from .facts import World


def encode_corpus(world: World, tok) -> List[Tuple[List[int], List[bool], List[bool]]]:
    """Every training line as (token ids + eos, loss mask, answer mask).

    Questions are tokenised exactly as :func:`tokenize_teacher_forced` does
    (prompt, then " " + answer), so training and evaluation see the same ids.
    The subject's tokens get no loss: which invented name comes next is pure
    noise, and it would keep shoving the output head around for nothing.
    """
    eos = tok.eos_token_id
    subject_ids = {s: tok(" " + s, add_special_tokens=False)["input_ids"]
                   for s in (f.subject for f in world.all_facts())}

    def line(ids, answer_len, subject):
        ids = ids + [eos]
        learn = [True] * len(ids)
        sub = subject_ids[subject]
        for i in range(len(ids) - len(sub) + 1):
            if ids[i:i + len(sub)] == sub:
                learn[i:i + len(sub)] = [False] * len(sub)
                break
        answer = [False] * (len(ids) - 1 - answer_len) + [True] * answer_len + [False]
        return ids, learn, answer

    lines = [line(tok(f.sentence(), add_special_tokens=False)["input_ids"], 0, f.subject)
             for f in world.all_facts()]
    for fact, question in world.fact_questions():
        p = tok(question, add_special_tokens=True)["input_ids"]
        a = tok(" " + fact.object, add_special_tokens=False)["input_ids"]
        lines.append(line(p + a, len(a), fact.subject))
    return lines


def length_buckets(lines, batch_size: int, gen: torch.Generator) -> List[List[int]]:
    """Batches of equal-length lines (no padding), in a seeded random order."""
    by_len: Dict[int, List[int]] = {}
    for i, (ids, _, _) in enumerate(lines):
        by_len.setdefault(len(ids), []).append(i)
    batches = []
    for length in sorted(by_len):
        idx = by_len[length]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        idx = [idx[j] for j in perm]
        batches.extend(idx[k:k + batch_size] for k in range(0, len(idx), batch_size))
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[j] for j in order]


class LRSchedule:
    """Multiplier of the base step at each optimiser step (a ``LambdaLR`` function).

    Linear warm-up over ``warmup_steps``, then ``"cosine"``: a cosine to 0 at ``total_steps``;
    or ``"wsd"``: constant until :meth:`decay` is called, then a cosine to 0 over the steps
    it is given.  The loop decides when to decay from what the model has learnt so far.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        if kind not in ("cosine", "wsd"):
            raise ValueError(f"TinyLMConfig.schedule must be 'cosine' or 'wsd', got {kind!r}")
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.decay_start: Optional[int] = None
        self.decay_steps = 0

    def decay(self, start: int, steps: int) -> None:
        self.decay_start, self.decay_steps = start, steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, step / self.total_steps)))
        if self.decay_start is None:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.decay_start) / self.decay_steps)))


def train_loop(model, lines, cfg, optim, sched, schedule: LRSchedule, gen, steps_per_epoch: int,
               desc, progress):
    """``cfg.epochs`` epochs at most; with the "wsd" schedule the last ``cfg.decay_epochs`` of
    them follow the first epoch that answered ``cfg.decay_accuracy`` of its answers right."""
    from tqdm.auto import tqdm

    body, head = model.base_model, model.get_output_embeddings()
    start, cpu_start, step, history = time.time(), time.process_time(), 0, []
    end_epoch = cfg.epochs
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc=desc, disable=not progress, unit="step",
               leave=False)
    for epoch in range(cfg.epochs):
        if epoch == end_epoch:
            break
        correct = answered = 0
        loss_sum, n_tokens = 0.0, 0
        for idx in length_buckets(lines, cfg.batch_size, gen):
            input_ids = torch.tensor([lines[j][0] for j in idx])
            learn = torch.tensor([lines[j][1] for j in idx])[:, 1:]
            is_answer = torch.tensor([lines[j][2] for j in idx])[:, 1:]
            hidden = body(input_ids=input_ids)[0][:, :-1]
            # The output layer only where a token is learned (cheaper than full logits).
            logits = head(hidden[learn])
            targets = input_ids[:, 1:][learn]
            answer_rows = is_answer[learn]
            weights = 1.0 + (cfg.answer_weight - 1.0) * answer_rows.float()
            token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            loss = (token_loss * weights).sum() / weights.sum()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            step += 1
            with torch.no_grad():   # running answer accuracy, teacher-forced
                hit = logits.argmax(-1) == targets
                correct += (hit & answer_rows).sum().item()
                answered += answer_rows.sum().item()
            loss_sum += loss.item() * len(targets)
            n_tokens += len(targets)
            bar.update(1)
        epoch_acc = correct / max(answered, 1)
        history.append({"epoch": epoch + 1, "loss": loss_sum / n_tokens,
                        "answer_accuracy": epoch_acc, "seconds": time.time() - start})
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / n_tokens:.3f}", acc=f"{epoch_acc:.3f}")
        if cfg.stop_accuracy is not None and epoch_acc >= cfg.stop_accuracy:
            break
        left = cfg.epochs - (epoch + 1)
        if schedule.kind == "wsd" and schedule.decay_start is None and left > 0 and (
                epoch_acc >= cfg.decay_accuracy or left <= cfg.decay_epochs):
            decay_epochs = min(cfg.decay_epochs, left)
            schedule.decay(step, decay_epochs * steps_per_epoch)
            end_epoch = epoch + 1 + decay_epochs
            history[-1]["decay_from_here"] = True
    bar.close()
    return {"seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu_start,
            "epochs": len(history), "steps": step, "history": history}
