"""Training data: JSONL records -> token ids with prompt masking -> packed or padded batches.

Record formats, one JSON object per line:
    {"text": "..."}                                  plain language modelling: every token is a target
    {"prompt": "...", "completion": "..."}           raw concatenation; loss on the completion (+ EOS) only
    {"messages": [{"role": ..., "content": ...}]}    rendered with the tokenizer's chat template; loss on the
                                                     assistant turns only (the text the model must produce)
Batches are dicts of (B, T) int64 tensors: `input_ids`, `labels` (-100 = no loss), and either `doc_ids`
(packing: several examples share a row and attend only within their own document; the model restarts positions
at each document) or `attention_mask` (padding: one example per row).
Shuffling is a function of (seed, epoch) only, so a run can resume at any (epoch, row) with the same order.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value that takes no part in the loss (the model's convention)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX on tokens the model is not trained to produce
    record: dict | None = None  # the JSONL record it came from, for display

    def question(self) -> str:
        """The last user message or the prompt of the source record ('' for plain text)."""
        r = self.record or {}
        if "messages" in r:
            return next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        return r.get("prompt", "")

    @property
    def n_targets(self) -> int:
        """Tokens the loss sees: collate masks a document's first label (nothing before it predicts it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


# ---------------------------------------------------------------------------------------------------- reading
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; any malformed line raises ValueError naming the file and line number."""
    return [record for _, record in _numbered_records(path)]


def _numbered_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line. UTF-8, with or without a byte-order mark (editors on
    Windows write one); a line that is not UTF-8, not JSON, or holds a string that is not valid Unicode (a JSON
    lone surrogate such as "\\ud800", which no tokenizer accepts) is a ValueError naming the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            _check_record(record, f"{path}:{lineno}")
            records.append((lineno, record))
    if not records:
        raise ValueError(f"data file {path!r} holds no records")
    return records


def _check_unicode(value, where: str) -> None:
    """Every string in a JSON value (keys included) must encode to UTF-8."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        for s in (key, item):
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(
                        f"{where}: string {s!r} holds the lone surrogate {s[e.start:e.end]!r}, which is not valid "
                        "Unicode: a \\ud800-\\udfff escape must be half of a surrogate pair"
                    ) from None
        _check_unicode(item, where)


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    _check_unicode(record, where)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(
                    f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string, got {record.get(key)!r}")
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string, got {record['text']!r}")
    else:
        raise ValueError(
            f"{where}: a record needs 'text', 'prompt' + 'completion' or 'messages'; got keys {sorted(record)}"
        )


# --------------------------------------------------------------------------------------------------- encoding
def encode_record(record: dict, tokenizer) -> Example:
    """Token ids and labels of one record (see the module docstring for the formats)."""
    if "messages" in record:
        return _encode_chat(record["messages"], tokenizer)
    # BOS only if the tokenizer's own configuration adds it (LLaMA-2 style); EOS always ends a target, so the
    # model learns to stop.
    specials = tokenizer.encode("", add_special_tokens=True)
    bos = specials[:1] if specials[:1] == [tokenizer.bos_token_id] else []
    eos = [tokenizer.eos_token_id]
    if "text" in record:
        ids = bos + tokenizer.encode(record["text"], add_special_tokens=False) + eos
        return Example(ids, list(ids))
    prompt = bos + tokenizer.encode(record["prompt"], add_special_tokens=False)
    completion = tokenizer.encode(record["completion"], add_special_tokens=False) + eos
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def _encode_chat(messages: list[dict], tokenizer) -> Example:
    """Render with the chat template and train on the assistant turns only.

    The rendered text is cut where each assistant turn begins and ends (found by rendering the conversation up
    to that turn, with and without the turn), and each piece is tokenized on its own, so the mask follows the
    template exactly, whatever it inserts between turns (role headers, end-of-turn tokens, newlines). A
    conversation that opens with an assistant turn trains on its content only, not on what the template writes
    before it (a default system prompt, the role header).
    """
    render = tokenizer.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    cuts = [0]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True) if i else _opening(messages[0], render)
        upto = render(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
            raise ValueError(
                "the chat template does not render a conversation's beginning as a prefix of the whole, "
                "so assistant turns cannot be located for masking"
            )
        cuts += [len(before), len(upto)]
    cuts.append(len(full))
    ids, labels = [], []
    for k in range(len(cuts) - 1):
        piece = full[cuts[k] : cuts[k + 1]]
        piece_ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []  # the template wrote them
        ids += piece_ids
        labels += piece_ids if k % 2 == 1 else [IGNORE_INDEX] * len(piece_ids)  # odd pieces: assistant turns
    return Example(ids, labels)


def _opening(first: dict, render) -> str:
    """What the template writes before the content of a conversation's first message (a default system prompt,
    the role header): the common prefix of that message rendered with two contents that differ at once."""
    a = render([{**first, "content": "a"}], add_generation_prompt=False)
    b = render([{**first, "content": "b"}], add_generation_prompt=False)
    n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def load_examples(path: str | os.PathLike, tokenizer, max_seq_len: int) -> list[Example]:
    """Encode every record of a JSONL file; a record too long for `max_seq_len`, without a target token, or
    that the chat template cannot mask is an error naming the file and line."""
    examples = []
    for lineno, record in _numbered_records(path):
        where = f"{os.fspath(path)}:{lineno}"
        try:
            ex = encode_record(record, tokenizer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ex.record = record
        if len(ex.input_ids) > max_seq_len:
            raise ValueError(
                f"{where}: the record has {len(ex.input_ids)} tokens, more than seq_len={max_seq_len}; "
                "raise --seq-len or shorten the record"
            )
        if ex.n_targets == 0:
            raise ValueError(
                f"{where}: the record has no target tokens after masking (the loss never sees a document's first "
                "token, so a text or completion must give at least one token after it)"
            )
        examples.append(ex)
    return examples


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples chosen by `seed` (at least one when fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction!r}")
    n_val = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    if n_val >= len(examples):
        raise ValueError(f"val_fraction={fraction} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(f"{seed}-val").shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# --------------------------------------------------------------------------------------------------- batching
def _pack_rows(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Greedy first-fit in order: an example goes into the current row if it fits, else starts a new row.
    Examples are never split, so every target token sees its whole prompt."""
    rows, row, used = [], [], 0
    for ex in examples:
        if row and used + len(ex.input_ids) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.input_ids)
    if row:
        rows.append(row)
    return rows


def collate(rows: list[list[Example]], pad_id: int, pack: bool, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """(B, T) tensors from rows of examples. T = seq_len when given, else the longest row.

    Packed: doc_ids number the examples of a row 0, 1, ...; padding gets its own id (-1) so no real token
    attends to it. Padded (pack=False, one example per row): attention_mask is 1 on real tokens.
    """
    T = seq_len or max(sum(len(e.input_ids) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    extra = torch.full((B, T), -1, dtype=torch.long) if pack else torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        if not pack and len(row) != 1:
            raise ValueError("unpacked batches hold one example per row")
        if sum(len(e.input_ids) for e in row) > T:
            raise ValueError(f"a row of {sum(len(e.input_ids) for e in row)} tokens does not fit seq_len={T}")
        t = 0
        for d, ex in enumerate(row):
            n = len(ex.input_ids)
            input_ids[b, t : t + n] = torch.tensor(ex.input_ids)
            labels[b, t : t + n] = torch.tensor(ex.labels)
            extra[b, t : t + n] = d if pack else 1
            labels[b, t] = IGNORE_INDEX  # nothing in its own document predicts a document's first token
            t += n
    return {"input_ids": input_ids, "labels": labels, ("doc_ids" if pack else "attention_mask"): extra}


class DataStream:
    """An endless, resumable sequence of optimizer steps over a training set.

    Each epoch shuffles the examples with Random(f"{seed}-{epoch}") and packs (or pads) them into rows. Step k
    of an epoch trains on rows [k * batch_size, (k + 1) * batch_size) (the last step of an epoch may have fewer),
    cut into micro-batches of `micro_batch_size` rows; `next()` returns the step's micro-batches. The position
    (epoch, row) is the whole state and is counted in rows, so which rows a step sees depends on batch_size only:
    a run may resume with another micro_batch_size (after running out of memory, say) and train on the same rows.
    """

    def __init__(
        self, examples: list[Example], batch_size: int, micro_batch_size: int, seq_len: int, pack: bool, pad_id: int,
        seed: int,
    ):  # fmt: skip
        if not examples:
            raise ValueError("DataStream needs at least one training example")
        if batch_size <= 0 or micro_batch_size <= 0 or batch_size % micro_batch_size:
            raise ValueError(f"DataStream: batch_size={batch_size} must be a positive multiple of "
                             f"micro_batch_size={micro_batch_size}")  # fmt: skip
        self.examples, self.batch_size, self.micro_batch_size = examples, batch_size, micro_batch_size
        self.seq_len, self.pack, self.pad_id, self.seed = seq_len, pack, pad_id, seed
        self.epoch, self.row = 0, 0
        self._rows_epoch, self._rows = None, None

    def _epoch_rows(self, epoch: int) -> list[list[Example]]:
        if self._rows_epoch != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            shuffled = [self.examples[i] for i in order]
            self._rows = _pack_rows(shuffled, self.seq_len) if self.pack else [[e] for e in shuffled]
            self._rows_epoch = epoch
        return self._rows

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return math.ceil(len(self._epoch_rows(epoch)) / self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        return self.micro_batches(self.next_rows())

    def next_rows(self) -> list[list[Example]]:
        """The next step's rows (batch_size of them, fewer at the end of an epoch), advancing the position."""
        rows = self._epoch_rows(self.epoch)
        step = rows[self.row : self.row + self.batch_size]
        self.row += self.batch_size
        if self.row >= len(rows):
            self.epoch, self.row = self.epoch + 1, 0
        return step

    def micro_batches(self, rows: list[list[Example]]) -> list[dict[str, torch.Tensor]]:
        """`rows` cut into collated micro-batches of micro_batch_size rows (the last may have fewer)."""
        # Packed rows have a fixed length (seq_len) so every step has the same shape; padded rows only need the
        # longest example of the micro-batch.
        m = self.micro_batch_size
        return [collate(rows[i : i + m], self.pad_id, self.pack, self.seq_len if self.pack else None)
                for i in range(0, len(rows), m)]  # fmt: skip

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"data state was saved with seed {state.get('seed')!r}, this run uses seed {self.seed}")
        if "row" not in state:
            raise ValueError(
                f"data state {state!r} counts micro-batches (a checkpoint of an older nf4lora, whose steps were cut "
                "differently); it cannot be continued: start the run again"
            )
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def eval_batches(examples: list[Example], micro_batch_size: int, seq_len: int, pack: bool, pad_id: int):
    """Validation micro-batches in file order (no shuffling, so every evaluation sees the same batches)."""
    rows = _pack_rows(examples, seq_len) if pack else [[e] for e in examples]
    for i in range(0, len(rows), micro_batch_size):
        yield collate(rows[i : i + micro_batch_size], pad_id, pack, seq_len if pack else None)
