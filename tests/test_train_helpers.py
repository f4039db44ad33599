"""Shared builders for the training tests: a tiny LLaMA checkpoint directory with a real byte-level BPE tokenizer
(tokenizer.json + a ChatML chat template, as SmolLM2 ships) and small JSONL datasets.

Not a test module (no tests here): imported by tests/test_data*.py, test_train*.py, test_cli*.py.
"""

from __future__ import annotations

import json
import os
import random

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip


def date_records(n: int, seed: int) -> list[dict]:
    """Chat records of the bundled task's shape, generated here (tests never read the bundled files' content)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1950, 2049)
        out.append({"messages": [{"role": "user", "content": f"Write the date {d:02d}/{m:02d}/{y} in words."},
                                 {"role": "assistant", "content": f"{MONTHS[m - 1]} {d}, {y}"}]})  # fmt: skip
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_metrics(output_dir) -> list[dict]:
    """A run's metrics.jsonl, one dict per optimizer step."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_tiny_run(root, n_records: int, seed: int) -> tuple:
    """(root, tiny model directory, JSONL of n_records date examples) under root: what a training test runs on."""
    return root, write_tiny_model(root / "model"), write_jsonl(root / "train.jsonl", date_records(n_records, seed))


def write_tokenizer(out_dir, vocab_size: int = 300) -> None:
    """Train a byte-level BPE on a little text and save it the way Hugging Face model repos ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for r in date_records(300, seed=123)] + ["the quick brown fox jumps over the lazy dog"] * 5
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
                   "model_max_length": 128, "chat_template": CHAT_TEMPLATE}, f)  # fmt: skip


def write_tiny_model(out_dir, seed: int = 0, vocab_size: int = 320, **overrides) -> str:
    """A tiny LLaMA checkpoint directory (hidden 64, 2 layers, GQA 4/2, tied embeddings) with its tokenizer.

    Built with nf4lora's own model class and written as Hugging Face files (config.json + model.safetensors),
    so the tests that only train need not import transformers; the tests that compare with transformers load
    these same files with it."""
    from safetensors.torch import save_file

    from nf4lora.models import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(out_dir)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               pad_token_id=2)  # fmt: skip
    cfg.update(overrides)
    config = LlamaConfig.from_dict(cfg)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    tied = config.tie_word_embeddings
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    return str(out_dir)
