"""Model quality after 4-bit quantization: perplexity on real English text and per-layer quantization error.

Caveat for the default checkpoint (DEFAULT_MODEL_CAVEAT, written into the results where it is used): its
"16-bit baseline" is already a 4-bit model, dequantized from a Q4_1 GGUF; pass --model for a real 16-bit one.

Perplexity of one checkpoint (default: the built-in SmolLM2-135M-Instruct) on a fixed slice of CPython's
documentation text (pydoc_data.topics, in every Python), tokenized by nf4lora's Tokenizer, scored in windows of
--seq-len tokens moved by --stride (each token is scored once, with up to seq-len - stride tokens of context):

- the 16-bit model, in nf4lora and in transformers (the difference between the two is the implementations' own);
- nf4lora NF4 / FP4, double quantization on / off, blocksizes 32..256 (load_model quantizing on load);
- bitsandbytes NF4 / FP4 (DQ on / off, blocksize 64: transformers has no blocksize option) through transformers'
  BitsAndBytesConfig, whose quantized bytes are compared with ours tensor by tensor.

All forwards run in float32 (compute dtype float32 on both sides), so the differences between rows come from the
weights, not from bf16 rounding. Then a per-layer report: SQNR (nf4lora.nf4.sqnr_db) of every decoder Linear
under NF4 and FP4 (blocksize 64, DQ), as a table and a plot.

    .venv/bin/python benchmarks/quality.py [--model DIR] [--tokens 1024] [--seq-len 512] [--stride 512]

Writes benchmarks/results/quality.{md,json}, quality-sqnr.png and quality-ppl.png (or into --out).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from harness import RESULTS, english_text, environment_block, machine, markdown_table, versions, write_results_in
from torch.nn import functional as F

from nf4lora.nf4 import BLOCKSIZES, dequantize_4bit, quantize_4bit, sqnr_db

PEERS = ("transformers", "bitsandbytes")
FORMATS = ("nf4", "fp4")
PEER_BLOCKSIZE = 64  # bitsandbytes' Linear4bit default; BitsAndBytesConfig cannot change it
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MODEL_CAVEAT = (
    "The 16-bit baseline is not a 16-bit model: the built-in SmolLM2-135M-Instruct is converted from a Q4_1 GGUF, "
    "so its decoder Linear weights are 4-bit values (at most 16 per block of 32) dequantized to bf16. Every 4-bit row "
    "re-quantizes an already-4-bit model, and its gap to the baseline understates what 4-bit quantization costs a "
    "real 16-bit checkpoint. The nf4lora-vs-bitsandbytes comparison (the same input weights on both sides) is "
    "unaffected."
)
PLOT_CAVEAT = "16-bit baseline = SmolLM2 dequantized from a Q4_1 GGUF (already 4-bit)"


# ------------------------------------------------------------------------------------------------ perplexity
def text_ids(model_dir: str, n_tokens: int) -> torch.Tensor:
    """The first n_tokens ids of the documentation text (no BOS), as a (1, n) int64 tensor."""
    from nf4lora.models import Tokenizer

    ids = Tokenizer.from_pretrained(model_dir).encode(english_text(8 * n_tokens), add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"--tokens={n_tokens}: the documentation text has only {len(ids)} tokens for this tokenizer")
    return torch.tensor(ids[:n_tokens], dtype=torch.int64).unsqueeze(0)


@torch.no_grad()
def perplexity(logits_fn, ids: torch.Tensor, seq_len: int, stride: int) -> dict:
    """exp(mean NLL) over windows ids[:, s : s + seq_len] at s = 0, stride, 2*stride, ...; the first window scores
    all its predictions, later ones only the tokens no earlier window scored (each token at most once; with
    stride == seq_len the first token of each window has no context and is not scored).

    logits_fn: (1, T) ids -> (1, T, V) logits. The NLL is summed in float64 so long texts lose nothing.
    """
    n = ids.shape[1]
    nll, count, start = 0.0, 0, 0
    while True:
        window = ids[:, start : start + seq_len]
        logits = logits_fn(window).float()  # (1, T, V)
        targets = window[:, 1:].clone()
        if start > 0:  # target j is token start + 1 + j; the previous window scored up to start - stride + seq_len - 1
            targets[:, : max(seq_len - stride - 1, 0)] = -100
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        nll += losses.double().sum().item()
        count += int((targets != -100).sum())
        if start + seq_len >= n:
            break
        start += stride
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens_scored": count}


def ours_logits(model):
    return lambda ids: model(ids).logits


def hf_logits(model):
    return lambda ids: model(input_ids=ids).logits


def load_ours(model_dir: str, quant_type: str | None, double_quant: bool = True, blocksize: int = 64):
    from nf4lora.models import load_model

    return load_model(model_dir, quantize=quant_type, double_quant=double_quant, blocksize=blocksize,
                      compute_dtype=torch.float32)  # fmt: skip


def load_hf(model_dir: str, quant_type: str | None, double_quant: bool = True):
    import transformers

    kwargs = {}
    if quant_type is not None:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        kwargs["device_map"] = {"": "cpu"}
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()


def quantized_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """The tensors of the 4-bit layers in the bitsandbytes state-dict format (packed weight, absmax, nested absmax,
    code tables), keyed by name; the JSON quant-state blob is left out (its key order is not the data)."""
    layers = {k.split(".weight.quant_state.")[0] for k in state_dict if ".weight.quant_state." in k}
    out = {}
    for k, v in state_dict.items():
        layer = k.split(".weight")[0]
        if layer in layers and ".quant_state." not in k and isinstance(v, torch.Tensor):
            out[k] = v.detach()
    return out


def compare_bytes(ours_model, peer_model, plain_absmax: dict | None = None) -> dict:
    """How many 4-bit tensors are identical (torch.equal) between the two models; for double-quantized models,
    where 8-bit absmax codes differ, also which side's code decodes nearer to the exact float32 absmax
    (`plain_absmax`: {layer.weight.absmax key: float32 absmax} from a plain quantization of the same weights)."""
    ours, peer = quantized_tensors(ours_model.state_dict()), quantized_tensors(peer_model.state_dict())
    keys = sorted(set(ours) | set(peer))
    same = [k for k in keys if k in ours and k in peer and ours[k].dtype == peer[k].dtype and torch.equal(ours[k], peer[k])]
    out = {"tensors": len(keys), "identical": len(same), "differing": [k for k in keys if k not in same]}
    if plain_absmax is None:
        return out
    codes = diff = ours_nearer = 0
    for k in keys:
        if not k.endswith(".weight.absmax") or k not in ours or k not in peer:
            continue
        codes += ours[k].numel()
        where = ours[k] != peer[k]
        if not where.any():
            continue
        diff += int(where.sum())
        prefix = k.removesuffix(".absmax")
        layer = ours_model.get_submodule(prefix.removesuffix(".weight"))
        scale = ours[prefix + ".nested_absmax"].repeat_interleave(layer.quant_state.nested.blocksize)[: ours[k].numel()]
        table = ours[prefix + ".nested_quant_map"]
        offset = layer.quant_state.offset
        exact = plain_absmax[k]
        err_ours = (table[ours[k].long()] * scale + offset - exact).abs()[where]
        err_peer = (table[peer[k].long()] * scale + offset - exact).abs()[where]
        ours_nearer += int((err_ours < err_peer).sum())
    out.update(absmax_codes=codes, absmax_codes_differing=diff, ours_nearer=ours_nearer)
    return out


# ------------------------------------------------------------------------------------------ per-layer error
def layer_errors(model) -> list[dict]:
    """SQNR of every decoder Linear weight of a 16-bit model under NF4 and FP4 (blocksize 64, DQ)."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        row = {"layer": name, "shape": list(w.shape)}
        for fmt in FORMATS:
            packed, state = quantize_4bit(w, blocksize=64, quant_type=fmt, double_quant=True)
            row[f"{fmt}_sqnr_db"] = sqnr_db(w, dequantize_4bit(packed, state))
        rows.append(row)
    return rows


