"""Quantization error of NF4 vs FP4 vs a symmetric absmax int4 baseline, over blocksizes and double quantization,
on Gaussian and heavy-tailed (Student-t, df=3) weights.

    python benchmarks/quant_error.py [--size 1024] [--out DIR]

Every weight is drawn from one torch.Generator seeded with 0, so a rerun reproduces the tables. Writes
quant_error.md, .json and quant_error.png into benchmarks/results/ (or --out).
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from harness import RESULTS, environment_block, markdown_table, write_results_in  # noqa: E402

from nf4lora.nf4 import BLOCKSIZES, dequantize_4bit, error_report, quantize_4bit  # noqa: E402


def int4_absmax_roundtrip(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, float]:
    """Baseline: symmetric int4, q = round(x / absmax * 7) in [-7, 7] per block. Returns (w_hat, bits/param)."""
    flat = w.float().reshape(-1, blocksize)
    absmax = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    w_hat = (torch.round(flat / absmax * 7).clamp(-7, 7) * absmax / 7).reshape(w.shape)
    return w_hat, 4 + 32 / blocksize


def student_t(df: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Student-t samples with integer `df` from `generator`: z / sqrt(chi2_df / df), chi2_df a sum of df squared
    standard normals (torch.distributions.StudentT.sample takes no generator: it draws from the global RNG)."""
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((df, *shape), generator=generator).square().sum(0)
    return z / (chi2 / df).sqrt()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="weights are size x size (default 1024)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)  # every weight comes from it, so a rerun reproduces the tables
    weights = {
        "gaussian": torch.randn(args.size, args.size, generator=g) * 0.02,
        "student-t(3)": student_t(3, (args.size, args.size), g) * 0.02,
    }
    rows, data = [], []
    for dist, w in weights.items():
        for bs in BLOCKSIZES:
            for fmt in ("nf4", "fp4", "int4"):
                for dq in (False, True) if fmt != "int4" else (False,):
                    if fmt == "int4":
                        w_hat, bits = int4_absmax_roundtrip(w, bs)
                        rep = error_report(w, w_hat)
                        rep["bits_per_parameter"] = bits
                    else:
                        packed, state = quantize_4bit(w, blocksize=bs, quant_type=fmt, double_quant=dq)
                        rep = error_report(w, dequantize_4bit(packed, state), state)
                    entry = {"distribution": dist, "blocksize": bs, "format": fmt, "double_quant": dq, **rep}
                    data.append(entry)
                    rows.append([dist, bs, fmt + ("+DQ" if dq else ""), f"{rep['bits_per_parameter']:.3f}",
                                 f"{rep['sqnr_db']:.2f}", f"{rep['mse']:.3e}", f"{rep['relative_error']:.4f}",
                                 f"{rep['max_abs_error']:.3e}"])  # fmt: skip

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, dist in zip(axes, weights):
        for fmt, dq, style in (("nf4", False, "o-"), ("nf4", True, "o--"), ("fp4", False, "s-"), ("fp4", True, "s--"),
                               ("int4", False, "^-")):  # fmt: skip
            pts = [d for d in data if d["distribution"] == dist and d["format"] == fmt and d["double_quant"] == dq]
            ax.plot([d["blocksize"] for d in pts], [d["sqnr_db"] for d in pts], style,
                    label=fmt.upper() + (" + DQ" if dq else ""))  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(BLOCKSIZES, [str(b) for b in BLOCKSIZES])
        ax.set_title(f"{dist} weights ({args.size}x{args.size})")
        ax.set_xlabel("blocksize")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SQNR (dB, higher is better)")
    axes[0].legend()
    fig.suptitle("4-bit blockwise quantization error: NF4 vs FP4 vs int4 absmax")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "quant_error.png", dpi=110)

    header = ["weights", "blocksize", "format", "bits/param", "SQNR dB", "MSE", "rel. error", "max abs error"]
    md = "\n".join([
        "# Quantization error: NF4 vs FP4 vs int4 absmax",
        "",
        environment_block(),
        f"Weights: {args.size}x{args.size} float32, scaled by 0.02, drawn from a generator seeded with 0 (Student-t "
        "as z / sqrt(chi2 / df)). DQ = double quantization of the block absmax",
        "(8-bit, blocks of 256). int4: symmetric round-to-nearest of x / absmax * 7 (no DQ).",
        "",
        "![SQNR vs blocksize](quant_error.png)",
        "",
        markdown_table(header, rows),
    ])  # fmt: skip
    print(write_results_in(args.out, "quant_error", md, {"results": data}))


if __name__ == "__main__":
    main()
