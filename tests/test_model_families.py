"""Every native family against transformers' own implementation, from tiny random checkpoints saved here:
Qwen2 (q/k/v biases, sliding layers), Qwen3 (q/k norms, explicit head_dim), Gemma 2 (GeGLU, (1 + w) norms, scaled
embeddings, sandwich norms, both soft-caps, query_pre_attn_scalar, alternating windows), Gemma 3 (two RoPE bases,
linear scaling on the global layers, q/k norms) and Phi-3 (fused projections, a window on every layer; longrope
with partial rotary as Phi-3.5 / Phi-4-mini use it).

For each: fp32 logits and loss, greedy generation through our KV cache, a transformers + bitsandbytes 4-bit save
loaded without requantizing, PEFT adapters both ways, and `train` + `merge` (transformers reads the merged
checkpoint back as the same family). Every case runs past the sliding window (8) and, for longrope, past the
pretraining length (16).
"""

import copy
import dataclasses
import json
import os

import pytest
import torch
from reference_packages import require
from test_model_helpers import hf_4bit_model, hf_model, our_model_from_hf, tiny_config
from test_train_helpers import date_records, write_jsonl, write_tokenizer

from nf4lora.lora import Linear4bit, add_lora, load_adapter, save_adapter
from nf4lora.models import LlamaConfig, generate, load_model

transformers = require("transformers")
peft = require("peft")

WINDOW = 8
LONGROPE_SHORT = 16  # original_max_position_embeddings of the longrope config
FAMILIES = {
    # layers 0-1 global, 2-3 sliding (max_window_layers); untied head
    "qwen2": tiny_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=4,
                         use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, rope_theta=1e6),
    # head_dim 32 != hidden / heads; biases on q/k/v/o
    "qwen3": tiny_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, attention_bias=True,
                         tie_word_embeddings=True),
    # caps small enough to bite on these logits (~2); query_pre_attn_scalar != head_dim
    "gemma2": tiny_config(architectures=["Gemma2ForCausalLM"], model_type="gemma2", num_hidden_layers=4, head_dim=16,
                          query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=1.5,
                          final_logit_softcapping=2.0, tie_word_embeddings=True),
    "gemma3": tiny_config(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=4,
                          head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, sliding_window_pattern=2,
                          rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                          final_logit_softcapping=3.0),
    "phi3": tiny_config(architectures=["Phi3ForCausalLM"], model_type="phi3", sliding_window=WINDOW),
    # rotary_dim 12 of 16 (6 factors each); max_position_embeddings 128 -> factor 8, attention factor 1.32
    "phi3_longrope": tiny_config(architectures=["Phi3ForCausalLM"], model_type="phi3", partial_rotary_factor=0.75,
                                 original_max_position_embeddings=LONGROPE_SHORT, tie_word_embeddings=True,
                                 rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                               "long_factor": [1.0 + 0.5 * i for i in range(6)]}),
}  # fmt: skip
# vocab 320: write_tokenizer's 300 ids fit. intermediate 128: every Linear's input is a multiple of the blocksize (64),
# which bitsandbytes' CPU dequantize needs (README, compatibility notes). pad 0: Phi-3's default (32000) is no id here.
FAMILIES = {name: {**config, "vocab_size": 320, "intermediate_size": 128, "pad_token_id": 0}
            for name, config in FAMILIES.items()}  # fmt: skip
