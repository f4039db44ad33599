"""Our LlamaForCausalLM against transformers' LlamaForCausalLM built from the same tiny configs and weights."""

import pytest
import torch
from test_model_helpers import hf_model, our_model_from_hf, tiny_config

from nf4lora.models import LlamaConfig, LlamaForCausalLM

ATOL_FP32 = 1e-4  # logits are O(1); fp32 reassociation between SDPA and HF's eager attention stays far below

CONFIGS = {
    "gqa_untied": tiny_config(),
    "mha_tied": tiny_config(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_head_dim_48": tiny_config(num_key_value_heads=1, head_dim=48),  # head_dim != hidden / heads (16)
    "attention_and_mlp_bias": tiny_config(attention_bias=True, mlp_bias=True),
    "llama3_old_style": tiny_config(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
    "llama3_rope_parameters": {
        **{k: v for k, v in tiny_config().items() if k != "rope_theta"},
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    },
    "linear_scaling": tiny_config(rope_scaling={"type": "linear", "factor": 2.0}),
    # 20 positions against a window of 8: every query past the 8th loses keys (transformers' Mistral masks them).
    "mistral_sliding_window": tiny_config(architectures=["MistralForCausalLM"], model_type="mistral",
                                          sliding_window=8),
    "rope_parameters_default": {
        **{k: v for k, v in tiny_config().items() if k != "rope_theta"},
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0},
    },
}  # fmt: skip


def _inputs(config, B=2, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["vocab_size"], (B, T), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_transformers(name):
    config = CONFIGS[name]
    hf = hf_model(config)
    ours = our_model_from_hf(hf, config)
    ids = _inputs(config)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt masking: ignored positions must not count
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels)
        out = ours(ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_config_reads_both_rope_styles_to_the_same_frequencies():
    old = LlamaConfig.from_dict(CONFIGS["llama3_old_style"])
    new = LlamaConfig.from_dict(CONFIGS["llama3_rope_parameters"])
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta == 500000.0
    assert LlamaConfig.from_dict(CONFIGS["rope_parameters_default"]).rope_theta == 1000.0


def test_padding_mask_matches_transformers():
    config = CONFIGS["gqa_untied"]
    hf = hf_model(config)
    ours = our_model_from_hf(hf, config)
    ids = _inputs(config)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding of the second row
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(out[1, :14], ref[1, :14], atol=ATOL_FP32, rtol=0)


def test_packed_documents_equal_separate_sequences():
    """doc_ids: each packed document gives the logits it gives alone (no cross-document attention)."""
    config = CONFIGS["gqa_untied"]
    ours = our_model_from_hf(hf_model(config), config)
    a, b = _inputs(config, B=1, T=7, seed=2), _inputs(config, B=1, T=9, seed=3)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = ours(packed, doc_ids=doc_ids).logits
        la, lb = ours(a).logits, ours(b).logits
    torch.testing.assert_close(out[:, :7], la, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(out[:, 7:], lb, atol=ATOL_FP32, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = CONFIGS["attention_and_mlp_bias"]
    ours = our_model_from_hf(hf_model(config), config).train()
    ids = _inputs(config)

    def grads(checkpointing):
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing = checkpointing
        ours(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable_head", "frozen_head"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_matches_the_full_loss_and_gradients(chunk, frozen_head):
    """loss_chunk_tokens: same loss and gradients as the full-logits loss (and transformers' loss), no logits kept.

    A trainable head takes the checkpointed path; a frozen one (QLoRA) the fused one that computes dL/dh forward.
    """
    config = CONFIGS["mha_tied"]
    hf = hf_model(config)
    ours = our_model_from_hf(hf, config).train()
    ours.lm_head.weight.requires_grad_(not frozen_head)  # tied: freezes the embeddings too
    ids = _inputs(config)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt

    def run(chunk_tokens):
        ours.zero_grad(set_to_none=True)
        ours.loss_chunk_tokens = chunk_tokens
        out = ours(ids, labels=labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}

    (full, full_grads), (chunked, chunked_grads) = run(0), run(chunk)
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.loss, hf(ids, labels=labels).loss, atol=1e-5, rtol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) > 0
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # outside training with grad, logits come back as usual
        assert ours(ids, labels=labels).logits is not None


def test_chunked_loss_under_bf16_autocast():
    """The fused frozen-head path computes the head in the autocast dtype, like the full path: bf16 tolerance."""
    config = CONFIGS["mha_tied"]
    ours = our_model_from_hf(hf_model(config), config).train()
    ours.lm_head.weight.requires_grad_(False)
    ids = _inputs(config)
    losses, grads = [], []
    for chunk_tokens in (0, 7):
        ours.zero_grad(set_to_none=True)
        ours.loss_chunk_tokens = chunk_tokens
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ours(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append(ours.model.layers[0].mlp.down_proj.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], atol=2e-3, rtol=2e-3)  # bf16 logits, float32 sums
    torch.testing.assert_close(grads[1], grads[0], atol=2e-2, rtol=5e-2)


def test_checkpointing_recomputes_blocks_in_backward():
    """With checkpointing on, each block's forward runs twice per step (forward + recompute)."""
    config = CONFIGS["gqa_untied"]
    ours = LlamaForCausalLM(LlamaConfig.from_dict(config)).train()
    calls = []
    ours.model.layers[0].mlp.gate_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    ours.gradient_checkpointing = True
    ours(_inputs(config), labels=_inputs(config)).loss.backward()
    assert len(calls) == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"model_type": "gpt_neox"}, "gpt_neox"),
        ({"num_attention_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_config_refuses_what_it_cannot_run(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict(tiny_config(**overrides), source="cfg.json")


def test_mistral_window_defaults_as_in_transformers_and_survives_a_round_trip(tmp_path):
    mistral = tiny_config(architectures=["MistralForCausalLM"], model_type="mistral")
    assert LlamaConfig.from_dict(mistral).sliding_window == 4096  # MistralConfig's default for a missing key
    assert LlamaConfig.from_dict({**mistral, "sliding_window": None}).sliding_window is None
    assert LlamaConfig.from_dict(tiny_config(sliding_window=8)).sliding_window is None  # Llama ignores the key
    config = LlamaConfig.from_dict(CONFIGS["mistral_sliding_window"])
    config.save_pretrained(tmp_path)
    assert LlamaConfig.from_pretrained(tmp_path) == config
    assert (tmp_path / "config.json").read_text().count('"mistral"') == 1


def test_attention_dropout_acts_in_training_only():
    config = tiny_config(attention_dropout=0.5)
    ours = our_model_from_hf(hf_model(config), config)
    ids = _inputs(config)
    with torch.no_grad():
        eval_logits = ours(ids).logits
        ours.train()
        first, second = ours(ids).logits, ours(ids).logits
    assert not torch.allclose(first, second)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eval_logits, atol=0, rtol=0)


def test_config_json_round_trip(tmp_path):
    config = LlamaConfig.from_dict(CONFIGS["llama3_rope_parameters"])
    config.save_pretrained(tmp_path)
    again = LlamaConfig.from_pretrained(tmp_path)
    assert again == config
