"""Tokenizer against transformers' AutoTokenizer on tokenizers the tests build themselves."""

import io
import json

import pytest

from nf4lora.models import Tokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Héllo wörld — ünïcode ñ. 日本語のテキスト。 Ünïcödé! "
    "Numbers 12345 and 3.14, symbols #@!? (brackets) [x] {y}. Tabs\tand\nnewlines\r\n. It's we're don't. "
    "Emoji 🦙🔥 and    runs of     spaces. "
) * 8
STRINGS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces\tand\t\ttabs",
    "newlines\n\nand\r\nreturns\n",
    "unicode: héllo wörld — 日本語 テキスト 🦙 ñ",
    "digits 1234567890 and 3.14159",
    "special <s> inside </s> text<unk>",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "unseen chars: ℵ ∑ Ω ק",
    "Use x . y , then print ( 'a ' ) ! I 'm sure it 's fine , isn't it ?",  # what a clean-up would change
    "",
    " ",
    "\n",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo? 🦙"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Count to 3."},
]
# A template that exercises what real ones use: loop variables, namespace, tojson, raise_exception, whitespace control.
TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{# {{ ns.n }} messages #}"
)


def _compare(path, strings=STRINGS):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_pretrained(path)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert len(ours) == len(ref)
    for s in strings:
        for special in (True, False):
            ids = ref.encode(s, add_special_tokens=special)
            assert ours.encode(s, add_special_tokens=special) == ids, (s, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (s, skip)
    for gen in (True, False):
        expected = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen) == expected
        expected_ids = ref.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True) == list(expected_ids)
    return ours


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split(". ")), model_writer=out, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path.read_bytes()


@pytest.mark.parametrize(
    "config",
    [
        {"add_bos_token": True, "add_eos_token": False, "legacy": False},
        {"add_bos_token": True, "add_eos_token": True, "legacy": True},
        {"legacy": False, "add_prefix_space": False},  # no add_bos_token: transformers 5 adds no BOS
        {"add_bos_token": True, "legacy": False, "clean_up_tokenization_spaces": True},  # ignored: a BPE model
    ],
    ids=["llama2", "legacy_with_eos", "no_prefix_space", "cleanup_spaces"],
)
def test_sentencepiece_model_matches_transformers(sp_model, tmp_path, config):
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "chat_template": TEMPLATE, **config}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = _compare(tmp_path)
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A GPT-2 style byte-level BPE (SmolLM / Llama-3 family) trained with the tokenizers package."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([CORPUS], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path.read_text()


@pytest.mark.parametrize(
    "config",
    [
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True},
    ],
    ids=["chatml", "cleanup_spaces"],
)  # fmt: skip
def test_tokenizer_json_matches_transformers(bpe_json, tmp_path, config):
    (tmp_path / "tokenizer.json").write_text(bpe_json)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, **config}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    _compare(tmp_path)


def test_tokenizer_json_post_processor_adds_bos(bpe_json, tmp_path):
    """Llama-3 style: tokenizer.json's TemplateProcessing adds BOS (tokenizer_config's add_bos_token is ignored)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_str(bpe_json)
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = _compare(tmp_path)
    assert ours.encode("hi")[0] == bos


def test_chat_template_from_jinja_file_and_tools(bpe_json, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_text(bpe_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    tools = [{"type": "function", "function": {"name": "f", "description": "ünï", "parameters": {}}}]
    ref = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(CHAT, tools=tools, tokenize=False)
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(CHAT, tools=tools) == ref


def test_save_pretrained_round_trip(bpe_json, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text(bpe_json)
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(cfg))
    a = Tokenizer.from_pretrained(tmp_path / "a")
    a.save_pretrained(tmp_path / "b")
    b = _compare(tmp_path / "b")
    for s in STRINGS:
        assert b.encode(s) == a.encode(s)


def test_errors(bpe_json, sp_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizers file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(bpe_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == len(tok) - 1  # a new special token, as transformers adds it
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(CHAT)
    with pytest.raises(TypeError, match="text must be a str"):
        Tokenizer.from_pretrained(tmp_path).encode(["a"])
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(b"\x0a\x05garbage-not-protobuf")
    with pytest.raises(ValueError, match="tokenizer.model: not a valid sentencepiece model"):
        Tokenizer.from_pretrained(sp_dir)
