"""A sentencepiece BPE `tokenizer.model` as a `tokenizers` pipeline, the way transformers 5 runs LLaMA tokenizers.

transformers 5 no longer calls sentencepiece to encode: it rebuilds the model as a byte-fallback BPE whose merges
are derived from the piece order, behind a Metaspace pre-tokenizer. Doing the same here makes our ids equal
transformers' ids (including its handling of leading spaces and special tokens inside the text).

The .model file is a protobuf; we read the three things needed (pieces, their types, the model type) with a
small wire-format reader instead of depending on the protobuf package.
"""

from __future__ import annotations

import struct

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# sentencepiece ModelProto field numbers and enum values (sentencepiece_model.proto)
_PIECES, _TRAINER_SPEC = 1, 2
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE = 3
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def read_sentencepiece_model(path: str) -> tuple[list[tuple[str, float, int]], str]:
    """([(piece, score, type)], model_type) of a sentencepiece .model file."""
    with open(path, "rb") as f:
        data = f.read()
    pieces, model_type = [], "unigram"  # proto default
    try:
        for number, wire, value in _fields(data):
            if number == _PIECES and wire == 2:
                text, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == _PIECE_TEXT and w == 2:
                        text = v.decode("utf-8")
                    elif n == _PIECE_SCORE and w == 5:
                        (score,) = struct.unpack("<f", v)
                    elif n == _PIECE_TYPE and w == 0:
                        kind = v
                pieces.append((text, score, kind))
            elif number == _TRAINER_SPEC and wire == 2:
                for n, w, v in _fields(value):
                    if n == _TRAINER_MODEL_TYPE and w == 0:
                        model_type = MODEL_TYPES.get(v, f"unknown({v})")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid sentencepiece model: {e}") from None
    if not pieces:
        raise ValueError(f"{path}: not a valid sentencepiece model (no pieces)")
    return pieces, model_type


def merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary whose order is its merge order: every split of a piece into two pieces
    of the vocabulary is a merge, ranked by the id of the merged piece, then by the lengths of the parts."""
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((piece_id, len(left), len(right), left, right) for left, right in local)
    merges.sort(key=lambda m: m[:3])  # stable: ties keep the per-piece order above
    return [(left, right) for _, _, _, left, right in merges]


def tokenizer_from_sentencepiece(path: str, prepend_scheme: str = "first") -> Tokenizer:
    """A `tokenizers` Tokenizer equivalent to transformers 5's LlamaTokenizer built from `path`.

    prepend_scheme: "first" (transformers' default, legacy=False), "always" (legacy=True) or "never"
    (add_prefix_space=False). Control pieces become special added tokens, user-defined pieces plain added tokens.
    """
    pieces, model_type = read_sentencepiece_model(path)
    if model_type != "bpe":
        raise ValueError(f"{path}: sentencepiece model type {model_type!r} is not supported; LLaMA models use 'bpe'")
    return tokenizer_from_pieces([(piece, kind) for piece, _, kind in pieces], prepend_scheme)


def tokenizer_from_pieces(pieces: list[tuple[str, int]], prepend_scheme: str = "first") -> Tokenizer:
    """The same pipeline from (piece, sentencepiece type) pairs in id order (also what a llama GGUF stores)."""
    vocab = {}
    for i, (piece, _) in enumerate(pieces):
        vocab.setdefault(piece, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_vocab(vocab), fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    added = [AddedToken(p, special=k == CONTROL, normalized=False) for p, k in pieces if k in (CONTROL, USER_DEFINED)]
    special = [t for t in added if t.special]
    if special:
        tok.add_special_tokens(special)
    plain = [t for t in added if not t.special]
    if plain:
        tok.add_tokens(plain)
    return tok
