"""Load + quantize a checkpoint: nf4lora.models.load_model vs transformers from_pretrained with BitsAndBytesConfig.

Each load runs in its own subprocess so peak RSS is measured separately (ru_maxrss never goes down). Before the
clock starts, each subprocess loads a tiny checkpoint of the same architecture the same way (written once, random
weights), so every library the load path imports (bitsandbytes, accelerate, transformers' modeling_llama; triton,
sympy, ...) is imported, and its one-time setup done, before the "before" RSS and the timed load; the modules first
imported inside the timed load are counted and reported (0 when the warm-up covered them all).

Reported per loader: wall time of the load call, the process's peak RSS (absolute: runtime, libraries and model),
and, as a separate number, the increase of the peak over the RSS before the timed load. All memory is in MiB
(2**20 bytes). The docs/benchmarking.md target for ours, checked as written, is on the absolute peak RSS: <= 4-bit model
size + largest tensor + 300 MB (286 MiB). Default checkpoint: the built-in SmolLM2-135M-Instruct (converted from
its GGUF; bf16 safetensors).

    python benchmarks/bench_load.py [--model DIR] [--repeat 3] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, environment_block, markdown_table, write_results_in

QUANT = dict(quant_type="nf4", double_quant=True, blocksize=64)
TARGET_SLACK_MIB = 300e6 / 2**20  # docs/benchmarking.md's "+ 300 MB", in MiB (286.1)
# The warm-up checkpoint: the target's config with these sizes (every Linear a whole number of 64-blocks).
WARMUP_SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel's "kB" are KiB
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak read later belongs to what ran since, not to
    the imports or the warm-up load; False where the kernel refuses (the peak is then the process's lifetime one)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load(kind: str, model: str, device: str):
    """The load being measured: ours, or transformers + bitsandbytes, into NF4 + DQ with bf16 compute."""
    import torch

    if kind == "hf":
        import transformers

        bnb = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=QUANT["quant_type"], bnb_4bit_use_double_quant=QUANT["double_quant"],
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        return transformers.AutoModelForCausalLM.from_pretrained(
            model, quantization_config=bnb, dtype=torch.bfloat16, device_map=device
        )
    from nf4lora.models import load_model

    return load_model(model, quantize=QUANT["quant_type"], double_quant=QUANT["double_quant"],
                      blocksize=QUANT["blocksize"], compute_dtype=torch.bfloat16, device=device)  # fmt: skip


def worker(kind: str, model: str, device: str, warmup_model: str) -> dict:
    """A warm-up load of `warmup_model` (imports and one-time setup), then the timed load of `model`; returns
    time and memory figures (MiB)."""
    load(kind, warmup_model, device)  # dropped at once
    gc.collect()
    imported = set(sys.modules)
    peak_reset = _reset_peak_rss()
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    net = load(kind, model, device)
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    late_imports = sorted(set(sys.modules) - imported)
    # Bytes the loaded model holds: parameters and buffers (packed 4-bit weights) plus our QuantStates.
    held = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
    for m in net.modules():
        state = getattr(m, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            held += state.absmax.numel() * state.absmax.element_size()
    return {"seconds": seconds, "peak_rss_mib": peak, "peak_reset": peak_reset, "rss_before_mib": before,
            "rss_after_mib": _status_mib("VmRSS"), "model_mib": held / 2**20,
            "modules_imported_during_load": late_imports}  # fmt: skip


def write_warmup_checkpoint(model: str, out_dir: str) -> str:
    """`model`'s architecture (its config.json, the sizes shrunk to WARMUP_SIZES), random bf16 weights."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    for key, value in WARMUP_SIZES.items():
        setattr(config, key, value)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids must lie in the shrunk vocabulary
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out_dir)
    return out_dir


