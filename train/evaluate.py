"""Evaluation: loss and perplexity of a model on a JSONL or plain-text file, and exact-match accuracy of answers.

Exact match is computed teacher-forced in one batched forward: an answer is correct when, at every target
position up to and including the first end-of-turn token, the argmax of the logits is the target token. That is
precisely the condition for greedy decoding to produce the answer and stop, at a fraction of the cost of
generating token by token.
"""

from __future__ import annotations

import math
import os

import torch

from .data import IGNORE_INDEX, Example, collate, eval_batches, load_examples


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def text_examples(path: str, tokenizer, seq_len: int) -> list[Example]:
    """A plain-text file as consecutive non-overlapping windows of `seq_len` tokens (the last may be shorter)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"--data={path!r} is empty")
    ids = tokenizer.encode(text, add_special_tokens=True)
    return [Example(ids[i : i + seq_len], ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


def file_examples(path: str, tokenizer, seq_len: int) -> list[Example]:
    """Examples of a .jsonl file (records, prompt-masked) or of any other file read as plain text."""
    if not os.path.isfile(path):
        raise ValueError(f"--data={path!r} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--data={path!r} is empty")
    if path.endswith(".jsonl"):
        return load_examples(path, tokenizer, seq_len)
    return text_examples(path, tokenizer, seq_len)


@torch.no_grad()
def loss_and_perplexity(
    model, examples: list[Example], pad_id: int, batch_size: int = 8, autocast: bool = False
) -> dict:
    """Token-weighted mean cross-entropy over all target tokens (each example on its own row, padded) and exp()."""
    device = model.device
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, 0, False, pad_id):
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            continue
        with _autocast(device, autocast):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        total += float(loss) * n
        count += n
    if count == 0:
        raise ValueError("the evaluation data has no target tokens")
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}


@torch.no_grad()
def exact_match(
    model, examples: list[Example], pad_id: int, eos_ids, batch_size: int = 16, autocast: bool = False
) -> list[bool]:
    """Per example: does greedy decoding after the prompt reproduce the target up to its first EOS token?"""
    device = model.device
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    model.eval()
    results = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collate([[e] for e in chunk], pad_id, pack=False)
        with _autocast(device, autocast):
            logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        pred = logits.argmax(-1).cpu()  # (B, T): prediction for position t + 1
        for b, ex in enumerate(chunk):
            ok = True
            for t in range(1, len(ex.labels)):
                target = ex.labels[t]
                if target == IGNORE_INDEX:
                    continue
                ok = ok and int(pred[b, t - 1]) == target
                if target in eos or not ok:
                    break
            results.append(ok)
    return results


def prompt_and_answer(example: Example) -> tuple[list[int], list[int]]:
    """Split an example at its first target token: (prompt ids, answer ids)."""
    first = next(t for t, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[:first], example.input_ids[first:]
