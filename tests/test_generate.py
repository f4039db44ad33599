"""generate(): KV-cache greedy decoding against transformers and against our own model without the cache."""

import argparse
import io
import json
import re
import types

import pytest
import torch
from test_model_helpers import hf_model, our_model_from_hf, tiny_config

from nf4lora.models import generate
from nf4lora.models.generate import sample_next, stop_token_ids

CONFIG = tiny_config(num_key_value_heads=1, attention_bias=True)
N_NEW = 24


@pytest.fixture(scope="module")
def models():
    hf = hf_model(CONFIG, seed=3)
    hf.generation_config.eos_token_id = None  # run the full length; EOS is tested separately
    hf.generation_config.pad_token_id = 0
    return hf, our_model_from_hf(hf, CONFIG)


def _prompt(B, T=6, seed=0):
    return torch.randint(3, CONFIG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B", [1, 3])
def test_greedy_matches_transformers_and_uncached(models, B):
    hf, ours = models
    ids = _prompt(B)
    ref = hf.generate(ids, max_new_tokens=N_NEW, do_sample=False)[:, ids.shape[1] :]
    cached = generate(ours, ids, N_NEW)
    uncached = generate(ours, ids, N_NEW, use_cache=False)
    assert cached.shape == (B, N_NEW)
    assert torch.equal(cached, ref)
    assert torch.equal(uncached, ref)


@pytest.mark.parametrize("B", [1, 3])
def test_static_cache_decodes_as_the_dynamic_one(models, B):
    """decode="static" (the StaticKVCache steps a CUDA graph replays) gives the dynamic cache's tokens, and its
    logits at every step to float32 rounding: attention over the whole buffer with the unwritten positions masked
    adds only exact zeros to the softmax."""
    from nf4lora.models.generate import _DecodeStep

    _, ours = models
    ids = _prompt(B)
    logits = {}
    for mode in ("dynamic", "static"):
        seen = []
        original = _DecodeStep._forward if mode == "static" else None
        with pytest.MonkeyPatch.context() as mp:
            if mode == "static":  # record each step's logits
                mp.setattr(_DecodeStep, "_forward", lambda self: seen.append(original(self)) or seen[-1])
            tokens = generate(ours, ids, N_NEW, decode=mode)
        logits[mode] = (tokens, seen)
    assert torch.equal(logits["dynamic"][0], logits["static"][0]) and len(logits["static"][1]) == N_NEW - 1
    for step, got in enumerate(logits["static"][1]):  # against the uncached model at the same prefix
        prefix = torch.cat([ids, logits["dynamic"][0][:, : step + 1]], dim=1)
        want = ours(prefix).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_static_decode_step_has_fixed_shapes_and_no_host_reads(models):
    """What CUDA-graph replay needs from the decode step, checked on the CPU: two steps run the same operators on
    tensors of the same shapes (nothing sized by the data or the step), and none reads a tensor's value into
    Python (.item(), bool(), int(): aten._local_scalar_dense), which on CUDA is a host sync, forbidden in capture."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nf4lora.models.generate import _DecodeStep
    from nf4lora.models.kv_cache import StaticKVCache

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.calls.append((str(func), shapes))
            return out

    _, ours = models
    ids = _prompt(2)
    cache = StaticKVCache(ours.config, 2, ids.shape[1] + 4)
    with torch.no_grad():
        token = ours(ids, kv_cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        step = _DecodeStep(ours, cache, graph=False)
        records = []
        for _ in range(2):
            with Record() as record:
                token = step(token).argmax(-1)
            records.append(record.calls)
    assert records[0] == records[1]
    assert not [name for name, _ in records[0] if "_local_scalar_dense" in name or "nonzero" in name]
    assert cache.position.tolist() == [ids.shape[1] + 2] * 2


def test_decode_modes_are_checked(models):
    _, ours = models
    with pytest.raises(ValueError, match="decode='graph' replays a CUDA graph: the model is on cpu"):
        generate(ours, _prompt(1), 2, decode="graph")
    with pytest.raises(ValueError, match="decode='static' needs a static KV cache, which does not apply here: "
                                         "use_cache=False"):  # fmt: skip
        generate(ours, _prompt(1), 2, decode="static", use_cache=False)
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(ours, _prompt(1), 2, decode="fast")


def test_static_decoding_past_the_longrope_switch_runs_and_within_it_is_refused():
    """Phi-3's longrope switches to its long frequencies once a sequence passes the pretraining length (16 here):
    a prompt already past it decodes on the long ones throughout, so the static cache applies and gives the dynamic
    cache's tokens; a switch while decoding (where the cache is rebuilt) is refused for it, naming the position."""
    from nf4lora.models import LlamaConfig, LlamaForCausalLM

    config = tiny_config(architectures=["Phi3ForCausalLM"], model_type="phi3", original_max_position_embeddings=16,
                         rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                       "long_factor": [1.0 + 0.5 * i for i in range(8)]})  # fmt: skip
    torch.manual_seed(0)
    ours = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
    past = _prompt(2, T=18)
    assert torch.equal(generate(ours, past, 8, decode="static"), generate(ours, past, 8, decode="dynamic"))
    with pytest.raises(ValueError, match="longrope switches frequencies at position 16"):
        generate(ours, _prompt(2, T=10), 8, decode="static")
    short = _prompt(2, T=9)  # fed 9 + 7 = 16 positions at most: no switch
    assert torch.equal(generate(ours, short, 8, decode="static"), generate(ours, short, 8, use_cache=False))


