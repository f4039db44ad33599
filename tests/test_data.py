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
    s1 = DataStream(examples, micro_batch_size=3, seq_len=24, pack=pack, pad_id=0, seed=7)
    n = s1.batches_per_epoch(0)
    epoch0 = [next(s1) for _ in range(n)]
    assert s1.state_dict()["epoch"] == 1 and s1.state_dict()["index"] == 0
    seen = []
    for batch in epoch0:
        key = "doc_ids" if pack else "attention_mask"
        for row, ids in zip(batch[key], batch["input_ids"]):
            for d in sorted(set(row.tolist()) - ({-1} if pack else {0})):
                seen.append(tuple(ids[row == d].tolist()))
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)
    s2 = DataStream(examples, 3, 24, pack, 0, seed=7)
    assert all(torch.equal(x["input_ids"], next(s2)["input_ids"]) for x in epoch0)
    s3 = DataStream(examples, 3, 24, pack, 0, seed=8)
    assert any(not torch.equal(x["input_ids"], next(s3)["input_ids"]) for x in epoch0)
    assert not torch.equal(next(s1)["input_ids"], epoch0[0]["input_ids"])  # a new epoch reshuffles


def test_stream_resumes_mid_epoch_with_the_same_order():
    examples = _examples(40)
    full = DataStream(examples, 2, 30, True, 0, seed=3)
    reference = [next(full)["input_ids"] for _ in range(15)]
    first = DataStream(examples, 2, 30, True, 0, seed=3)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = DataStream(examples, 2, 30, True, 0, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["input_ids"], ref) for ref in reference[6:])
    with pytest.raises(ValueError, match="seed"):
        DataStream(examples, 2, 30, True, 0, seed=4).load_state_dict(state)


def test_validation_split_is_seeded_and_disjoint():
    examples = _examples(50)
    train, val = split_validation(examples, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert {id(e) for e in train}.isdisjoint({id(e) for e in val})
    assert [id(e) for e in split_validation(examples, 0.2, seed=1)[1]] == [id(e) for e in val]
    assert [id(e) for e in split_validation(examples, 0.2, seed=2)[1]] != [id(e) for e in val]
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(examples, 1.0, seed=1)
