"""The data pipeline: JSONL validation, prompt masking, chat templates, packing, shuffling and resume."""

import json

import pytest
import torch

from nf4lora.train.data import (
    IGNORE_INDEX, DataStream, Example, collate, encode_record, load_examples, read_jsonl, split_validation,
)  # fmt: skip
from test_train_helpers import date_records, write_jsonl, write_tiny_model


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(3, 90, (length,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


# ----------------------------------------------------------------------------------------------- reading errors
@pytest.mark.parametrize(
    "bad_line, match",
    [("{not json", "not valid JSON"), ('["a list"]', "JSON object"), ('{"foo": 1}', "needs 'text'"),
     ('{"prompt": "a"}', "'completion' must be a string"), ('{"text": ""}', "non-empty"),
     ('{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\]"),
     ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn")],
)  # fmt: skip
def test_malformed_line_names_file_and_line(tmp_path, bad_line, match):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=match) as err:
        read_jsonl(path)
    assert f"{path}:3:" in str(err.value)


def test_byte_order_mark_is_read_and_bad_unicode_names_file_and_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n{"text": "caf\xc3\xa9 \\ud83d\\ude00"}\n')  # BOM; a pair is fine
    assert read_jsonl(path) == [{"text": "hello"}, {"text": "caf\u00e9 \U0001F600"}]
    path.write_text('{"text": "ok"}\n{"prompt": "a\\ud800b", "completion": "c"}\n')  # a lone surrogate
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800'") as err:
        read_jsonl(path)
    assert f"{path}:2:" in str(err.value)
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')  # not UTF-8 at all
    with pytest.raises(ValueError, match="not UTF-8") as err:
        read_jsonl(path)
    assert f"{path}:2:" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


# -------------------------------------------------------------------------------------------------- batching
def test_collate_packed_marks_documents_and_masks_their_first_token():
    a, b = Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [IGNORE_INDEX, 9])
    batch = collate([[a, b]], pad_id=0, pack=True, seq_len=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]


def test_collate_padded_has_attention_mask():
    a, b = Example([5, 6, 7], [5, 6, 7]), Example([8], [8])
    batch = collate([[a], [b]], pad_id=0, pack=False)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="one example per row"):
        collate([[a, b]], pad_id=0, pack=False)


@pytest.mark.parametrize("pack", [True, False])
def test_stream_visits_every_example_once_per_epoch_in_a_seeded_order(pack):
    examples = _examples(23)
    s1 = DataStream(examples, batch_size=3, micro_batch_size=3, seq_len=24, pack=pack, pad_id=0, seed=7)
    n = s1.steps_per_epoch(0)
    epoch0 = [b for _ in range(n) for b in next(s1)]
    assert s1.state_dict()["epoch"] == 1 and s1.state_dict()["row"] == 0
    seen = []
    for batch in epoch0:
        key = "doc_ids" if pack else "attention_mask"
        for row, ids in zip(batch[key], batch["input_ids"]):
            for d in sorted(set(row.tolist()) - ({-1} if pack else {0})):
                seen.append(tuple(ids[row == d].tolist()))
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)
    s2 = DataStream(examples, 3, 3, 24, pack, 0, seed=7)
    assert all(torch.equal(x["input_ids"], next(s2)[0]["input_ids"]) for x in epoch0)
    s3 = DataStream(examples, 3, 3, 24, pack, 0, seed=8)
    assert any(not torch.equal(x["input_ids"], next(s3)[0]["input_ids"]) for x in epoch0)
    assert not torch.equal(next(s1)[0]["input_ids"], epoch0[0]["input_ids"])  # a new epoch reshuffles


def test_stream_resumes_mid_epoch_with_the_same_order():
    examples = _examples(40)
    full = DataStream(examples, 2, 2, 30, True, 0, seed=3)
    reference = [next(full)[0]["input_ids"] for _ in range(15)]
    first = DataStream(examples, 2, 2, 30, True, 0, seed=3)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = DataStream(examples, 2, 2, 30, True, 0, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)[0]["input_ids"], ref) for ref in reference[6:])
    with pytest.raises(ValueError, match="seed"):
        DataStream(examples, 2, 2, 30, True, 0, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="counts micro-batches"):  # an older checkpoint's position
        resumed.load_state_dict({"epoch": 0, "index": 3, "seed": 3})


@pytest.mark.parametrize("pack", [True, False])
def test_steps_hold_the_same_rows_whatever_the_micro_batch_size(pack):
    """A step is batch_size rows of the epoch (fewer at its end), whatever its micro-batch split, and the position
    is kept in rows: a run resumed with another micro_batch_size trains on the same rows (23 rows, batch 4)."""
    examples = _examples(23)

    def rows(micro_batches):  # the step's rows, as token tuples, in order
        return [tuple(ids[ids != 0].tolist()) for b in micro_batches for ids in b["input_ids"]]

    reference = DataStream(examples, 4, 4, 24, pack, 0, seed=5)
    steps = [rows(next(reference)) for _ in range(2 * reference.steps_per_epoch(0) + 1)]
    if not pack:  # one example per row: the epoch ends with a step of 3 rows
        assert [len(s) for s in steps[:6]] == [4, 4, 4, 4, 4, 3] and reference.steps_per_epoch(0) == 6
    split = DataStream(examples, 4, 2, 24, pack, 0, seed=5)
    for _ in range(3):
        next(split)
    state = json.loads(json.dumps(split.state_dict()))
    one = DataStream(examples, 4, 1, 24, pack, 0, seed=5)
    one.load_state_dict(state)
    later = [next(one) for _ in range(len(steps) - 3)]
    assert all(len(b["input_ids"]) == 1 for step in later for b in step)
    assert [rows(step) for step in later] == steps[3:]