def test_greedy_past_a_sliding_window_matches_transformers():
    # A 6-token prompt and 24 new tokens against a window of 8: the cached steps must drop the keys that leave it.
    config = tiny_config(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)
    hf = hf_model(config, seed=5)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = our_model_from_hf(hf, config)
    ids = _prompt(2)
    ref = hf.generate(ids, max_new_tokens=N_NEW, do_sample=False)[:, ids.shape[1] :]
    assert torch.equal(generate(ours, ids, N_NEW), ref)
    assert torch.equal(generate(ours, ids, N_NEW, use_cache=False), ref)


def test_one_dimensional_prompt_and_stream(models):
    _, ours = models
    ids = _prompt(1)[0]
    seen = []
    out = generate(ours, ids.tolist(), 10, stream=seen.append)
    assert out.dim() == 1 and seen == out.tolist()
    assert torch.equal(out, generate(ours, ids[None], 10)[0])


def test_stops_at_eos_and_includes_it(models):
    _, ours = models
    ids = _prompt(1)[0]
    full = generate(ours, ids, N_NEW).tolist()
    eos = full[6]
    first = full.index(eos)
    out = generate(ours, ids, N_NEW, eos_token_id=[eos, 10_000]).tolist()
    assert out == full[: first + 1]


def test_batch_rows_that_finish_are_padded_with_eos(models):
    _, ours = models
    ids = _prompt(2, seed=5)
    full = generate(ours, ids, 12)
    eos = int(full[0, 3])
    out = generate(ours, ids, 12, eos_token_id=eos)
    for row in range(2):
        r = full[row].tolist()
        stop = r.index(eos) if eos in r else None
        if stop is None:
            assert out[row].tolist() == r[: out.shape[1]]
        else:
            assert out[row, : stop + 1].tolist() == r[: stop + 1]
            assert (out[row, stop:] == eos).all()