def layer_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def plot_sqnr(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, proj in zip(colors, PROJECTIONS):
        pts = [r for r in rows if r["layer"].endswith(proj)]
        if not pts:
            continue
        x = [layer_index(r["layer"]) for r in pts]
        ax.plot(x, [r["nf4_sqnr_db"] for r in pts], "o-", color=color, ms=3, label=f"{proj} NF4")
        ax.plot(x, [r["fp4_sqnr_db"] for r in pts], "x--", color=color, ms=3, alpha=0.6, label=f"{proj} FP4")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ppl(results: list[dict], baseline: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for fmt, dq, style in (("nf4", True, "o-"), ("nf4", False, "o:"), ("fp4", True, "s-"), ("fp4", False, "s:")):
        pts = sorted((r for r in results if r["impl"] == "nf4lora" and r["format"] == fmt and r["double_quant"] == dq),
                     key=lambda r: r["blocksize"])  # fmt: skip
        if pts:
            ax.plot([r["blocksize"] for r in pts], [r["ppl"] for r in pts], style,
                    label=f"nf4lora {fmt.upper()}" + (" + DQ" if dq else ""))  # fmt: skip
    for r in results:
        if r["impl"] == "bitsandbytes" and r["format"] != "16-bit":
            marker = "*" if r["format"] == "nf4" else "P"
            ax.plot([r["blocksize"]], [r["ppl"]], marker, ms=11, mfc="none",
                    label=f"bitsandbytes {r['format'].upper()}" + (" + DQ" if r["double_quant"] else ""))  # fmt: skip
    ax.axhline(baseline, color="k", lw=1, label="16-bit")
    ax.set_xscale("log", base=2)
    ax.set_xticks(BLOCKSIZES, [str(b) for b in BLOCKSIZES])
    ax.set_xlabel("blocksize")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main
def run(args) -> Path:
    if args.model:
        from nf4lora.train.resources import resolve_model

        model_dir, model_name = resolve_model(args.model), args.model
    else:
        from nf4lora.train.resources import default_model_dir

        model_dir, model_name = default_model_dir(), "built-in SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF)"
    caveat = None if args.model else DEFAULT_MODEL_CAVEAT
    blocksizes = sorted({int(b) for b in args.blocksizes.split(",")} | {PEER_BLOCKSIZE})  # 64: the peer comparison
    ids = text_ids(model_dir, args.tokens)
    t_start = time.perf_counter()
    results = []

    def record(impl, fmt, dq, bs, logits_fn):
        t0 = time.perf_counter()
        r = perplexity(logits_fn, ids, args.seq_len, args.stride)
        r.update(impl=impl, format=fmt, double_quant=dq, blocksize=bs, seconds=time.perf_counter() - t0)
        results.append(r)
        print(f"{impl:13s} {fmt:7s} dq={dq!s:5s} bs={bs!s:4s} ppl {r['ppl']:.4f}", flush=True)
        return r

    model = load_ours(model_dir, None)
    base = record("nf4lora", "16-bit", None, None, ours_logits(model))
    sqnr_rows = layer_errors(model)
    del model
    for fmt in FORMATS:
        for dq in (True, False):
            for bs in blocksizes:
                model = load_ours(model_dir, fmt, dq, bs)
                record("nf4lora", fmt, dq, bs, ours_logits(model))
                del model

    record("transformers", "16-bit", None, None, hf_logits(load_hf(model_dir, None)))
    same_bytes = {}
    for fmt in FORMATS:
        plain = quantized_tensors(load_ours(model_dir, fmt, False, PEER_BLOCKSIZE).state_dict())
        plain_absmax = {k: v for k, v in plain.items() if k.endswith(".weight.absmax")}
        for dq in (True, False):
            peer = load_hf(model_dir, fmt, dq)
            ours = load_ours(model_dir, fmt, dq, PEER_BLOCKSIZE)
            same_bytes[f"{fmt}{'+dq' if dq else ''}"] = compare_bytes(ours, peer, plain_absmax if dq else None)
            # In eval mode on a CPU with AVX512-BF16, bitsandbytes' Linear4bit.forward repacks the weight for its
            # CPU kernel and rounds the absmax to bfloat16 (see the report); in train mode (no dropout anywhere in
            # LLaMA, and no grad here) it runs its generic path: dequantize_4bit to float32, then a matmul.
            record("bitsandbytes", fmt, dq, PEER_BLOCKSIZE, hf_logits(peer.train()))
            del peer, ours
    eval_path = record("bitsandbytes", "nf4", True, PEER_BLOCKSIZE, hf_logits(load_hf(model_dir, "nf4", True)))
    eval_path["impl"] = "bitsandbytes eval-mode CPU path"
    elapsed = time.perf_counter() - t_start

    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    second_line = f"\n{PLOT_CAVEAT}" if caveat else ""
    plot_ppl(results, base["ppl"], f"Perplexity vs blocksize ({args.tokens} tokens of pydoc text){second_line}",
             out / "quality-ppl.png")  # fmt: skip
    plot_sqnr(sqnr_rows, f"Per-layer quantization error (blocksize 64, double quant){second_line}",
              out / "quality-sqnr.png")  # fmt: skip
    markdown = report(args, model_name, results, base, same_bytes, sqnr_rows, elapsed, caveat)
    print(markdown)
    data = {"machine": machine(), "versions": versions(*PEERS), "args": vars(args), "model": model_name,
            "baseline_caveat": caveat, "perplexity": results, "identical_bytes": same_bytes, "layers": sqnr_rows}  # fmt: skip
    return write_results_in(out, "quality", markdown, data)


def report(args, model_name, results, base, same_bytes, sqnr_rows, elapsed, caveat=None) -> str:
    """The markdown; `caveat` (the default model's) goes first, under the title, and under each plot."""
    def find(impl, fmt, dq=None, bs=None):
        return next(r for r in results if r["impl"] == impl and r["format"] == fmt and r["double_quant"] == dq
                    and r["blocksize"] == bs)  # fmt: skip

    rows = []
    for r in results:
        name = r["format"].upper() if r["format"] != "16-bit" else "16-bit"
        rows.append([r["impl"], name, {True: "on", False: "off", None: ""}[r["double_quant"]], r["blocksize"] or "",
                     f"{r['ppl']:.4f}", f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%"])  # fmt: skip
    hf16 = find("transformers", "16-bit")
    pairs = []
    for fmt in FORMATS:
        for dq in (True, False):
            ours, peer = find("nf4lora", fmt, dq, PEER_BLOCKSIZE), find("bitsandbytes", fmt, dq, PEER_BLOCKSIZE)
            b = same_bytes[f"{fmt}{'+dq' if dq else ''}"]
            pairs.append([fmt.upper() + (" + DQ" if dq else ""), f"{ours['ppl']:.6f}", f"{peer['ppl']:.6f}",
                          f"{ours['ppl'] / peer['ppl'] - 1:+.2e}", f"{b['identical']} / {b['tensors']}"])  # fmt: skip
    pairs.append(["16-bit (no quantization)", f"{base['ppl']:.6f}", f"{hf16['ppl']:.6f}",
                  f"{base['ppl'] / hf16['ppl'] - 1:+.2e}", "-"])  # fmt: skip
    notes = []
    for key, b in same_bytes.items():
        label = key.upper().replace("+DQ", " + DQ")
        if b["identical"] == b["tensors"]:
            notes.append(f"- {label}: all {b['tensors']} quantized tensors (packed weights, absmax, code tables) are "
                         "identical bytes.")  # fmt: skip
            continue
        text = f"- {label}: {b['identical']} of {b['tensors']} quantized tensors identical"
        if "absmax_codes" in b:
            text += (f"; {b['absmax_codes_differing']} of {b['absmax_codes']} double-quantized (8-bit) absmax codes "
                     f"differ, and in {b['ours_nearer']} of those ours decodes nearer to the exact float32 absmax. "
                     "nf4lora picks the exactly nearest dynamic-map code; bitsandbytes 0.50's CPU quantize_blockwise "
                     "takes it from a lookup table that is sometimes one code off (nf4/quantize.py, "
                     "quantize_blockwise_8bit). The packed 4-bit weights are identical")  # fmt: skip
        notes.append(text + f" (differing: {', '.join(b['differing'][:3])}{', ...' if len(b['differing']) > 3 else ''}).")
    from bitsandbytes.functional import has_avx512bf16

    avx512_bf16 = has_avx512bf16()
    eval_path = find("bitsandbytes eval-mode CPU path", "nf4", True, PEER_BLOCKSIZE)
    peer_nf4 = find("bitsandbytes", "nf4", True, PEER_BLOCKSIZE)
    explanation = [
        "The bitsandbytes rows use its generic CPU path (module in train mode, no grad: dequantize_4bit to float32, "
        "then a matmul), which computes exactly what ours computes. With identical bytes the remaining perplexity "
        "difference is the two model implementations doing the same float32 math in a different order (attention "
        "kernel, RoPE and RMSNorm formulations); the 16-bit row, where nothing is quantized, measures that alone.",
        "",
        *notes,
        "",
        f"In eval mode on a CPU with AVX512-BF16 ({'this one has it' if avx512_bf16 else 'not this one: here eval mode runs the generic path too'}), "
        f"bitsandbytes' Linear4bit.forward instead repacks the weight for its own CPU kernel and stores the block "
        f"absmax as bfloat16 (after undoing double quantization), so the scales keep 8 significant bits: that "
        f"path gives NF4 + DQ perplexity {eval_path['ppl']:.6f} "
        f"({eval_path['ppl'] / peer_nf4['ppl'] - 1:+.2e} relative to its generic path). After such a forward, its "
        "state_dict no longer holds the original absmax (the bfloat16 rounding stays), which is why the bytes above "
        "are compared before any forward.",
    ]
    by_proj = []
    for proj in PROJECTIONS:
        pts = [r for r in sqnr_rows if r["layer"].endswith(proj)]
        if pts:
            nf4, fp4 = [r["nf4_sqnr_db"] for r in pts], [r["fp4_sqnr_db"] for r in pts]
            by_proj.append([proj, len(pts), f"{sum(nf4) / len(nf4):.2f} ({min(nf4):.2f} .. {max(nf4):.2f})",
                            f"{sum(fp4) / len(fp4):.2f} ({min(fp4):.2f} .. {max(fp4):.2f})",
                            f"{sum(a - b for a, b in zip(nf4, fp4)) / len(pts):+.2f}"])  # fmt: skip
    full = [[r["layer"], "x".join(map(str, r["shape"])), f"{r['nf4_sqnr_db']:.2f}", f"{r['fp4_sqnr_db']:.2f}"]
            for r in sqnr_rows]  # fmt: skip
    caption = f" *{PLOT_CAVEAT}.*" if caveat else ""
    md = [
        "# Quality: perplexity and per-layer quantization error",
        "",
        *([f"**{caveat}**", ""] if caveat else []),
        environment_block(*PEERS),
        f"Model: {model_name} (`{args.model or 'default'}`). Text: the first {args.tokens} tokens of CPython's "
        f"documentation topics (pydoc_data.topics, keys in sorted order), tokenized by nf4lora's Tokenizer; windows "
        f"of {args.seq_len} tokens, stride {args.stride}; {base['tokens_scored']} tokens scored. Every forward in "
        f"float32 (weights dequantized to float32; no autocast). Whole run: {elapsed / 60:.1f} min.",
        "",
        "## Perplexity",
        "",
        markdown_table(["implementation", "weights", "double quant", "blocksize", "perplexity", "vs 16-bit"], rows),
        "",
        "![perplexity vs blocksize](quality-ppl.png)" + caption,
        "",
        "## nf4lora vs bitsandbytes on the same weights (blocksize 64)",
        "",
        markdown_table(["format", "nf4lora ppl", "bitsandbytes ppl", "relative difference", "identical 4-bit tensors"],
                       pairs),  # fmt: skip
        "",
        *explanation,
        "",
        "## Per-layer quantization error (blocksize 64, double quantization)",
        "",
        "SQNR = 10 log10(sum w^2 / sum (w - w_hat)^2) per decoder Linear weight (nf4lora.nf4.sqnr_db), averaged per "
        "projection (min .. max over layers).",
        "",
        markdown_table(["projection", "layers", "NF4 SQNR dB", "FP4 SQNR dB", "NF4 - FP4 dB"], by_proj),
        "",
        "![per-layer SQNR](quality-sqnr.png)" + caption,
        "",
        "<details><summary>Every layer</summary>",
        "",
        markdown_table(["layer", "shape", "NF4 SQNR dB", "FP4 SQNR dB"], full),
        "",
        "</details>",
    ]
    return "\n".join(md)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF LLaMA checkpoint directory (default: built-in SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=1024, help="length of the text slice in tokens (1024: ~15 min on 2 busy cores)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--blocksizes", default=",".join(str(b) for b in BLOCKSIZES if 32 <= b <= 256))
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not 0 < args.stride <= args.seq_len:
        raise ValueError(f"--stride must be in 1..--seq-len ({args.seq_len}), got {args.stride}")
    if args.seq_len < 2 or args.tokens < args.seq_len:
        raise ValueError(f"--tokens ({args.tokens}) must be >= --seq-len ({args.seq_len}) >= 2")
    print(run(args))


if __name__ == "__main__":
    main()
