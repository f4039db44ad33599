"""Merged checkpoints: what `nf4lora merge` records in one, how the commands hold one when they load it, and the
logit comparisons that say what a merge and a re-quantization cost.

A merged checkpoint is the base with each adapter's B @ A * scaling added into its weights, written at 16 bits.
A fine-tune often lives in changes smaller than a 4-bit quantization step: on the demo task, re-quantizing the
merged weights to NF4 took the eval loss from 0.0008 (base + adapter) to 0.668 and generation answered like the
base model. So `merge` records itself in config.json under "nf4lora_merged" (base, adapter and its r / alpha /
targets, how the base was held, the written dtype, the date, the measured logit difference; transformers ignores
the key), and:
- `generate` / `eval` hold such a checkpoint at 16 bits unless --quant-type asks for 4 bits, and then print what
  the 4 bits cost on a few sequences (logit difference, next-token agreement, loss), so the user can choose;
  with an --adapter they hold it as finetune did by default (NF4), since the adapter was trained on that base;
- `finetune` quantizes it as asked (QLoRA on a merged model is ordinary: the new adapter learns on that 4-bit
  base) and says so.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, Example, encode_record, read_jsonl

SAMPLE_SEQUENCES = 4  # "a few": enough to show a fine-tune that vanished, cheap next to loading the model
SAMPLE_TOKENS = 128  # per sequence at most: positions x vocabulary float32 logits are kept for the comparison
QUANT_NAMES = {"nf4": "NF4", "fp4": "FP4", "none": "16-bit"}


# -------------------------------------------------------------------------------------------------- the record
def merge_record(base: str, adapter: str, adapter_config: dict, quant, dtype: str) -> dict:
    """The "nf4lora_merged" block of a merged checkpoint's config.json (merge adds the logit comparison)."""
    keys = ("r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path")
    return {
        "base_model": os.path.abspath(base),
        "adapter": os.path.abspath(adapter),
        "adapter_config": {k: adapter_config.get(k) for k in keys},
        "base_held_as": {"quant_type": quant.quant_type, "double_quant": quant.double_quant,
                         "blocksize": quant.blocksize},  # fmt: skip
        "dtype": dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _describe(path: str, record: dict) -> str:
    return (f"{path} is a merged checkpoint (nf4lora merge of {record.get('adapter')!r} into "
            f"{record.get('base_model')!r})")  # fmt: skip


# ------------------------------------------------------------------------------------------- 16 or 4 bits
def base_precision(path: str, record: dict | None, quant_type: str | None, adapter: str | None):
    """(quant type to load: nf4 / fp4 / none, one line saying which and why, whether to measure 4-bit against
    16-bit) for generate / eval. quant_type: --quant-type as given (None: not given); record: the checkpoint's
    "nf4lora_merged" block or None."""
    if record is None:
        chosen = quant_type or "nf4"
        why = f"--quant-type {chosen}" if quant_type else "the default; --quant-type none keeps them at 16 bits"
        return chosen, f"base weights: {QUANT_NAMES[chosen]} ({why})", False
    merged = _describe(path, record)
    if quant_type is None and adapter is None:
        return "none", (f"base weights: 16-bit as stored, because {merged}: 4 bits can round away the fine-tune "
                        "(--quant-type nf4 holds it in 4 bits and measures what that costs)"), False  # fmt: skip
    if quant_type is None:
        return "nf4", (f"base weights: NF4, as finetune holds a base by default, because --adapter was trained on "
                       f"that: {merged} (--quant-type none keeps its 16-bit weights)"), False  # fmt: skip
    if quant_type == "none":
        return "none", f"base weights: 16-bit (--quant-type none); {merged}", False
    return quant_type, (f"base weights: {QUANT_NAMES[quant_type]} as asked (--quant-type {quant_type}), although "
                        f"{merged}: its cost against 16 bits is measured below"), adapter is None  # fmt: skip


def finetune_note(path: str, record: dict | None, quant_type: str) -> str | None:
    """finetune on a merged checkpoint: it is held as asked; say so, and what it means for the new adapter."""
    if record is None:
        return None
    if quant_type == "none":
        return f"note: {_describe(path, record)}; finetune holds it at 16 bits (--quant-type none)"
    return (f"note: {_describe(path, record)}; finetune holds it in {QUANT_NAMES[quant_type]} (--quant-type "
            f"{quant_type}: QLoRA on a merged model is ordinary), so the new adapter learns on that 4-bit base, as "
            "`merge` and `eval --adapter` hold the base by default")  # fmt: skip


def load_for_inference(path: str, record: dict | None, args, device, compute_dtype: str, sample: list[Example],
                       log=None):  # fmt: skip
    """The model generate / eval run: the base at the precision base_precision chooses, its line printed to `log`
    (default stdout), and what 4 bits cost on `sample` when they are asked of a merged checkpoint; --adapter
    loaded."""
    from nf4lora.lora import load_adapter

    from .resources import load_base

    log = log or sys.stdout
    quant_type, why, measure = base_precision(path, record, args.quant_type, args.adapter)
    print(why, file=log)
    quant = SimpleNamespace(quant_type=quant_type, double_quant=args.double_quant, blocksize=args.blocksize,
                            compute_dtype=compute_dtype)  # fmt: skip
    reference = None
    if measure and sample:  # the 16-bit model first, then the 4-bit one: the peak is one of them, not both
        dense = load_base(path, SimpleNamespace(**{**vars(quant), "quant_type": "none"}), device)
        reference = sample_logits(dense, sample)
        del dense
    model = load_base(path, quant, device)
    if reference is not None:
        print(quantization_cost(reference, sample_logits(model, sample), sample, quant_type), file=log)
    if args.adapter is not None:
        load_adapter(model, args.adapter)  # raises ValueError for an adapter of another model (names or shapes)
    return model.eval()


# ------------------------------------------------------------------------------------------------ measuring
def sample_of(examples: list[Example]) -> list[Example]:
    """The first SAMPLE_SEQUENCES non-empty examples, each cut to SAMPLE_TOKENS."""
    examples = [e for e in examples if e.input_ids][:SAMPLE_SEQUENCES]
    return [Example(e.input_ids[:SAMPLE_TOKENS], e.labels[:SAMPLE_TOKENS]) for e in examples]


def bundled_sample(tokenizer) -> list[Example]:
    """A few records of the bundled held-out split, chat-rendered when the tokenizer has a template, else as plain
    text: what `merge` compares on (it has no data of its own)."""
    from .resources import DEFAULT_VALID

    records = read_jsonl(DEFAULT_VALID)[:SAMPLE_SEQUENCES]
    if tokenizer.chat_template:
        return sample_of([encode_record(r, tokenizer) for r in records])
    texts = [" ".join(m["content"] for m in r["messages"]) for r in records]
    return sample_of([Example(ids, list(ids)) for ids in map(tokenizer.encode, texts)])


@torch.no_grad()
def sample_logits(model, sample: list[Example]) -> list[torch.Tensor]:
    """Float32 CPU logits, one (T, vocab) tensor per sequence, each run on its own (no padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(torch.tensor([e.input_ids], device=device)).logits[0].float().cpu() for e in sample]
    model.train(was_training)
    return out


@contextlib.contextmanager
def weights_as_written(model: nn.Module, dtype: torch.dtype):
    """Inside, `model` computes in float32 with every parameter rounded to `dtype` (what loading the written
    checkpoint gives), one unit at a time: each decoder block (an element of an nn.ModuleList) or other module with
    parameters of its own gets its float32 copies when it runs and gives them back after. A float32 copy of the
    whole model beside the tensors being written would triple what merge holds (a 7B model: 28 GB more than the
    14 GB of bf16 weights)."""
    hooks = []
    for unit, recurse in _units(model):
        saved = {}

        def cast(module, args, saved=saved, recurse=recurse):
            for p in module.parameters(recurse=recurse):  # each once, tied weights included
                saved[id(p)] = p, p.data
                p.data = p.data.to(dtype).float()

        def restore(module, args, output, saved=saved):
            for p, data in saved.values():
                p.data = data
            saved.clear()

        hooks += [unit.register_forward_pre_hook(cast), unit.register_forward_hook(restore)]
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()


def _units(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, whether its submodules' parameters go with it): every element of an nn.ModuleList (a decoder block,
    whose parts may read each other's weights), and every other module with parameters of its own."""
    units, in_block = [], set()
    for module in model.modules():  # parents before their children
        if module in in_block:
            continue
        if isinstance(module, nn.ModuleList):
            for block in module:
                units.append((block, True))
                in_block.update(block.modules())
        elif next(module.parameters(recurse=False), None) is not None:
            units.append((module, False))
    return units


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Max and mean |difference| over every position and vocabulary entry, and how often the argmax (the greedy
    next token) agrees."""
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, other)])
    agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(reference, other)])
    return {"sequences": len(reference), "positions": int(agree.numel()), "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()), "argmax_agrees": float(agree.float().mean())}  # fmt: skip


def _loss(logits: list[torch.Tensor], sample: list[Example]) -> float | None:
    """Mean cross-entropy over the sample's target tokens (None when it has none, as a bare prompt)."""
    total, count = 0.0, 0
    for x, e in zip(logits, sample):
        labels = torch.tensor(e.labels[1:])  # position t predicts token t + 1
        total += float(F.cross_entropy(x[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / count if count else None


def describe_difference(d: dict) -> str:
    sequences = f"{d['sequences']} sequence{'s' * (d['sequences'] != 1)}"
    return (f"max {d['max_abs']:.3g}, mean {d['mean_abs']:.3g} (|logit difference| over {sequences}, {d['positions']} "
            f"positions); the most likely next token agrees at {d['argmax_agrees']:.1%} of them")  # fmt: skip


def quantization_cost(reference, quantized, sample: list[Example], quant_type: str) -> str:
    """One line: how far the 4-bit model's logits are from the 16-bit one's, and the loss of each."""
    line = f"{QUANT_NAMES[quant_type]} against 16-bit: {describe_difference(compare_logits(reference, quantized))}"
    before, after = _loss(reference, sample), _loss(quantized, sample)
    if before is not None:
        line += f"; loss on their target tokens {before:.4f} (16-bit) -> {after:.4f} ({QUANT_NAMES[quant_type]})"
    return line
