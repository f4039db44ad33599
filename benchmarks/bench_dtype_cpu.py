"""Why compute dtype "auto" picks what it picks on the CPU: matmul speed per dtype on this machine.

    python benchmarks/bench_dtype_cpu.py [--repeat 7] [--out DIR]

Times, in each dtype (float32, bfloat16, float16): a 512x512x512 matmul; F.linear of a SmolLM2-135M MLP shape
(x [1024, 576] @ W [1536, 576].T, the shape a 4 x 256-token training step multiplies); and a whole Linear4bit
(NF4 + double quantization) forward + backward to x at that shape with compute_dtype set to the dtype. It prints
and records what "auto" chooses here and why (nf4lora.kernels.precision), so each results file shows the rule's
choice next to the measurements that justify it.

Writes benchmarks/results/dtype-cpu-<isa>.md and .json, named after the CPU's ISA (AVX2, AVX-512, AVX512-BF16,
AMX); with a cap set (ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA: oneDNN capped below what the CPU has, and/or
ATEN_CPU_CAPABILITY; e.g. both set to AVX2 to behave like an AVX2 machine) the name says "capped-<values>" and the
file says it was emulated, so a capped run never overwrites the uncapped one's file.
"""

import argparse

import torch
import torch.nn.functional as F
from harness import RESULTS, capped_suffix, environment_block, markdown_table, time_fn, write_results_in

from nf4lora.kernels.precision import auto_compute_dtype, cpu_isa, isa_label
from nf4lora.lora import Linear4bit

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYER = "Linear4bit NF4+DQ forward + backward to x, same shape"


def cases(dtype: torch.dtype):
    """(name, flop, fn) for each timed operation in `dtype`."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(512, 512, generator=g).to(dtype) for _ in range(2))
    x = torch.randn(1024, 576, generator=g).to(dtype)
    w = (torch.randn(1536, 576, generator=g) * 0.05).to(dtype)
    layer = Linear4bit.from_linear(torch.nn.Linear(576, 1536, bias=False), compute_dtype=dtype)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(1024, 1536, generator=g).to(dtype)

    def layer_step():
        xg.grad = None
        layer(xg).backward(dy)

    return [
        ("matmul 512x512x512", 2 * 512**3, lambda: a @ b),
        ("F.linear x [1024, 576] @ W [1536, 576].T", 2 * 1024 * 576 * 1536, lambda: F.linear(x, w)),
        (LAYER, 2 * 2 * 1024 * 576 * 1536, layer_step),
    ]


def results_name() -> str:
    """dtype-cpu-<isa>, plus -capped-<each cap's value> where the environment caps this process (isa_label's caps)."""
    return "dtype-cpu-" + cpu_isa().lower().replace("-", "") + capped_suffix()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS), help="results directory (default: benchmarks/results)")
    args = parser.parse_args()

    label = isa_label()
    chosen = auto_compute_dtype("cpu")
    print(f"CPU: {label}; auto: {chosen}", flush=True)

    rows, data = [], []
    for dtype in DTYPES:
        for name, flop, fn in cases(dtype):
            t = time_fn(fn, repeat=args.repeat)
            gflops = flop / t["median"] / 1e9
            rows.append([name, str(dtype).removeprefix("torch."), f"{t['median'] * 1e3:.2f} ms",
                         f"{t['min'] * 1e3:.2f}..{t['max'] * 1e3:.2f} ms", f"{gflops:.1f}"])  # fmt: skip
            data.append({"case": name, "dtype": str(dtype), "seconds": t, "gflops": gflops})
            print(" | ".join(rows[-1]), flush=True)

    def speed(dtype: torch.dtype) -> float:
        return next(d["gflops"] for d in data if d["case"] == LAYER and d["dtype"] == str(dtype))

    ratio = speed(torch.bfloat16) / speed(torch.float32)
    verdict = (
        f"Here bf16 runs the 4-bit layer at {ratio:.2f}x float32's speed; \"auto\" picks {chosen.name} "
        f"({chosen.reason}). The rule is right for this CPU when it picks bf16 exactly where that ratio is above 1."
    )
    md = "\n".join([
        f"# Compute dtype on the CPU: matmul speed per dtype ({label})",
        "",
        environment_block(),
        f"Median of {args.repeat} runs after 2 warm-up runs (range = min..max); GFLOP/s from the median.",
        "",
        markdown_table(["operation", "dtype", "median", "range", "GFLOP/s"], rows),
        "",
        verdict,
    ])  # fmt: skip
    record = {"isa": label, "auto": str(chosen), "bf16_over_fp32_layer": ratio, "results": data}
    print(write_results_in(args.out, results_name(), md, record))


if __name__ == "__main__":
    main()
