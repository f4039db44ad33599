"""benchmarks/memory_plan.py counts what the code holds: its terms against the tensors themselves on small models
(the runs that check the totals against measured peak memory are the script's --check, in its results file)."""

import importlib
import os

import pytest
import torch

from nf4lora.lora import Linear4bit, add_lora, quantize_model
from nf4lora.models import LlamaConfig, LlamaForCausalLM

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
# Every width distinct (hidden, q, k/v, intermediate, r), so a term counted with the wrong one shows.
CONFIG = dict(vocab_size=300, hidden_size=192, intermediate_size=448, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=40, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip


@pytest.fixture(scope="module")
def memory_plan():
    import sys

    sys.path.insert(0, BENCHMARKS)  # the scripts import their sibling harness.py
    try:
        yield importlib.import_module("memory_plan")
    finally:
        sys.path.remove(BENCHMARKS)


def _model(layers: int, dtype, dropout: float, r: int = 8):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict({**CONFIG, "num_hidden_layers": layers})).to(dtype)
    quantize_model(model, compute_dtype=dtype)
    add_lora(model, r=r, alpha=2 * r, dropout=dropout)
    model.train()
    model.loss_chunk_tokens = 64
    return model


def _saved_bytes(model, rows: int, seq: int, pack: bool, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters and QuantStates
    excluded (they are held anyway)."""
    held = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            state = m.quant_state
            for t in (state.absmax, state.code, state.offset, state.nested.absmax, state.nested.code):
                held.add(t.untyped_storage().data_ptr())
    seen = {}

    def pack_hook(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, CONFIG["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(0))
    docs = {"doc_ids": (torch.arange(seq) // 24).expand(rows, seq).contiguous()} if pack else {}
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(ids, labels=ids, **docs)
    return sum(seen.values())


@pytest.mark.parametrize(
    "dtype, dropout, pack",
    [(torch.float32, 0.0, True), (torch.float32, 0.1, False), (torch.bfloat16, 0.0, True)],
)
def test_saved_activations_per_token_and_layer_are_what_autograd_saves(memory_plan, dtype, dropout, pack):
    """Differences over 2 and 3 layers and 1 and 2 rows isolate the bytes per layer and token exactly."""
    seq, bf16 = 48, dtype == torch.bfloat16
    saved = {(layers, rows): _saved_bytes(_model(layers, dtype, dropout), rows, seq, pack, bf16)
             for layers in (2, 3) for rows in (1, 2)}  # fmt: skip
    measured = (saved[3, 2] - saved[2, 2] - saved[3, 1] + saved[2, 1]) / seq
    model = memory_plan.Model.from_config("test", CONFIG)
    run = memory_plan.Run(seq_len=seq, lora_r=8, compute_bytes=dtype.itemsize, lora_dropout=dropout, pack=pack)
    assert memory_plan.saved_per_token_layer(model, run) == measured


def test_base_and_lora_terms_are_the_bytes_of_the_modules(memory_plan):
    model = _model(2, torch.float32, 0.0, r=16)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed = sum(m.weight.nbytes for m in layers)
    state = sum(t.nbytes for m in layers for t in m.quant_state.to_state_dict().values()) - sum(
        len(m.quant_state.to_state_dict()[f"quant_state.bitsandbytes__{m.quant_type}"]) for m in layers
    )  # the tensors a QuantState holds: absmax, code tables, nested absmax (to_state_dict adds the JSON blob)
    state += sum(4 for _ in layers)  # the offset, a float32 scalar (written into the JSON blob)
    lora = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    plan = memory_plan.plan(memory_plan.Model.from_config("test", CONFIG), memory_plan.Run(lora_r=16, device="cpu"),
                            1, "ddp")  # fmt: skip
    assert plan["terms"]["base"] == packed + state
    assert plan["terms"]["lora params"] == plan["terms"]["lora grads"] == lora
    assert plan["terms"]["optimizer"] == 2 * lora  # PagedAdamW: exp_avg and exp_avg_sq, float32
    sharded = memory_plan.plan(memory_plan.Model.from_config("test", CONFIG), memory_plan.Run(lora_r=16, device="cpu"),
                               2, "fsdp")["terms"]  # fmt: skip
    assert sharded["base"] == packed // 2 + state and sharded["lora params"] == lora // 2