PEFT_TARGETS = {"phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]}  # PEFT's names for Phi-3's layers
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 logits within 1e-5 of the largest one. Only summation order differs (our SDPA against transformers'
    eager attention; against its SDPA they are identical); Gemma 3's deeper norm stack makes that ~5e-6, which
    is also transformers' own error against a float64 run of the same model."""
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, config dict, transformers model, its saved checkpoint directory with a tokenizer)."""
    name = request.param
    config = FAMILIES[name]
    hf = hf_model(config, seed=3)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    write_tokenizer(path)
    return name, config, hf, path


def _ids(B=2, T=20, seed=1):
    return torch.randint(3, 320, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_and_loss_match_transformers(family):
    name, config, hf, path = family
    ours = load_model(path, quantize=None, compute_dtype=torch.float32)
    assert ours.config.model_type == config["model_type"]
    ids = _ids()
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref, out = hf(input_ids=ids, labels=labels), ours(ids, labels=labels)
        short = ours(ids[:, :12]).logits  # under the longrope switch point and the window
        assert_logits_close(short, hf(ids[:, :12]).logits)
    assert_logits_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding of the second row: an explicit mask through every attention path
    with torch.no_grad():
        ref, out = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert_logits_close(out[0], ref[0])
    assert_logits_close(out[1, :14], ref[1, :14])
    # config.json as written by transformers 5 (nested rope_parameters, layer_types) and as given (old style) agree
    raw = dataclasses.replace(LlamaConfig.from_dict(config), torch_dtype="float32")
    assert raw == ours.config


def test_packed_documents_equal_separate_sequences(family):
    """doc_ids (training's packing): each document gives the logits it gives alone, through sliding and global
    layers (the second document is longer than the window) and Gemma 2's soft-capped attention."""
    _, _, _, path = family
    ours = load_model(path, quantize=None, compute_dtype=torch.float32)
    a, b = _ids(B=1, T=7, seed=2), _ids(B=1, T=11, seed=3)
    with torch.no_grad():
        packed = ours(torch.cat([a, b], dim=1), doc_ids=torch.tensor([[0] * 7 + [1] * 11])).logits
        assert_logits_close(packed[:, :7], ours(a).logits)
        assert_logits_close(packed[:, 7:], ours(b).logits)


def test_greedy_generation_with_the_cache_matches_transformers(family):
    """6 prompt tokens + 24 new ones: past the sliding window, and for longrope past the pretraining length (where
    the cache is rebuilt, as transformers' Phi-3 does)."""
    _, _, hf, path = family
    ours = load_model(path, quantize=None, compute_dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # the full length
    hf.generation_config.pad_token_id = 0
    prompt = _ids(T=6, seed=4)
    ref = hf.generate(prompt, max_new_tokens=24, do_sample=False)[:, 6:]
    assert torch.equal(generate(ours, prompt, 24), ref)
    assert torch.equal(generate(ours, prompt, 24, use_cache=False), ref)


@pytest.mark.parametrize("frozen_head", [True, False], ids=["frozen_head", "trainable_head"])
def test_checkpointing_and_chunked_loss_give_the_same_loss_and_gradients(family, frozen_head):
    """Gradient checkpointing and the chunked loss (soft-capped for Gemma 2; the fused path for a frozen head, the
    recomputing one for a trainable head) change nothing but memory."""
    _, _, _, path = family
    ours = load_model(path, quantize=None, compute_dtype=torch.float32).train()
    ours.lm_head.weight.requires_grad_(not frozen_head)
    ids = _ids()

    def run(checkpointing, chunk):
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing, ours.loss_chunk_tokens = checkpointing, chunk
        loss = ours(ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}

    (loss, plain), (other_loss, other) = run(False, 0), run(True, 7)
    torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
    assert plain.keys() == other.keys() and len(plain) > 0
    for key in plain:
        torch.testing.assert_close(other[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)


def test_decoder_kernels_give_the_torch_loss_and_gradients(family, monkeypatch):
    """The model reaches the decoder's Triton kernels through kernels/model_ops.py (NF4LORA_BACKEND=triton runs
    them here in the interpreter, as CUDA would compiled): RMSNorm (Gemma's (1 + w) too), RoPE (partial for
    Phi-3 longrope), SwiGLU/GeGLU and the frozen head's linear + cross-entropy (soft-capped for Gemma 2/3), and
    none of the torch references runs; loss and every gradient equal the torch path's to float32 rounding."""
    from nf4lora.kernels import model_ops

    _, _, _, path = family
    ours = load_model(path, quantize=None, compute_dtype=torch.float32).train()
    ours.lm_head.weight.requires_grad_(False)
    ours.loss_chunk_tokens = 7
    ids = _ids()
    references = ("rms_norm_torch", "apply_rope_torch", "swiglu_torch", "geglu_torch", "linear_cross_entropy_torch")
    called = []
    for name in references:
        original = getattr(model_ops, name)
        monkeypatch.setattr(model_ops, name, lambda *a, _f=original, _n=name, **k: called.append(_n) or _f(*a, **k))
    kernels = model_ops._triton
    monkeypatch.setattr(model_ops, "_triton", lambda module: called.append(module) or kernels(module))

    def run(backend):
        monkeypatch.setenv("NF4LORA_BACKEND", backend)
        ours.zero_grad(set_to_none=True)
        called.clear()
        loss = ours(ids, labels=ids).loss
        loss.backward()
        return loss, {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}, set(called)

    (loss, grads, torch_ops), (k_loss, k_grads, triton_ops) = run("torch"), run("triton")
    assert triton_ops == {"rmsnorm", "rope", "glu", "cross_entropy"}
    assert {"rms_norm_torch", "apply_rope_torch"} <= torch_ops <= set(references)
    torch.testing.assert_close(k_loss, loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == k_grads.keys() and len(grads) > 0
    for key in grads:
        torch.testing.assert_close(k_grads[key], grads[key], atol=1e-5 * float(grads[key].abs().max()), rtol=1e-4,
                                   msg=key)  # fmt: skip


def test_bitsandbytes_4bit_checkpoint_loads_without_requantizing(family, tmp_path, monkeypatch):
    _, config, _, path = family
    hf4 = hf_4bit_model(path, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    hf4.save_pretrained(tmp_path)
    import nf4lora.models.loading as loading

    monkeypatch.setattr(loading, "quantize_4bit", lambda *a, **k: pytest.fail("re-quantized a stored 4-bit weight"))
    ours = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32)
    n_linear = sum(isinstance(m, torch.nn.Linear) and n != "lm_head" for n, m in hf4.named_modules())
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == n_linear > 0
    ids = _ids()
    with torch.no_grad():
        # both dequantize the same codes exactly and multiply in float32: only summation order differs
        torch.testing.assert_close(ours(ids).logits, hf4(ids).logits, atol=1e-4, rtol=1e-4)


def test_peft_adapter_loads_in_ours_and_ours_in_peft(family, tmp_path):
    """(a) PEFT's all-linear LoRA on transformers' model, saved, loaded into ours; (b) ours saved, loaded by PEFT.
    Both wrap the same layers under the same names (Phi-3: the fused qkv_proj and gate_up_proj)."""
    name, config, hf, path = family
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                           task_type="CAUSAL_LM")  # fmt: skip
    ref = peft.get_peft_model(copy.deepcopy(hf), lora).eval()
    ref.save_pretrained(tmp_path / "peft")
    peft_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A"))
    expected = PEFT_TARGETS.get(config["model_type"], LLAMA_TARGETS)
    assert sorted({n.rpartition(".")[2] for n in peft_wrapped}) == expected

    ours = load_model(path, quantize=None, compute_dtype=torch.float32)
    assert sorted(load_adapter(ours, tmp_path / "peft")) == peft_wrapped
    ids = _ids()
    with torch.no_grad():
        assert_logits_close(ours.eval()(ids).logits, ref(ids).logits)

    mine = load_model(path, quantize=None, compute_dtype=torch.float32)
    assert sorted(add_lora(mine, r=4, alpha=8, target_modules="all-linear")) == peft_wrapped
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_adapter(mine, tmp_path / "ours")
    assert sorted(json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]) == expected
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_close(mine.eval()(ids).logits, theirs(ids).logits)


def test_finetune_two_steps_then_merge_loads_in_transformers(family, tmp_path):
    """`train` (NF4 base, gradient checkpointing, chunked loss) runs 2 steps; `nf4lora merge` writes a checkpoint
    transformers loads as the same family, with the logits of our base + adapter."""
    from nf4lora.train import TrainConfig, train
    from nf4lora.train.cli import main

    name, config, _, path = family
    data = write_jsonl(tmp_path / "train.jsonl", date_records(16, seed=2))
    run = TrainConfig(model=str(path), data=data, output_dir=str(tmp_path / "run"), seq_len=128, batch_size=4,
                      micro_batch_size=4, max_steps=2, warmup_steps=0, lr=1e-2, lora_r=4, eval_every=0, save_every=0,
                      compute_dtype="float32", bf16=False, progress=False)  # fmt: skip
    result = train(run)
    assert [m["step"] for m in result.metrics] == [1, 2] and all(m["loss"] > 0 for m in result.metrics)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == PEFT_TARGETS.get(config["model_type"], LLAMA_TARGETS)

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(path), "--adapter", result.adapter_dir, "--out", str(out),
                 "--dtype", "float32"]) == 0  # fmt: skip
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(merged).__name__ == config["architectures"][0]
    ours = load_model(path, quantize="nf4", compute_dtype=torch.float32)
    load_adapter(ours, result.adapter_dir)
    ids = _ids()
    with torch.no_grad():
        # fp32 throughout; the merged weight W + s*B@A is rounded once where ours adds the two products
        torch.testing.assert_close(merged(ids).logits, ours.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    assert LlamaConfig.from_pretrained(out).model_type == config["model_type"]


def test_written_config_reads_back_in_transformers_as_the_same_model(family, tmp_path):
    """Our config.json (old-style rope keys) gives transformers the model it saved: same class, same logits."""
    _, config, hf, path = family
    ours = LlamaConfig.from_pretrained(path)
    ours.save_pretrained(tmp_path)
    assert LlamaConfig.from_pretrained(tmp_path) == ours
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()  # fmt: skip
    assert type(again) is type(hf)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_gemma_embeddings_are_scaled_in_their_own_dtype():
    """sqrt(72) = 8.485 is 8.5 in bfloat16: Gemma multiplies bf16 embeddings by the bf16 scale, and so do we (the
    first block's input is bit-equal to transformers')."""
    config = {**FAMILIES["gemma2"], "hidden_size": 72}
    hf = hf_model(config).to(torch.bfloat16)
    ours = our_model_from_hf(hf, config).to(torch.bfloat16)
    seen = []
    for model in (hf, ours):
        model.model.layers[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0] if args else
                                                        kwargs["hidden_states"]), with_kwargs=True)  # fmt: skip
        with torch.no_grad():
            model(_ids(T=6))
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[1], seen[0])


