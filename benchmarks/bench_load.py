"""Load + quantize a checkpoint: nf4lora.models.load_model vs transformers from_pretrained with BitsAndBytesConfig.

Each load runs in its own subprocess so peak RSS is measured separately (ru_maxrss never goes down). Reported per
loader: wall time of the load call, the process's peak RSS, and the increase over the RSS it had after imports
(the load's own cost). The PERFORMANCE.md bound for ours: peak increase <= 4-bit model size + largest tensor
+ 300 MB. Default checkpoint: the built-in SmolLM2-135M-Instruct (converted from its GGUF; bf16 safetensors).

    python benchmarks/bench_load.py [--model DIR] [--repeat 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from harness import environment_block, markdown_table, write_results

QUANT = dict(quant_type="nf4", double_quant=True, blocksize=64)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, model: str, device: str) -> dict:
    """One load in this process; returns time and memory figures."""
    import resource

    import torch

    if kind == "hf":
        import transformers

        bnb = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=QUANT["quant_type"], bnb_4bit_use_double_quant=QUANT["double_quant"],
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    else:
        from nf4lora.models import load_model
    before = _rss_mb()
    t0 = time.perf_counter()
    if kind == "hf":
        net = transformers.AutoModelForCausalLM.from_pretrained(
            model, quantization_config=bnb, dtype=torch.bfloat16, device_map=device
        )
    else:
        net = load_model(model, quantize=QUANT["quant_type"], double_quant=QUANT["double_quant"],
                         blocksize=QUANT["blocksize"], compute_dtype=torch.bfloat16, device=device)  # fmt: skip
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Bytes the loaded model holds: parameters and buffers (packed 4-bit weights) plus our QuantStates.
    held = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
    for m in net.modules():
        state = getattr(m, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            held += state.absmax.numel() * state.absmax.element_size()
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "rss_after_mb": _rss_mb(),
            "model_mb": held / 2**20}  # fmt: skip


def _largest_tensor_mb(model: str) -> tuple[float, float]:
    """(largest tensor, whole checkpoint) in MiB, from the safetensors headers."""
    from nf4lora.models.loading import Checkpoint

    ckpt = Checkpoint(model)
    sizes = []
    for key in ckpt.keys():
        dtype, shape, begin, end = ckpt.files[key].entries[key]
        sizes.append(end - begin)
    return max(sizes) / 2**20, sum(sizes) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.device)))
        return

    if args.model is None:
        from nf4lora.train.resources import default_model_dir

        args.model = default_model_dir()
    largest, total = _largest_tensor_mb(args.model)
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for _ in range(args.repeat):
        for kind in runs:  # interleaved, so machine noise hits both alike
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", args.model, "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def med(kind, key):
        values = [r[key] for r in runs[kind]]
        return statistics.median(values), min(values), max(values)

    rows, data = [], {"model": args.model, "checkpoint_mb": total, "largest_tensor_mb": largest, "runs": runs}
    for kind, label in (("ours", "nf4lora load_model"), ("hf", "transformers + bitsandbytes")):
        t, tmin, tmax = med(kind, "seconds")
        peak, pmin, pmax = med(kind, "peak_rss_mb")
        incr = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs[kind])
        held = statistics.median(r["model_mb"] for r in runs[kind])
        rows.append([label, f"{t:.2f} s ({tmin:.2f}-{tmax:.2f})", f"{peak:.0f} MB ({pmin:.0f}-{pmax:.0f})",
                     f"{incr:.0f} MB", f"{held:.0f} MB"])  # fmt: skip
        data[kind] = {"seconds": t, "peak_rss_mb": peak, "peak_increase_mb": incr, "model_mb": held}
    ours, hf = data["ours"], data["hf"]
    bound = ours["model_mb"] + largest + 300
    data["bound_mb"] = bound
    md = f"""# Load + quantize a checkpoint (CPU): nf4lora vs transformers + bitsandbytes

{environment_block("transformers", "bitsandbytes", "safetensors")}
Checkpoint: `{args.model}` ({total:.0f} MB of safetensors, largest tensor {largest:.0f} MB). Both load it into
NF4 with double quantization, blocksize 64, bf16 compute dtype, device {args.device}; each load runs in a fresh
subprocess, {args.repeat} runs each (interleaved), median (min-max).

{markdown_table(["loader", "load time", "peak RSS", "peak - RSS before load", "model held"], rows)}

Ratios ours / transformers: time {ours["seconds"] / hf["seconds"]:.2f}x, peak RSS {ours["peak_rss_mb"] / hf["peak_rss_mb"]:.2f}x,
load's own peak increase {ours["peak_increase_mb"] / hf["peak_increase_mb"]:.2f}x.

Bound (PERFORMANCE.md): our peak increase {ours["peak_increase_mb"]:.0f} MB vs 4-bit model {ours["model_mb"]:.0f} MB
+ largest tensor {largest:.0f} MB + 300 MB = {bound:.0f} MB: {"within" if ours["peak_increase_mb"] <= bound else "ABOVE"} the bound.

Why ours stays low: the model is built on the meta device and every tensor is read with `readinto` into a fresh
buffer (no memory map, so file pages are never counted in RSS), quantized, and the 16-bit copy dropped before the
next read. "Model held" counts parameters, buffers and quantization state of the loaded model (our embeddings
and lm_head are tied in SmolLM2 and counted once).
"""
    print(md)
    print("wrote", write_results("load_cpu", md, data))


if __name__ == "__main__":
    main()
