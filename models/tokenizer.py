"""Tokenizer: a Hugging Face tokenizer directory (tokenizer.json or sentencepiece tokenizer.model, plus
tokenizer_config.json) with encode / decode, special tokens and the Jinja chat template.

Encoding runs through the `tokenizers` package in both cases and follows transformers 5's conventions (a
tokenizer.json's own post-processor decides BOS/EOS; a sentencepiece model becomes a byte-fallback BPE pipeline
whose BOS/EOS follow add_bos_token / add_eos_token), so ids equal those of transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from .sentencepiece_bpe import tokenizer_from_sentencepiece

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' clean_up_tokenization: spaces that word-level detokenisation leaves before punctuation.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class Tokenizer:
    def __init__(self, backend: Backend, config: dict | None = None, chat_template: str | None = None):
        config = dict(config or {})
        self.backend = backend
        self.chat_template = chat_template if chat_template is not None else config.get("chat_template")
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_KEYS:
            value = config.get(key)
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if value is not None:
                self.special_tokens[key] = value
        # Special tokens named in the config are matched whole in text and never split, as in transformers.
        missing = [t for t in self.special_tokens.values() if t not in _added_contents(backend)]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        for key, value in self.special_tokens.items():
            if backend.token_to_id(value) is None:
                raise ValueError(f"{key} {value!r} is not in the vocabulary")
        # Whether decode cleans up spaces. transformers 5 skips the clean-up for BPE models (it deletes real spaces
        # before punctuation there) unless this long-named key forces it.
        force = config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE" or bool(force)
        )

    def set_bos_eos(self, add_bos: bool, add_eos: bool) -> None:
        """Make encode(add_special_tokens=True) add BOS and/or EOS (a TemplateProcessing post-processor)."""
        add_bos = add_bos and self.bos_token is not None
        add_eos = add_eos and self.eos_token is not None

        def sequence(name: str, type_id: int) -> list[str]:
            bos, eos = [f"{self.bos_token}:{type_id}"] * add_bos, [f"{self.eos_token}:{type_id}"] * add_eos
            return bos + [f"${name}:{type_id}"] + eos

        special = [(t, self.backend.token_to_id(t)) for t, on in ((self.bos_token, add_bos), (self.eos_token, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1), special_tokens=special
        )

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json (preferred, as transformers does) or tokenizer.model, and tokenizer_config.json."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer path {path!r} is not a directory")
        config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        special_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
        for key in SPECIAL_KEYS:
            if config.get(key) is None and special_map.get(key) is not None:
                config[key] = special_map[key]
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")  # transformers 5 saves the template here
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        json_file, sp_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        if os.path.isfile(json_file):
            try:
                backend = Backend.from_file(json_file)
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise ValueError(f"{json_file}: not a valid tokenizers file: {e}") from None
        elif os.path.isfile(sp_file):
            if config.get("add_prefix_space", True) is False:
                scheme = "never"
            else:
                scheme = "always" if config.get("legacy", False) else "first"
            backend = tokenizer_from_sentencepiece(sp_file, scheme)
            for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
                if config.get(key) is None and backend.token_to_id(default) is not None:
                    config[key] = default
            tok = cls(backend, config, template)
            # As transformers 5: BOS/EOS only if tokenizer_config.json asks (LLaMA's configs set add_bos_token).
            tok.set_bos_eos(bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False)))
            return tok
        else:
            raise FileNotFoundError(f"no tokenizer in {path!r}: expected tokenizer.json or tokenizer.model")
        # tokenizer.json carries its own post-processor (BOS/EOS); transformers 5 keeps it whatever
        # add_bos_token / add_eos_token in tokenizer_config.json say, and so do we.
        return cls(backend, config, template)

    # -- special tokens ------------------------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- text <-> ids --------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS/EOS as the tokenizer's config asks."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    # -- chat ----------------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False, tools=None, **kwargs
    ):
        """Render `messages` ([{"role": ..., "content": ...}]) with the tokenizer's Jinja chat template.

        Returns the text, or its ids (encoded without adding BOS/EOS: the template writes them) if `tokenize`.
        Extra keyword arguments are passed to the template, as transformers does.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError(f"messages must be a list of dicts, got {messages!r:.100}")
        text = _compile(self.chat_template).render(
            messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )  # fmt: skip
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (atomically) into `out_dir`."""
        from .config import write_json_atomic
        from .output_dir import write_file_atomic

        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        write_file_atomic(os.path.join(out_dir, "tokenizer.json"), self.backend.save)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}  # fmt: skip
        if self.chat_template:
            config["chat_template"] = self.chat_template
        write_json_atomic(os.path.join(out_dir, "tokenizer_config.json"), config)


def _added_contents(backend: Backend) -> set[str]:
    return {t.content for t in backend.get_added_tokens_decoder().values()}


def _read_json(file: str):
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from None


_TEMPLATES: dict[str, object] = {}


def _compile(source: str):
    """A Jinja template in the sandboxed environment transformers renders chat templates in."""
    if source in _TEMPLATES:
        return _TEMPLATES[source]
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering keeps the body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = env.from_string(source)
    _TEMPLATES[source] = template
    return template
