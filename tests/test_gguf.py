"""GGUF import: GGUF files written here with gguf.GGUFWriter from tiny HF models convert back to the original."""

import io
import json
import os

import numpy as np
import pytest
import torch
from reference_packages import require
from test_model_helpers import CHAT_TEMPLATE as TEMPLATE
from test_model_helpers import byte_level_tokenizer, hf_model, tiny_config

from nf4lora.models import LlamaConfig, Tokenizer, convert_gguf, load_model

gguf = require("gguf")
Q = gguf.GGMLQuantizationType
STRINGS = ["Hello world", " two  spaces", "digits 12345, 3.14", "ünïcödé 日本語 🦙", "<|im_start|>user\nhi<|im_end|>\n", ""]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}  # fmt: skip
# Qwen2's pre-tokenizer regex, as its tokenizer.json has it (llama.cpp's "qwen2")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")


def _llama_cpp_order(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, HF row j goes to 2j and row j + head_dim/2 to 2j + 1."""
    hd = w.shape[0] // n_heads
    rows = [h * hd + i // 2 + (i % 2) * (hd // 2) for h in range(n_heads) for i in range(hd)]
    return w[rows]


def _write_gguf(file, hf, config, tok_json=None, sp_pieces=None, weight_type=Q.F32, arch="llama", pre="smollm",
                extra_tensors=None, drop=(), eot=None):  # fmt: skip
    w = gguf.GGUFWriter(str(file), arch)
    c = config
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c.get("rope_theta", 10000.0))
    w.add_vocab_size(c["vocab_size"])
    if tok_json is not None:
        vocab = sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])
        special = {t["content"] for t in tok_json["added_tokens"]}
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t in special else 1 for t, _ in vocab])
        w.add_token_merges(merges)
        w.add_bos_token_id(dict(vocab)["<|im_start|>"])
        w.add_eos_token_id(dict(vocab)["<|im_end|>"])
        w.add_pad_token_id(dict(vocab)["<|endoftext|>"])
        if eot is not None:
            w.add_eot_token_id(dict(vocab)[eot])
        w.add_add_bos_token(False)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list([p for p, _, _ in sp_pieces])
        w.add_token_scores([s for _, s, _ in sp_pieces])
        w.add_token_types([k for _, _, k in sp_pieces])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)
    w.add_chat_template(TEMPLATE)

    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.get("tie_word_embeddings"):
            continue
        t = t.detach().float()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{i}.{LAYER[module]}.{suffix}"
            if arch == "llama" and module == "self_attn.q_proj":  # Qwen keeps HF's order (NEOX RoPE)
                t = _llama_cpp_order(t, heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                t = _llama_cpp_order(t, kv_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]  # fmt: skip
        if gname in drop:
            continue
        arr = t.numpy()
        if t.dim() == 2 and weight_type != Q.F32:  # llama.cpp keeps 1-D tensors (norms, biases) in F32
            w.add_tensor(gname, gguf.quants.quantize(arr, weight_type), raw_dtype=weight_type)
        else:
            w.add_tensor(gname, arr)
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True, "attention_bias": True}, {"num_key_value_heads": 1, "head_dim": 32}],
    ids=["gqa", "tied_bias", "mqa_head_dim"],
)
def test_float32_round_trip_reproduces_logits_and_tokenizer(tmp_path, overrides):
    from transformers import AutoTokenizer
    from transformers import LlamaForCausalLM as HFLlama

    config = tiny_config(**overrides)
    hf = hf_model(config)
    (tmp_path / "orig").mkdir()
    tok_json = byte_level_tokenizer(tmp_path / "orig")
    _write_gguf(tmp_path / "m.gguf", hf, config, tok_json=tok_json)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="float32")

    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_model(out, quantize=None, compute_dtype=torch.float32)
    reloaded = HFLlama.from_pretrained(out, dtype=torch.float32).eval()  # transformers reads what we wrote
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(ids).logits, ref, atol=1e-5, rtol=0)
    assert LlamaConfig.from_pretrained(out).tie_word_embeddings == bool(overrides.get("tie_word_embeddings"))

    original, converted = AutoTokenizer.from_pretrained(tmp_path / "orig"), Tokenizer.from_pretrained(out)
    for s in STRINGS:
        assert converted.encode(s) == original.encode(s), s
        assert AutoTokenizer.from_pretrained(out).encode(s) == original.encode(s), s
    assert converted.eos_token == "<|im_end|>" and converted.pad_token == "<|endoftext|>"
    assert converted.apply_chat_template(CHAT, add_generation_prompt=True) == original.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == converted.eos_token_id


QWEN = {
    "qwen2": tiny_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1e6),
    "qwen3": tiny_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, attention_bias=True,
                         tie_word_embeddings=True),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_round_trip_reproduces_logits_and_its_tokenizer(tmp_path, arch):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, head_dim 32) files: no q/k reordering, the family's config.json,
    and Qwen2's pre-tokenizer (pre "qwen2")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = QWEN[arch]
    hf = hf_model(config)
    (tmp_path / "orig").mkdir()
    # punctuation glued to words, which only Qwen2's regex keeps together ("(hello", ".hi")
    text = "(hello) [world] 'hi' there.hi,hello ok. digits 12345 "
    tok_json = byte_level_tokenizer(tmp_path / "orig", split_regex=QWEN2_REGEX, text=text)
    _write_gguf(tmp_path / "m.gguf", hf, config, tok_json=tok_json, arch=arch, pre="qwen2")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="float32")
    assert LlamaConfig.from_pretrained(out).model_type == arch
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(load_model(out, quantize=None, compute_dtype=torch.float32)(ids).logits, ref,
                                   atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(reloaded(ids).logits, ref, atol=1e-5, rtol=0)
    original, converted = AutoTokenizer.from_pretrained(tmp_path / "orig"), Tokenizer.from_pretrained(out)
    for s in STRINGS + [text, "it's 2024, (hello) they'll pay 1,000,000!"]:
        assert converted.encode(s) == original.encode(s), s


def test_gemma_and_phi3_files_are_refused_saying_why(tmp_path, tiny_gguf_args):
    hf, config, tok_json = tiny_gguf_args
    for arch, why in (("gemma2", "norm weights plus one"), ("gemma3", "layer pattern"), ("phi3", "not implemented")):
        _write_gguf(tmp_path / f"{arch}.gguf", hf, config, tok_json=tok_json, arch=arch)
        with pytest.raises(ValueError, match=rf"general\.architecture '{arch}' is not supported \(.*{why}.*Hugging Face"):
            convert_gguf(tmp_path / f"{arch}.gguf", tmp_path / arch)


def test_end_of_turn_token_becomes_a_stop_id(tmp_path):
    """A GGUF's EOT id (Llama-3's <|eot_id|>) is listed with EOS in generation_config.json, where generate stops."""
    from nf4lora.models.generate import stop_token_ids

    config = tiny_config()
    (tmp_path / "orig").mkdir()
    tok_json = byte_level_tokenizer(tmp_path / "orig")
    _write_gguf(tmp_path / "m.gguf", hf_model(config), config, tok_json=tok_json, eot="<|endoftext|>")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="float32")
    tok = Tokenizer.from_pretrained(out)
    eot = tok.token_to_id("<|endoftext|>")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_token_id, eot]
    assert eot in stop_token_ids(out, LlamaConfig.from_pretrained(out), tok)


# Worst-case absolute error of each format relative to the tensor's max |w|: half a step for Q8_0 (step max/127)
# and Q4_1 (step (max - min)/15); Q4_0 maps max to -8 * d, so the other sign reaches only 7/8 of it and can be off
# by max/8. FP16 = 2**-11 relative rounding of the block scales (and Q4_1's minimum) adds up to 1e-3 * max.
SCALE_ROUNDING = 1e-3
BOUNDS = {Q.F16: 2**-11, Q.BF16: 2**-8, Q.Q8_0: 0.5 / 127 + SCALE_ROUNDING, Q.Q4_0: 1 / 8 + SCALE_ROUNDING,
          Q.Q4_1: 1 / 15 + SCALE_ROUNDING}  # fmt: skip


@pytest.mark.parametrize("weight_type", list(BOUNDS), ids=lambda t: t.name)
def test_quantized_weights_dequantize_into_place(tmp_path, weight_type):
    """Each converted matrix is within its format's rounding bound of the original: a wrong layout (transpose,
    q/k order, block order) would be off by O(max |w|)."""
    config = tiny_config(intermediate_size=128)  # rows must be whole 32-element blocks
    hf = hf_model(config)
    (tmp_path / "orig").mkdir()
    _write_gguf(tmp_path / "m.gguf", hf, config, tok_json=byte_level_tokenizer(tmp_path / "orig"), weight_type=weight_type)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="float32")
    ours = load_model(out, quantize=None, compute_dtype=torch.float32).state_dict()
    for name, ref in hf.state_dict().items():
        err = (ours[name] - ref).abs().max().item()
        assert err <= BOUNDS[weight_type] * ref.abs().max().item() + 1e-7, (name, err)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    config = tiny_config(rope_theta=500000.0)
    hf = hf_model(config)
    hfc = HFConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "rope_theta")},
                   rope_parameters={"rope_theta": 500000.0, **scaling})  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hfc)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = {"rope_freqs.weight": (plain / scaled).numpy().astype(np.float32)}  # what llama.cpp stores
    (tmp_path / "orig").mkdir()
    _write_gguf(tmp_path / "m.gguf", hf, config, tok_json=byte_level_tokenizer(tmp_path / "orig"), extra_tensors=freqs)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="float32")
    assert LlamaConfig.from_pretrained(out).rope_scaling == scaling


def test_sentencepiece_vocabulary_converts_like_transformers(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from nf4lora.models.sentencepiece_bpe import read_sentencepiece_model

    buf = io.BytesIO()
    text = "The quick brown fox, 12 lazy dogs. Héllo wörld ñ 日本. " * 10
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split(". ")), model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "legacy": False,
           "add_bos_token": True}  # fmt: skip
    (tmp_path / "orig" / "tokenizer_config.json").write_text(json.dumps(cfg))
    pieces, _ = read_sentencepiece_model(str(tmp_path / "orig" / "tokenizer.model"))

    config = tiny_config(vocab_size=len(pieces))
    _write_gguf(tmp_path / "m.gguf", hf_model(config), config, sp_pieces=pieces)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="float32")
    ref, ours = AutoTokenizer.from_pretrained(tmp_path / "orig"), Tokenizer.from_pretrained(out)
    for s in STRINGS + ["  leading spaces", "x\ny"]:
        ids = ref.encode(s)
        assert ours.encode(s) == ids, s
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), s


@pytest.fixture
def tiny_gguf_args(tmp_path):
    config = tiny_config()
    (tmp_path / "orig").mkdir()
    return hf_model(config), config, byte_level_tokenizer(tmp_path / "orig")


def test_errors_name_the_file_and_key(tmp_path, tiny_gguf_args):
    hf, config, tok_json = tiny_gguf_args
    bad = tmp_path / "arch.gguf"
    _write_gguf(bad, hf, config, tok_json=tok_json, arch="gptneox")
    with pytest.raises(ValueError, match=r"arch\.gguf: general\.architecture 'gptneox' is not supported"):
        convert_gguf(bad, tmp_path / "o1")
    missing = tmp_path / "missing.gguf"
    _write_gguf(missing, hf, config, tok_json=tok_json, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing\.gguf: missing tensors for \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        convert_gguf(missing, tmp_path / "o2")
    pre = tmp_path / "pre.gguf"
    _write_gguf(pre, hf, config, tok_json=tok_json, pre="made-up")
    with pytest.raises(ValueError, match=r"pre\.gguf: tokenizer\.ggml\.pre 'made-up' is not supported"):
        convert_gguf(pre, tmp_path / "o3")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        convert_gguf(junk, tmp_path / "o4")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "o5")
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_gguf(bad, tmp_path / "o6", dtype="int8")


def test_convert_gguf_command(tmp_path, tiny_gguf_args, capsys):
    import argparse

    from nf4lora.models.cli import add_convert_gguf_parser

    hf, config, tok_json = tiny_gguf_args
    _write_gguf(tmp_path / "m.gguf", hf, config, tok_json=tok_json)
    parser = argparse.ArgumentParser()
    add_convert_gguf_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float32"])
    args.func(args)
    assert "model.safetensors" in capsys.readouterr().out
    ids = torch.randint(0, config["vocab_size"], (1, 9))
    with torch.no_grad():
        got = load_model(tmp_path / "out", quantize=None, compute_dtype=torch.float32)(ids).logits
        torch.testing.assert_close(got, hf(ids).logits, atol=1e-5, rtol=0)


def test_convert_gguf_output_is_replaced_whole_and_only_when_allowed(tmp_path, tiny_gguf_args, capsys):
    """The output is built beside out_dir and swapped in: files of an earlier output never survive, a non-empty
    out_dir needs --overwrite (and must hold a checkpoint), a file or the GGUF's own folder is refused."""
    from nf4lora.train.cli import main

    hf, config, tok_json = tiny_gguf_args
    gguf = str(tmp_path / "m.gguf")
    _write_gguf(gguf, hf, config, tok_json=tok_json)
    out = tmp_path / "out"
    out.mkdir()
    stale = {"config.json": "{}", "chat_template.jinja": "OLD", "tokenizer.model": "old sentencepiece"}
    for name, text in stale.items():
        (out / name).write_text(text)

    assert main(["convert-gguf", gguf, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nf4lora: error: out_dir={str(out)!r} is not empty") and "--overwrite" in err
    assert {name: (out / name).read_text() for name in os.listdir(out)} == stale

    assert main(["convert-gguf", gguf, str(out), "--dtype", "float32", "--overwrite"]) == 0
    written = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert set(os.listdir(out)) == written
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "orig", "out"]  # no temporary directory left behind
    capsys.readouterr()

    (tmp_path / "a-file").write_text("x")
    for target, says in [(tmp_path / "a-file", "exists and is not a directory"),
                         (tmp_path / "a-file" / "sub", "cannot create a directory"),
                         (tmp_path, "contains gguf=")]:  # fmt: skip
        assert main(["convert-gguf", gguf, str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nf4lora: error: out_dir={str(target)!r}") and says in err, err
    assert (tmp_path / "a-file").read_text() == "x"


def test_failed_conversion_leaves_out_dir_as_it_was(tmp_path, tiny_gguf_args):
    hf, config, tok_json = tiny_gguf_args
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    _write_gguf(good, hf, config, tok_json=tok_json)
    _write_gguf(bad, hf, config, tok_json=tok_json, drop=("blk.1.ffn_up.weight",))
    out = convert_gguf(good, tmp_path / "hf", dtype="float32")
    before = {name: (tmp_path / "hf" / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(ValueError, match="missing tensors"):
        convert_gguf(bad, out, overwrite=True)
    assert {name: (tmp_path / "hf" / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf", "good.gguf", "hf", "orig"]


def test_the_built_in_model_cache_recovers_from_a_leftover(tmp_path, monkeypatch):
    """A cache folder without config.json (left by an older, interrupted conversion) is converted again, not
    refused: it is nf4lora's own cache."""
    from nf4lora.train import resources

    config = tiny_config()
    (tmp_path / "orig").mkdir()
    _write_gguf(tmp_path / "m.gguf", hf_model(config), config, tok_json=byte_level_tokenizer(tmp_path / "orig"))
    monkeypatch.setenv("NF4LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(resources, "default_gguf_path", lambda: str(tmp_path / "m.gguf"))
    leftover = tmp_path / "cache" / resources.DEFAULT_MODEL_NAME
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half written")
    target = resources.default_model_dir()
    assert target == str(leftover) and LlamaConfig.from_pretrained(target).vocab_size == config["vocab_size"]
    assert resources.default_model_dir() == target  # converted once