def test_validation_split_is_seeded_and_disjoint():
    examples = _examples(50)
    train, val = split_validation(examples, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert {id(e) for e in train}.isdisjoint({id(e) for e in val})
    assert [id(e) for e in split_validation(examples, 0.2, seed=1)[1]] == [id(e) for e in val]
    assert [id(e) for e in split_validation(examples, 0.2, seed=2)[1]] != [id(e) for e in val]
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(examples, 1.0, seed=1)


# ------------------------------------------------------------------------------- with a real tokenizer and model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizers(tiny_dir):
    from transformers import AutoTokenizer

    from nf4lora.models import Tokenizer

    return Tokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def test_prompt_tokens_are_masked(tokenizers):
    ours, hf = tokenizers
    ex = encode_record({"prompt": "Write 01/02/2003:", "completion": " February 1, 2003"}, ours)
    prompt = hf.encode("Write 01/02/2003:", add_special_tokens=False)
    completion = hf.encode(" February 1, 2003", add_special_tokens=False) + [hf.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_chat_renders_with_the_template_and_trains_on_assistant_turns_only(tokenizers):
    ours, hf = tokenizers
    messages = [{"role": "user", "content": "Write 01/02/2003 in words."},
                {"role": "assistant", "content": "February 1, 2003"},
                {"role": "user", "content": "And 05/06/2007?"},
                {"role": "assistant", "content": "June 5, 2007"}]  # fmt: skip
    ex = encode_record({"messages": messages}, ours)
    assert ex.input_ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    # The unmasked tokens are exactly the assistant turns, each with its end-of-turn marker.
    runs, current = [], []
    for tok, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok
            current.append(tok)
    runs.append(current)
    assert [hf.decode(r) for r in runs] == ["February 1, 2003<|im_end|>\n", "June 5, 2007<|im_end|>\n"]


def test_chat_opening_with_an_assistant_turn_trains_on_its_content_only(tokenizers):
    """The template writes a default system prompt and the role header before a first assistant turn: neither is
    a target (they are not what the model must produce)."""
    ours, hf = tokenizers
    messages = [{"role": "assistant", "content": "Hello, which date?"}, {"role": "user", "content": "01/02/2003"},
                {"role": "assistant", "content": "February 1, 2003"}]  # fmt: skip
    ex = encode_record({"messages": messages}, ours)
    assert ex.input_ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    runs, current = [], []
    for tok, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE_INDEX:
            current.append(tok)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [hf.decode(r) for r in runs] == ["Hello, which date?<|im_end|>\n", "February 1, 2003<|im_end|>\n"]


def test_text_records_train_on_every_token_and_end_with_eos(tokenizers):
    ours, hf = tokenizers
    ex = encode_record({"text": "the quick brown fox"}, ours)
    assert ex.input_ids == hf.encode("the quick brown fox") + [hf.eos_token_id]
    assert ex.labels == ex.input_ids


def test_load_examples_rejects_records_longer_than_seq_len(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "d.jsonl", date_records(3, seed=0))
    assert len(load_examples(path, tokenizers[0], 128)) == 3
    with pytest.raises(ValueError, match=r"d.jsonl:1: the record has \d+ tokens, more than seq_len=8"):
        load_examples(path, tokenizers[0], 8)


def test_targets_are_the_tokens_the_loss_sees(tmp_path, tokenizers):
    """collate masks every document's first label, so a record whose only target is its first token (an empty
    prompt and completion: just EOS) has nothing to learn and is rejected, not trained on with loss 0."""
    ex = encode_record({"prompt": "", "completion": " May 1"}, tokenizers[0])
    batch = collate([[ex]], pad_id=0, pack=True, seq_len=16)
    assert ex.n_targets == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": ""}])
    with pytest.raises(ValueError, match="no target tokens") as err:
        load_examples(path, tokenizers[0], 128)
    assert f"{path}:2:" in str(err.value)


def test_packed_documents_do_not_attend_to_each_other(tiny_dir, tokenizers):
    """Logits and loss of a packed row equal those of each example run alone (fp32, unquantized model)."""
    from nf4lora.models import load_model

    model = load_model(tiny_dir, quantize=None, compute_dtype=torch.float32)
    examples = [encode_record(r, tokenizers[0]) for r in date_records(5, seed=9)]
    packed = collate([examples[:3], examples[3:]], pad_id=0, pack=True, seq_len=256)
    with torch.no_grad():
        out = model(**packed)
        alone = [model(torch.tensor([e.input_ids])).logits[0] for e in examples]
        loss_alone = [model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in examples]
    for row, docs in ((0, examples[:3]), (1, examples[3:])):
        start = 0
        for d, ex in enumerate(docs):
            n = len(ex.input_ids)
            got = out.logits[row, start : start + n]
            torch.testing.assert_close(got, alone[examples.index(ex)], rtol=1e-5, atol=1e-5)  # fp32
            start += n
    n_targets = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples]
    expected = sum(l * n for l, n in zip(loss_alone, n_targets)) / sum(n_targets)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
