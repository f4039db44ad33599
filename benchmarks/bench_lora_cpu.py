"""Linear4bit + LoRA forward+backward on the CPU: ours vs bitsandbytes Linear4bit + PEFT LoRA, same run.

One 4096x4096 NF4 (double-quantized) layer with a rank-16 adapter, x of shape [8*512, 4096] requiring
grad (an inner layer of a model in training), all in the compute dtype "auto" picks for this CPU (bf16 where it
has native bf16, else float32: kernels/precision.py): forward under autocast to it where it is bf16, as a QLoRA
training step runs it (bench_qlora_step.py), then backward to x and the LoRA weights. Both sides quantize the same
weight in that dtype (as a checkpoint loaded with that dtype is), so both dequantize straight to it, and both run
every matmul, the adapter's included, in it (checked each run: the dtypes of every matmul's operands are recorded).
Also timed, for context and to show where the time goes: the same layer with a plain weight (the matmul floor), the
pieces
(dequantize, the two matmuls) and a torch.profiler breakdown of our step.

    .venv/bin/python benchmarks/bench_lora_cpu.py [--tokens 4096] [--dim 4096] [--repeat 21] [--out DIR]

Writes benchmarks/results/lora-cpu.{md,json} (lora-cpu-capped-<caps> with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA
set).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch
from harness import (
    RESULTS, capped_suffix, environment_block, fmt_time, machine, markdown_table, peak_rss_mb, time_fn, versions, write_results_in,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nf4lora.kernels import dequantize
from nf4lora.kernels.precision import auto_compute_dtype
from nf4lora.lora import Linear4bit, LoRALinear

PEERS = ("bitsandbytes", "peft")
CHOSEN = auto_compute_dtype("cpu")  # both sides' dtype; their forward runs under autocast to it where it is 16-bit
DTYPE = CHOSEN.dtype
SHORT = {torch.bfloat16: "bf16", torch.float32: "float32"}[DTYPE]
AUTOCAST = DTYPE != torch.float32
OURS, PEER = "ours (Linear4bit + LoRALinear)", "bitsandbytes Linear4bit + PEFT LoRA"


class _Wrapper(nn.Module):
    """PEFT adapts submodules of a model, so the peer layer sits in a one-layer model."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build_ours(linear, r, alpha):
    base = Linear4bit.from_linear(linear, quant_type="nf4", double_quant=True, compute_dtype=DTYPE)
    return LoRALinear(base, r=r, alpha=alpha)


def build_dense_baseline(linear, r, alpha):
    dense = copy.deepcopy(linear).to(DTYPE).requires_grad_(False)
    return LoRALinear(dense, r=r, alpha=alpha)