def test_seeded_sampling_is_reproducible_and_degenerate_cases_are_greedy(models):
    _, ours = models
    ids = _prompt(1)[0]
    a = generate(ours, ids, 12, temperature=1.0, seed=7)
    b = generate(ours, ids, 12, temperature=1.0, seed=7)
    assert torch.equal(a, b)
    greedy = generate(ours, ids, 12)
    assert torch.equal(generate(ours, ids, 12, temperature=0.8, top_k=1, seed=1), greedy)
    assert torch.equal(generate(ours, ids, 12, temperature=0.8, top_p=1e-6, seed=1), greedy)


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.6), (8, 0.9)])
def test_filters_keep_the_tokens_transformers_keeps(top_k, top_p):
    """The support of our top-k/top-p sampling equals the tokens transformers' logits processors leave finite."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(2, 40) * 3
    procs = [TemperatureLogitsWarper(0.7)]
    if top_k is not None:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        procs.append(TopPLogitsWarper(top_p))
    allowed = torch.isfinite(LogitsProcessorList(procs)(None, logits.clone()))
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([sample_next(logits, 0.7, top_k, top_p, g) for _ in range(400)], dim=1)  # (2, 400)
    for row in range(2):
        support = set(samples[row].tolist())
        assert support <= set(allowed[row].nonzero().flatten().tolist())
        # every kept token with probability above 2% shows up in 400 draws (miss chance < 1e-3)
        probs = torch.where(allowed[row], logits[row] / 0.7, float("-inf")).softmax(-1)
        assert set((probs > 0.02).nonzero().flatten().tolist()) <= support


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"input_ids": [[1, 2], [3, 4]], "stream": print}, "stream"),
        ({"input_ids": [1, 500]}, "input_ids must lie in"),
        ({"input_ids": []}, "non-empty"),
    ],
)
def test_bad_arguments(models, kwargs, match):
    _, ours = models
    args = {"input_ids": [1, 2, 3], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(ours, **args)


def test_generate_command_prints_what_generate_returns(tmp_path):
    """`nf4lora generate`: chat template applied, tokens streamed, output = decode(generate(...))."""
    import argparse
    import io

    from test_model_helpers import byte_level_tokenizer

    from nf4lora.models import Tokenizer, load_model
    from nf4lora.models.cli import add_generate_parser

    hf = hf_model(CONFIG, seed=4)
    hf.save_pretrained(tmp_path)
    byte_level_tokenizer(tmp_path, vocab_size=CONFIG["vocab_size"])
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--model", str(tmp_path), "--prompt", "hello 12", "--max-new-tokens", "9",
                              "--quant-type", "nf4", "--compute-dtype", "float32"])  # fmt: skip
    out = io.StringIO()
    text = args.func(args, out=out)

    tok = Tokenizer.from_pretrained(tmp_path)
    model = load_model(tmp_path, quantize="nf4", compute_dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello 12"}], add_generation_prompt=True, tokenize=True)
    new = generate(model, ids, 9, eos_token_id=[CONFIG["eos_token_id"], tok.eos_token_id])
    expected = tok.decode([t for t in new.tolist() if t not in (CONFIG["eos_token_id"], tok.eos_token_id)],
                          skip_special_tokens=True)  # fmt: skip
    assert text == expected and out.getvalue() == expected + "\n"


def _generate_args(*argv):
    from nf4lora.models.cli import add_generate_parser

    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def test_stop_ids_unite_config_generation_config_and_tokenizer(tmp_path):
    from nf4lora.models import LlamaConfig

    config, tokenizer = LlamaConfig.from_dict(CONFIG), types.SimpleNamespace(eos_token_id=5)
    assert stop_token_ids(tmp_path, config, tokenizer) == [2, 5]  # no generation_config.json
    for eos, expected in [(7, [2, 5, 7]), ([2, 9, 11], [2, 5, 9, 11]), (None, [2, 5])]:
        (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
        assert stop_token_ids(tmp_path, config, tokenizer) == expected
    tokenizer.eos_token_id = None
    assert stop_token_ids(tmp_path, config, tokenizer) == [2]
    for bad in ([3, "x"], 1000, True):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be an id or a list of ids"):
            stop_token_ids(tmp_path, config, tokenizer)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json: not a readable JSON file"):
        stop_token_ids(tmp_path, config, tokenizer)


def test_generate_command_stops_at_generation_config_eos_like_transformers(tmp_path):
    """An end-of-turn id listed only in generation_config.json (as Llama-3 instruct does) ends the output, as in
    transformers' generate()."""
    from test_model_helpers import byte_level_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model(CONFIG, seed=4).save_pretrained(tmp_path)
    byte_level_tokenizer(tmp_path, vocab_size=CONFIG["vocab_size"])
    argv = ["--model", str(tmp_path), "--prompt", "hello 12", "--no-chat", "--max-new-tokens", "12",
            "--quant-type", "none", "--compute-dtype", "float32"]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("hello 12", return_tensors="pt").input_ids

    def hf_ids():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        return hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()

    full = hf_ids()
    # An ordinary token the model produces after others: listing it as EOS must end the output there.
    k = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    stop = full[k]
    assert stop not in (CONFIG["eos_token_id"], tok.eos_token_id)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [CONFIG["eos_token_id"], stop]}))
    assert hf_ids() == full[: k + 1]  # transformers stops at it
    args = _generate_args(*argv)
    assert args.func(args, out=io.StringIO()) == tok.decode(full[:k], skip_special_tokens=True)  # EOS not printed


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--top-k", "5"], "sampling flags --top-k have no effect with --temperature=0"),
        (["--top-p", "0.5", "--seed", "3"], "sampling flags --top-p, --seed have no effect"),
        (["--temperature", "0", "--seed", "3"], "sampling flags --seed have no effect"),
        (["--system", "be brief", "--no-chat"], "--system needs the chat template, but --no-chat was given"),
        (["--system", "be brief"], "--system needs the chat template, but the tokenizer of --model="),
    ],
)
def test_generate_command_refuses_flags_it_would_ignore(tmp_path, argv, says):
    from test_model_helpers import byte_level_tokenizer

    hf_model(CONFIG, seed=4).save_pretrained(tmp_path)
    byte_level_tokenizer(tmp_path, vocab_size=CONFIG["vocab_size"])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]  # --system with the default --chat: no template, so there is no chat to add it to
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    args = _generate_args("--model", str(tmp_path), "--prompt", "hi", "--quant-type", "none", *argv)
    with pytest.raises(ValueError, match=re.escape(says)):
        args.func(args, out=io.StringIO())