def test_phi3_su_and_rope_parameters_styles_read_as_longrope():
    config = FAMILIES["phi3_longrope"]
    su = {**config, "rope_scaling": {**config["rope_scaling"], "type": "su"}}
    new_style = {k: v for k, v in config.items() if k != "rope_scaling"} | {
        "rope_parameters": {**config["rope_scaling"], "rope_type": "longrope", "rope_theta": 10000.0}}
    read = LlamaConfig.from_dict(config)
    assert read.rope_type == "longrope" and read.rotary_dim == 12
    assert LlamaConfig.from_dict(su) == read == LlamaConfig.from_dict(new_style)


def _edit(name, **changes):
    return {k: v for k, v in {**FAMILIES[name], **changes}.items() if v is not None}


@pytest.mark.parametrize(
    "config, match",
    [
        (_edit("qwen2", use_sliding_window=False, layer_types=["full_attention", "sliding_attention"] * 2),
         r"layer_types has 'sliding_attention' layers, but sliding_window is null"),
        (_edit("qwen2", layer_types=["full_attention", "local"] * 2), r"layer_types must list"),
        (_edit("qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"RoPE type 'yarn' is not supported"),
        (_edit("qwen3", rope_parameters={"rope_type": "dynamic", "factor": 2.0}), r"RoPE type 'dynamic'"),
        (_edit("gemma2", use_bidirectional_attention=True), r"use_bidirectional_attention=True"),
        (_edit("gemma2", hidden_activation="gelu"), r"hidden_act.*'gelu'"),
        (_edit("gemma2", attn_logit_softcapping=0.0), r"attn_logit_softcapping must be > 0 or null, got 0.0"),
        (_edit("gemma2", final_logit_softcapping=-1.0), r"final_logit_softcapping must be > 0 or null, got -1.0"),
        (_edit("gemma2", query_pre_attn_scalar=0), r"query_pre_attn_scalar must be > 0"),
        (_edit("gemma3", rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
         r"rope_parameters.sliding_attention of type 'linear' is not supported"),
        (_edit("gemma3", rope_parameters={"rope_type": "default", "rope_theta": 1e6}), r"must be nested by layer type"),
        (_edit("gemma3", architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"), r"'gemma3'"),
        (_edit("phi3", rope_scaling={"type": "linear", "factor": 2.0}), r"type 'linear' is not supported for phi3"),
        (_edit("phi3", resid_pdrop=1.0), r"resid_pdrop must be in \[0, 1\), got 1.0"),
        (_edit("phi3", partial_rotary_factor=0.1), r"even, positive number of rotated dimensions, got 1 \(head_dim 16"),
        (_edit("phi3", partial_rotary_factor=0.0), r"partial_rotary_factor must be in \(0, 1\], got 0.0"),
        (_edit("phi3_longrope", rope_scaling={"type": "longrope", "short_factor": [1.0] * 5, "long_factor": [1.0] * 6}),
         r"short_factor must have rotary_dim / 2 = 6 entries, got 5"),
        (_edit("phi3_longrope", rope_scaling={"type": "longrope", "short_factor": [1.0] * 6}),
         r"lacks \['long_factor'\]"),
        (_edit("phi3_longrope", rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [0] * 6}),
         r"long_factor must be a list of positive numbers"),
        (tiny_config(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not supported for model_type 'llama'"),
    ],
)  # fmt: skip
def test_config_refuses_a_value_it_cannot_run_naming_it(config, match):
    with pytest.raises(ValueError, match=r"^cfg\.json: .*" + match):
        LlamaConfig.from_dict(config, source="cfg.json")


def test_a_switch_the_family_cannot_write_is_refused_not_dropped(tmp_path):
    config = dataclasses.replace(LlamaConfig.from_dict(tiny_config()), qk_norm=True)
    with pytest.raises(ValueError, match=r"a llama config.json cannot express qk_norm=True"):
        config.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "config.json")