def _largest_tensor_mib(model: str) -> tuple[float, float]:
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
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--warmup-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.device, args.warmup_model)))
        return

    if args.model is None:
        from nf4lora.train.resources import default_model_dir

        args.model = default_model_dir()
    largest, total = _largest_tensor_mib(args.model)
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        warmup_model = write_warmup_checkpoint(args.model, tmp)
        for _ in range(args.repeat):
            for kind in runs:  # interleaved, so machine noise hits both alike
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", args.model,
                       "--device", args.device, "--warmup-model", warmup_model]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"the {kind} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
                runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def med(kind, key):
        values = [r[key] for r in runs[kind]]
        return statistics.median(values), min(values), max(values)

    rows, data = [], {"model": args.model, "checkpoint_mib": total, "largest_tensor_mib": largest, "runs": runs}
    for kind, label in (("ours", "nf4lora load_model"), ("hf", "transformers + bitsandbytes")):
        t, tmin, tmax = med(kind, "seconds")
        peak, pmin, pmax = med(kind, "peak_rss_mib")
        incr = statistics.median(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs[kind])
        before = statistics.median(r["rss_before_mib"] for r in runs[kind])
        held = statistics.median(r["model_mib"] for r in runs[kind])
        late = max(len(r["modules_imported_during_load"]) for r in runs[kind])
        rows.append([label, f"{t:.2f} s ({tmin:.2f}-{tmax:.2f})", f"{peak:.0f} MiB ({pmin:.0f}-{pmax:.0f})",
                     f"{before:.0f} MiB", f"{incr:.0f} MiB", f"{held:.0f} MiB", late])  # fmt: skip
        data[kind] = {"seconds": t, "peak_rss_mib": peak, "rss_before_mib": before, "peak_increase_mib": incr,
                      "model_mib": held, "modules_imported_during_load": late}  # fmt: skip
    ours, hf = data["ours"], data["hf"]
    target = ours["model_mib"] + largest + TARGET_SLACK_MIB
    met = ours["peak_rss_mib"] <= target
    data.update(target_mib=target, target_met=met)
    md = f"""# Load + quantize a checkpoint (CPU): nf4lora vs transformers + bitsandbytes

{environment_block("transformers", "bitsandbytes", "safetensors")}
Checkpoint: `{args.model}` ({total:.0f} MiB of safetensors, largest tensor {largest:.0f} MiB). Both load it into
NF4 with double quantization, blocksize 64, bf16 compute dtype, device {args.device}; each load runs in a fresh
subprocess, {args.repeat} runs each (interleaved), median (min-max). MiB = 2**20 bytes.

Before the clock starts and the "RSS before" is read, each subprocess has loaded a tiny random checkpoint of the
same architecture the same way, so the load time and the increase exclude importing the libraries (bitsandbytes,
accelerate, transformers' modeling_llama; triton and the rest for ours) and their one-time setup. The last column
counts the modules still first imported inside the timed load (the most over the runs). Peak RSS is the
process's VmHWM, {"reset to the current RSS just before the timed load, so it is the peak during the load" if
all(r["peak_reset"] for rs in runs.values() for r in rs) else "NOT reset on this kernel: the process's lifetime peak"}.

{markdown_table(["loader", "load time", "peak RSS (absolute)", "RSS before load", "peak - RSS before load",
                 "model held", "modules imported during load"], rows)}

**Peak RSS of our load: {ours["peak_rss_mib"]:.0f} MiB (absolute, the whole process)** against the docs/benchmarking.md target, 4-bit model {ours["model_mib"]:.0f} MiB + largest tensor {largest:.0f} MiB + 300 MB ({TARGET_SLACK_MIB:.0f} MiB) = {target:.0f} MiB: {"met" if met else f"not met ({ours['peak_rss_mib'] - target:.0f} MiB above)"}.

Separately, the load's own increase (peak RSS - RSS before the timed load, the runtime and libraries already
resident): ours {ours["peak_increase_mib"]:.0f} MiB, transformers + bitsandbytes {hf["peak_increase_mib"]:.0f} MiB.

Ratios ours / transformers: time {ours["seconds"] / hf["seconds"]:.2f}x, peak RSS {ours["peak_rss_mib"] / hf["peak_rss_mib"]:.2f}x,
the load's own increase {f'{ours["peak_increase_mib"] / hf["peak_increase_mib"]:.2f}x' if hf["peak_increase_mib"] > 0 else "n/a"}.

Why ours stays low: the model is built on the meta device and every 16-bit weight is read with `readinto` into
one reused buffer sized for the largest (no memory map, so file pages are never counted in RSS; no fresh tensor
per weight, so malloc's heap does not fragment), quantized from there, and overwritten by the next read. "Model held" counts parameters, buffers and quantization state of the loaded model (our embeddings
and lm_head are tied in SmolLM2 and counted once).
"""
    print(md)
    print("wrote", write_results_in(args.out, "load_cpu", md, data))


if __name__ == "__main__":
    main()
