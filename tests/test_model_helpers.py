"""Shared builders for the model / loading / generation tests: tiny Hugging Face LLaMA configs and models.

Not a test module (no tests here): imported by tests/test_model*.py, test_load*.py, test_generate*.py, test_gguf*.py.
"""

from __future__ import annotations

import json

import torch

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> dict:
    """A config.json-style dict of a tiny LLaMA (hidden 64, 2 layers, GQA 4/2) with `overrides` applied."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY, **overrides}
    return {k: v for k, v in d.items() if v is not None}


def hf_model(config: dict, seed: int = 0):
    """transformers' model of config["model_type"] (LlamaForCausalLM when absent) in float32 with random weights
    (biases and norms too, so they matter)."""
    import transformers

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cfg = transformers.AutoConfig.for_model(config.get("model_type", "llama"), **kwargs)
    cfg._attn_implementation = "eager"  # the plainest reference: explicit softmax(QK^T)V
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model


def hf_4bit_model(path, **bnb_kwargs):
    """transformers + bitsandbytes 4-bit model of the checkpoint at `path` (float32 compute) on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes' eval-mode Linear4bit repacks the weight and multiplies in bfloat16
    (error ~1e-2); it is switched to its portable fp32 path, the specification we compare against."""
    import transformers

    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **bnb_kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    ).eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def our_model_from_hf(hf, config: dict):
    """Our LlamaForCausalLM with the HF model's weights, copied through the state dict (names must match)."""
    from nf4lora.models import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not missing, missing
    assert set(unexpected) <= {"lm_head.weight"}, unexpected
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(path, vocab_size: int = 96, split_regex: str | None = None,
                         text: str = "hello world, hi there. digits 12345 ") -> dict:  # fmt: skip
    """Write a tiny GPT-2 style byte-level BPE (SmolLM-like: digits split, ChatML specials), trained on `text`, into
    `path` (tokenizer.json + tokenizer_config.json) and return the tokenizer.json object. With `split_regex` the
    text is split by that regex instead, then byte-level encoded (Llama-3 / Qwen2 style)."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    if split_regex is None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        split = pre_tokenizers.Split(Regex(split_regex), "isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:60], show_progress=False)  # fmt: skip
    # (sorted: alphabet() comes from a hash set in arbitrary order, which made the vocabulary differ between runs)
    tok.train_from_iterator([text * 20], trainer)
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return json.loads((path / "tokenizer.json").read_text())