def build_peer(linear, r, alpha):
    """bitsandbytes Linear4bit quantized from `linear`'s weight in its dtype, as transformers builds it (the module
    cast to the model dtype, the checkpoint loaded, then quantized); PEFT's LoRA around it."""
    import bitsandbytes as bnb
    import peft

    base = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")  # fmt: skip
    base = base.to(linear.weight.dtype)  # else load_state_dict copies into a float32 weight
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")  # bitsandbytes quantizes on the move
    if base.weight.quant_state.dtype != linear.weight.dtype:  # it dequantizes to this dtype, then casts
        raise RuntimeError(f"bitsandbytes quantized a {base.weight.quant_state.dtype} weight, not {linear.weight.dtype}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    return peft.get_peft_model(_Wrapper(base), config).train()


def step_fn(module, x, dy):
    """One forward (under autocast where the dtype is 16-bit) + backward (outside it, as a training loop calls it); gradients are cleared
    first so no step pays for accumulation."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        with torch.autocast(x.device.type, dtype=DTYPE, enabled=AUTOCAST):
            y = module(x)
        y.backward(dy)

    return step


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every matmul's operands (after autocast's casts: this mode sees the ops that run)."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
               torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.dtypes.update(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def matmul_dtypes(step) -> list[str]:
    """The dtypes of the matmul operands of one call of `step` (both sides must show the compute dtype alone)."""
    with _MatmulDtypes() as mode:
        step()
    return sorted(mode.dtypes)


def interleaved(fns: dict, repeat: int) -> dict[str, dict[str, float]]:
    """Time each fn `repeat` times, taking turns (a, b, c, a, b, c, ...), so that load from other processes on
    this shared machine falls on every contender alike; median and spread per fn."""
    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, warmup=0, repeat=1)["median"])
    return {
        n: {"median": statistics.median(s), "min": min(s), "max": max(s), "n": len(s), "samples": s}
        for n, s in samples.items()
    }


def paired_ratios(peer: dict, ours: dict) -> dict[str, float]:
    """peer / ours turn by turn (each pair timed back to back, so minute-scale drift of the machine cancels):
    median and quartiles. Steadier than the ratio of the two medians when the machine drifts during the run."""
    ratios = sorted(p / o for p, o in zip(peer["samples"], ours["samples"]))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": median, "q1": q1, "q3": q3, "n": len(ratios)}


def profile_breakdown(step, rows=8) -> list[list]:
    """Self CPU time of the top ops of one step (after a warm-up), as table rows."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [[e.key, e.count, f"{e.self_cpu_time_total / 1e3:.1f} ms", f"{100 * e.self_cpu_time_total / total:.0f}%"]
            for e in events[:rows]]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8 * 512)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--no-write", action="store_true", help="print only (for quick checks)")
    parser.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    linear = nn.Linear(args.dim, args.dim, bias=False).to(DTYPE)  # a layer of a checkpoint in that dtype
    x = torch.randn(args.tokens, args.dim, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(args.tokens, args.dim, dtype=DTYPE)
    alpha = 2 * args.rank

    layers = {
        OURS: build_ours(linear, args.rank, alpha),
        PEER: build_peer(linear, args.rank, alpha),
        f"{SHORT} nn.Linear + LoRALinear (floor)": build_dense_baseline(linear, args.rank, alpha),
    }
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPE, enabled=AUTOCAST):  # same outputs (B = 0: the 4-bit bases)
        max_diff = (layers[OURS](x).float() - layers[PEER](x).float()).abs().max().item()
    steps = {name: step_fn(m, x, dy) for name, m in layers.items()}
    dtypes = {name: matmul_dtypes(step) for name, step in steps.items()}  # also the warm-up of every step
    quant_dtypes = {OURS: str(layers[OURS].base_layer.quant_state.dtype),
                    PEER: str(layers[PEER].base_model.model.proj.weight.quant_state.dtype)}  # fmt: skip

    timings = interleaved(steps, args.repeat)
    ours, peer = timings[OURS], timings[PEER]
    speedup = peer["median"] / ours["median"]
    paired = paired_ratios(peer, ours)

    # The pieces of a step, to show where the time goes.
    import bitsandbytes.functional as bnbF

    base = layers[OURS].base_layer
    bnb_weight = layers[PEER].base_model.model.proj.weight
    w = base.dequantize(DTYPE)
    if bnbF.dequantize_4bit(bnb_weight.data, bnb_weight.quant_state).dtype != DTYPE:
        raise RuntimeError(f"bitsandbytes' dequantize_4bit does not produce {DTYPE} here: the row below would mislabel it")
    pieces = {
        f"ours: dequantize NF4+DQ -> {SHORT}": lambda: dequantize(base.weight, base.quant_state, DTYPE),
        f"bitsandbytes: dequantize_4bit -> {SHORT} (its quant_state.dtype)": lambda: bnbF.dequantize_4bit(
            bnb_weight.data, bnb_weight.quant_state),
        "forward matmul F.linear(x, W)": lambda: torch.nn.functional.linear(x.detach(), w),
        "grad-input matmul dy @ W (layout used by both)": lambda: dy @ w,
        "grad-input matmul (W.T @ dy.T).T (same result)": lambda: (w.t() @ dy.t()).t(),
    }
    piece_times = interleaved(pieces, args.repeat)
    breakdown = profile_breakdown(steps[OURS])
    load = (load_before, os.getloadavg()[0])

    def spread(t):
        return f"{fmt_time(t['min'])} .. {fmt_time(t['max'])}"

    rows = [[name, fmt_time(t["median"]), spread(t), f"{peer['median'] / t['median']:.2f}x"] for name, t in timings.items()]
    md = [
        "# Linear4bit + LoRA forward+backward on the CPU",
        "",
        environment_block(*PEERS),
        f"x [{args.tokens}, {args.dim}] {SHORT} (requires grad), weight {args.dim}x{args.dim} {SHORT} quantized to "
        f"NF4 + double quant, blocksize 64, on both sides (quant_state dtype: ours {quant_dtypes[OURS]}, bitsandbytes "
        f"{quant_dtypes[PEER]}), compute dtype {SHORT} (`auto`: {CHOSEN.reason}), LoRA r={args.rank}, alpha={alpha}, "
        "adapter weights stored float32. One step = forward "
        + (f"under torch.autocast(\"cpu\", dtype={DTYPE}) " if AUTOCAST else "without autocast ")
        + "on every side (as a QLoRA training step runs), then backward to x and the LoRA weights. Matmul operand dtypes in one step: "
        + "; ".join(f"{name}: {', '.join(d)}" for name, d in dtypes.items())
        + f". Median of {args.repeat} runs after a warm-up, the contenders taking turns; spread is min .. max. "
        f"Output max |ours - peer| = {max_diff:.3g} ({SHORT}). 1-minute load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end ({os.cpu_count()} cores shared with other jobs: a load above {os.cpu_count()} "
        "means the contenders did not have the cores to themselves).",
        "",
        markdown_table(["layer", "median", "spread", "speed vs bitsandbytes + PEFT"], rows),
        "",
        f"**Ours / peer: {speedup:.2f}x** (ratio of the medians; target >= 1.3x). Turn by turn (peer / ours of "
        f"steps timed back to back, {paired['n']} pairs): median {paired['median']:.2f}x, quartiles "
        f"{paired['q1']:.2f}x .. {paired['q3']:.2f}x. "
        + ("Both estimates meet the target." if min(speedup, paired["median"]) >= 1.3 else
           f"Not met: {min(speedup, paired['median']):.3f}x by the lower of the two estimates."),
        "",
        "## Where the time goes",
        "",
        markdown_table(["piece", "median", "spread"], [[n, fmt_time(t["median"]), spread(t)] for n, t in piece_times.items()]),
        "",
        "Our step, torch.profiler self CPU time:",
        "",
        markdown_table(["op", "calls", "self CPU", "share"], breakdown),
        "",
        f"Peak RSS of the benchmark process: {peak_rss_mb():.0f} MiB.",
    ]
    markdown = "\n".join(md)
    print(markdown)
    if not args.no_write:
        data = {
            "machine": machine(), "versions": versions(*PEERS), "args": vars(args), "speedup_vs_peer": speedup,
            "paired_speedup": paired,
            "timings_s": timings, "pieces_s": piece_times, "profile": breakdown, "max_abs_diff": max_diff,
            "load_average": load, "compute_dtype": str(CHOSEN), "autocast": AUTOCAST, "matmul_dtypes": dtypes, "quant_state_dtypes": quant_dtypes,
        }  # fmt: skip
        print(write_results_in(args.out, "lora-cpu" + capped_suffix(), markdown, data))


if __name__ == "__main__":
    main()
