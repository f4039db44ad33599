"""End-to-end QLoRA training step: ours vs Hugging Face transformers + PEFT + bitsandbytes, same run.

Both sides train the same checkpoint on the same token batches with the same settings: the decoder Linear layers
in NF4 + double quantization (blocksize 64) computing in the dtype "auto" picks for the device (bf16 on CPUs
with native bf16 and on GPUs that have it, float32 on other CPUs: kernels/precision.py), embeddings and norms in
that dtype, LoRA r=16, alpha=32, dropout 0 on every decoder Linear ("all-linear"), identical LoRA A initialisation
(B = 0), autocast to that dtype where it is 16-bit, the same
AdamW hyper-parameters, gradient checkpointing on or off for both, glibc malloc with its default settings in both
processes. Each (side, tokens-per-step) point runs in its own subprocess so that peak memory (RSS on the CPU; max
allocated on CUDA) belongs to that side alone. On the CPU an ablation reruns both sides at the default point with
freed memory kept (what nf4lora's training loop does with --keep-freed-memory: train/allocator.py).

    .venv/bin/python benchmarks/bench_qlora_step.py                        # CPU, the built-in SmolLM2-135M
    .venv/bin/python benchmarks/bench_qlora_step.py --model DIR            # any HF LLaMA checkpoint directory
    .venv/bin/python benchmarks/bench_qlora_step.py --device cuda --synthetic 1b --seq-len 2048 \\
        --tokens-per-step 2048,4096,8192 --grad-ckpt on                    # the GPU check (random-init ~1.1B)

Reports tokens/s (median over the steps after warm-up, with min..max), peak memory and both losses step by step;
on CUDA also the MFU and the GPU targets at every point; at the default point it adds a torch.profiler table of
one step of each side (on CUDA, by kernel). Writes
benchmarks/results/qlora-step-<device>.{md,json,png} (or into --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from nf4lora.kernels.precision import auto_compute_dtype
from harness import (RESULTS, capped_suffix, english_text, environment_block, machine, markdown_table, peak_rss_mb, versions,
                     write_results_in)

PEERS = ("transformers", "peft", "bitsandbytes")
SIDES = ("ours", "peer")
LABELS = {"ours": "ours (nf4lora)", "peer": "HF transformers + PEFT + bitsandbytes"}
LOSS_CHUNK_TOKENS = 128  # as TrainConfig.loss_chunk_tokens: the loss without the full logits
# The GPU step's targets (docs/benchmarking.md): ours against the peer at every tokens-per-step point, and our MFU.
GPU_TARGETS = {"speed": 1.5, "memory": 1.0, "mfu": 0.40}
H200_BF16_TFLOPS = 790.0  # dense bf16 matmul rate measured on an H200 (docs/benchmarking.md), not the 989 nominal
LORA = dict(r=16, alpha=32, dropout=0.0)  # QLoRA's usual rank for small models; alpha = 2r
ADAMW = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # the QLoRA paper's rate, no decay on LoRA
# Random-init LLaMA-style configurations for --synthetic: "1b" is TinyLlama-1.1B's shape (GQA 32/4), "tiny" is
# for smoke tests.
SYNTHETIC = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ data
def make_token_ids(model_dir: str, n_tokens: int, data: str, vocab_size: int) -> torch.Tensor:
    """n_tokens ids (int64): pydoc text tokenized by our Tokenizer (repeated if short), or seeded random ids."""
    if data == "random":
        return torch.randint(0, vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    from nf4lora.models import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(english_text(6 * n_tokens), add_special_tokens=False)  # >= 1 token per 6 chars
    reps = math.ceil(n_tokens / len(ids))
    return torch.tensor((ids * reps)[:n_tokens], dtype=torch.int64)


def batch_at(ids: torch.Tensor, step: int, batch: int, seq_len: int) -> torch.Tensor:
    """The (batch, seq_len) window of step `step`, wrapping around the id stream: both sides see the same."""
    n = batch * seq_len
    start = (step * n) % (ids.numel() - n + 1)
    return ids[start : start + n].view(batch, seq_len)


def checkpoint_params(model_dir: str) -> int:
    """Parameters stored in a safetensors checkpoint (a tied embedding once): N of the 6N FLOP-per-token rule."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def write_synthetic_checkpoint(name: str, out_dir: str) -> str:
    """A random-init LLaMA-style checkpoint (bf16 safetensors + config.json) saved by transformers."""
    import transformers

    cfg = transformers.LlamaConfig(**SYNTHETIC[name], rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


# -------------------------------------------------------------------------------------------- the two sides
def canonical_lora_name(name: str) -> str:
    """PEFT's "base_model.model.X.lora_A.default.weight" and our "X.lora_A.weight" -> "X.lora_A.weight"."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def init_lora_identically(model: torch.nn.Module) -> int:
    """Give every lora_A the same values on both sides (kaiming-uniform bound 1/sqrt(fan_in), seeded by the
    layer's canonical name) and every lora_B zeros; returns the number of trainable parameters."""
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            n += p.numel()
            if ".lora_A." in name:
                g = torch.Generator().manual_seed(zlib.crc32(canonical_lora_name(name).encode()))
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
            elif ".lora_B." in name:
                p.zero_()
            else:
                raise ValueError(f"unexpected trainable parameter {name!r}: only LoRA A/B should train")
    return n


def compute_dtype(device: torch.device) -> torch.dtype:
    """Both sides' dtype: what "auto" picks for this device (the same answer in every worker process)."""
    return auto_compute_dtype(device).dtype


def build_ours(model_dir: str, device: torch.device, grad_ckpt: bool):
    from nf4lora.lora import add_lora
    from nf4lora.models import load_model
    from nf4lora.train.optim import PagedAdamW

    model = load_model(model_dir, quantize="nf4", double_quant=True, blocksize=64, compute_dtype=compute_dtype(device),
                       device=device)  # fmt: skip
    add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules="all-linear")
    model.gradient_checkpointing = grad_ckpt
    model.loss_chunk_tokens = LOSS_CHUNK_TOKENS
    model.train()
    init_lora_identically(model)
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)

    def loss_fn(ids):
        return model(ids, labels=ids).loss

    return model, optimizer, loss_fn, "nf4lora PagedAdamW (fp32 state in CPU memory)"


def build_peer(model_dir: str, device: torch.device, grad_ckpt: bool):
    import bitsandbytes as bnb
    import peft
    import transformers

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype(device))  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=compute_dtype(device),
                                                              device_map={"": str(device)})  # fmt: skip
    model.config.use_cache = False
    if grad_ckpt:  # non-reentrant, like ours; PEFT's prepare_model_for_kbit_training is not used because it
        # upcasts norms and embeddings to fp32, which ours does not do (same dtypes on both sides).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, config)
    model.train()
    init_lora_identically(model)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer, name = bnb.optim.PagedAdamW32bit(params, **ADAMW), "bitsandbytes PagedAdamW32bit"
    except (RuntimeError, NotImplementedError):  # builds without paged memory on this device
        optimizer, name = torch.optim.AdamW(params, **ADAMW), "torch.optim.AdamW (bitsandbytes PagedAdamW unavailable)"

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, optimizer, loss_fn, name


def profile_step(step, cuda: bool, rows: int = 12) -> list[list]:
    """torch.profiler table of one call of `step`: the top `rows` ops by self time (device time on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    return [[e.key, e.count, f"{self_us(e) / 1e3:.1f} ms", f"{100 * self_us(e) / total:.1f}%"] for e in events[:rows]]


def run_worker(args) -> dict:
    """One side at one tokens-per-step point: load, then `warmup + steps` optimizer steps. Runs in its own process."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    malloc = "default"
    if args.malloc == "kept":
        if cuda:  # the CUDA allocator holds the activations there: the glibc setting would measure nothing
            raise ValueError("--malloc kept is a CPU ablation; CUDA runs keep glibc's defaults")
        from nf4lora.train.allocator import keep_freed_memory

        malloc = "kept" if keep_freed_memory() else "default (keep_freed_memory had no effect: not glibc)"
    t0 = time.perf_counter()
    build = build_ours if args.worker == "ours" else build_peer
    model, optimizer, loss_fn, optimizer_name = build(args.model, device, args.grad_ckpt == "on")
    load_s = time.perf_counter() - t0
    from safetensors.torch import load_file

    ids = load_file(args.data_file)["ids"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    dtype = compute_dtype(device)

    def step(i: int) -> float:
        batch = batch_at(ids, i, args.batch, args.seq_len).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # .item() synchronises a CUDA device, so the step time is complete

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t)
    result = {
        "side": args.worker, "compute_dtype": str(auto_compute_dtype(device)), "optimizer": optimizer_name, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_per_step": args.batch * args.seq_len, "losses": losses, "step_s": times, "load_s": load_s,
        "peak_rss_mib": peak_rss_mb(), "trainable_params": trainable, "malloc": malloc,
    }  # fmt: skip
    if cuda:
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.profile:  # after the peak was read: the profiler's own memory is not counted
        result["profile"] = profile_step(lambda: step(args.warmup + args.steps), cuda, rows=25 if cuda else 12)
    return result


# ------------------------------------------------------------------------------------------ the orchestrator
def run_side(
    side: str, args, model_dir: str, data_file: str, batch: int, profile: bool, malloc: str = "default"
) -> dict:
    """One worker process of `side`. malloc: "default" (glibc's settings, both sides' headline runs) or "kept"
    (freed memory kept, as nf4lora's training loop does with --keep-freed-memory: the CPU ablation)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model", model_dir,
           "--data-file", data_file, "--device", args.device, "--batch", str(batch), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--grad-ckpt", args.grad_ckpt,
           "--malloc", malloc]  # fmt: skip
    if profile:
        cmd.append("--profile")
    how = "" if args.device.startswith("cuda") else f", glibc malloc {'defaults' if malloc == 'default' else 'keeping freed memory'}"
    print(f"[{side}{how}] batch {batch} x {args.seq_len} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(runs: list[dict], warmup: int) -> dict:
    """One side's result at one point from its rounds (one process each): the first round's losses and profile,
    tokens/s over the timed steps of every round (median, min..max, and each round's median, which shows drift
    of the machine between rounds), and the largest peak memory."""
    merged = dict(runs[0])
    tps = [[r["tokens_per_step"] / t for t in r["step_s"][warmup:]] for r in runs]
    pooled = [x for round_tps in tps for x in round_tps]
    merged["tokens_per_s"] = {
        "median": statistics.median(pooled), "min": min(pooled), "max": max(pooled), "n": len(pooled),
        "round_medians": [statistics.median(round_tps) for round_tps in tps],
    }  # fmt: skip
    merged["step_s_rounds"] = [r["step_s"] for r in runs]
    merged["load_s"] = statistics.median(r["load_s"] for r in runs)
    for key in ("peak_rss_mib", "peak_cuda_mib"):
        if key in merged:
            merged[key] = max(r[key] for r in runs)
    return merged


def plot(points: list[dict], default_tokens: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for side, style in (("ours", "o-"), ("peer", "s--")):
        xs = [p["tokens_per_step"] for p in points]
        med = [p[side]["tokens_per_s"]["median"] for p in points]
        lo = [m - p[side]["tokens_per_s"]["min"] for m, p in zip(med, points)]
        hi = [p[side]["tokens_per_s"]["max"] - m for m, p in zip(med, points)]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=4, label=LABELS[side])
        at_default = next(p for p in points if p["tokens_per_step"] == default_tokens)
        ax_loss.plot(range(1, len(at_default[side]["losses"]) + 1), at_default[side]["losses"], style, label=LABELS[side])
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["tokens_per_step"] for p in points], [str(p["tokens_per_step"]) for p in points])
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("tokens/s (median, bars: min..max)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax_loss.set_xlabel(f"step (at {default_tokens} tokens per step)")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_average() -> float:
    """The 1-minute load average: above the core count's share of one job, other jobs were running."""
    return os.getloadavg()[0]


def orchestrate(args) -> Path:
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        if args.synthetic:
            model_dir = write_synthetic_checkpoint(args.synthetic, os.path.join(tmp, f"synthetic-{args.synthetic}"))
            model_name, data = f"random-init LLaMA ({args.synthetic})", "random"
        else:
            from nf4lora.train.resources import resolve_model

            model_dir = resolve_model(args.model)
            model_name, data = (args.model or "built-in SmolLM2-135M-Instruct"), args.data
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        n_params = checkpoint_params(model_dir)
        sweep = sorted(int(t) for t in args.tokens_per_step.split(","))
        bad = [t for t in sweep if t % args.seq_len]
        if bad:
            raise ValueError(f"--tokens-per-step values {bad} are not multiples of --seq-len {args.seq_len}")
        default = args.batch * args.seq_len if args.batch * args.seq_len in sweep else sweep[len(sweep) // 2]
        n_tokens = max(sweep) * (args.warmup + args.steps + 1)
        ids = make_token_ids(model_dir, n_tokens, data, vocab)
        from safetensors.torch import save_file

        data_file = os.path.join(tmp, "ids.safetensors")
        save_file({"ids": ids}, data_file)
        load_before = load_average()
        name = "qlora-step-cuda" if args.device.startswith("cuda") else "qlora-step-cpu" + capped_suffix()
        out = Path(args.out) if args.out else RESULTS
        out.mkdir(parents=True, exist_ok=True)
        points = []
        # The default point first, then the results files are rewritten after every point: a run cut short (a
        # GPU slot's time limit) keeps what it measured.
        for tokens in [default] + [t for t in sweep if t != default]:
            batch = tokens // args.seq_len
            profile = tokens == default and not args.no_profile
            point = {"tokens_per_step": tokens, "batch": batch}
            runs = {side: [] for side in SIDES}
            for round_ in range(args.rounds):  # sides take turns, the first alternating, so drift hits both
                for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                    runs[side].append(run_side(side, args, model_dir, data_file, batch, profile and round_ == 0))
            for side in SIDES:
                point[side] = merge_rounds(runs[side], args.warmup)
            if tokens == default and not args.device.startswith("cuda") and not args.no_ablation:
                # The ablation: each side once more with freed memory kept, how much of each side's time is the
                # allocator (the headline runs both with glibc's defaults).
                point["malloc_kept"] = {
                    side: merge_rounds([run_side(side, args, model_dir, data_file, batch, False, "kept")], args.warmup)
                    for side in SIDES
                }  # fmt: skip
            point["speedup"] = point["ours"]["tokens_per_s"]["median"] / point["peer"]["tokens_per_s"]["median"]
            mem = "peak_cuda_mib" if args.device.startswith("cuda") else "peak_rss_mib"
            point["memory_ratio"] = point["ours"][mem] / point["peer"][mem]
            points.append(point)
            print(f"  {tokens} tokens/step: {point['speedup']:.2f}x tokens/s, {point['memory_ratio']:.2f}x memory "
                  f"(tokens/s ours {point['ours']['tokens_per_s']['median']:.0f}, peer "
                  f"{point['peer']['tokens_per_s']['median']:.0f}; {mem} ours {point['ours'][mem]:.0f}, peer "
                  f"{point['peer'][mem]:.0f})", flush=True)
            points.sort(key=lambda p: p["tokens_per_step"])
            path = write_step_results(args, out, name, points, default, model_name, data, load_before, n_params)
    print(path.with_suffix(".md").read_text())
    return path


def write_step_results(args, out: Path, name: str, points, default, model_name, data, load_before, n_params):
    """The plot, the markdown report and the JSON of the points measured so far (the default point among them)."""
    load_after = load_average()
    title = f"QLoRA training step, {model_name}: ours vs HF + PEFT + bitsandbytes ({args.device})"
    plot(points, default, title, out / f"{name}.png")
    markdown = report(args, points, default, model_name, data, name, (load_before, load_after), n_params)
    data_json = {"machine": machine(), "versions": versions(*PEERS), "args": vars(args), "model": model_name,
                 "data": data, "params": n_params, "default_tokens_per_step": default, "lora": LORA, "adamw": ADAMW,
                 "load_average": [load_before, load_after], "compute_dtype": points[0]["ours"]["compute_dtype"],
                 "points": points}  # fmt: skip
    return write_results_in(out, name, markdown, data_json)


def report(args, points, default, model_name, data, name, loads, n_params) -> str:
    cuda = args.device.startswith("cuda")
    mem_key, mem_name = ("peak_cuda_mib", "peak CUDA allocated") if cuda else ("peak_rss_mib", "peak RSS")
    at = next(p for p in points if p["tokens_per_step"] == default)
    dtype_text = at["ours"]["compute_dtype"]  # "bfloat16 (why)", as the worker found it
    dtype_name, dtype_reason = dtype_text.split(" ", 1)[0], dtype_text.split(" ", 1)[1].strip("()")

    def tps(r):
        t = r["tokens_per_s"]
        rounds = ", ".join(f"{m:.0f}" for m in t["round_medians"])  # merge_rounds always sets them
        return f"{t['median']:.0f} ({t['min']:.0f} .. {t['max']:.0f}); rounds {rounds}"

    rows = []
    for p in points:
        for side in SIDES:
            r = p[side]
            rows.append([p["tokens_per_step"], f"{p['batch']} x {args.seq_len}", LABELS[side], tps(r),
                         f"{r[mem_key]:.0f} MiB", f"{r['load_s']:.1f} s",
                         f"{p['speedup']:.2f}x" if side == "ours" else "", f"{p['memory_ratio']:.2f}x" if side == "ours" else ""])  # fmt: skip
    if cuda:
        flop = flop_per_token(n_params, args.grad_ckpt == "on")
        for p in points:
            for side in SIDES:
                p[side]["mfu"] = flop * p[side]["tokens_per_s"]["median"] / (args.peak_tflops * 1e12)
    loss_rows = [[i + 1, f"{lo:.4f}", f"{lp:.4f}", f"{lo - lp:+.4f}"]
                 for i, (lo, lp) in enumerate(zip(at["ours"]["losses"], at["peer"]["losses"]))]  # fmt: skip
    max_rel = max(abs(lo - lp) / abs(lp) for lo, lp in zip(at["ours"]["losses"], at["peer"]["losses"]))
    target_speed, target_mem = (GPU_TARGETS["speed"], GPU_TARGETS["memory"]) if cuda else (1.5, 0.7)
    met = at["speedup"] >= target_speed and (target_mem is None or at["memory_ratio"] <= target_mem)
    md = [
        f"# QLoRA training step: ours vs HF transformers + PEFT + bitsandbytes ({args.device})",
        "",
        environment_block(*PEERS),
        f"Load average (1 min) {loads[0]:.2f} before and {loads[1]:.2f} after the run on {os.cpu_count()} cores"
        + (": the machine was shared with other jobs, so timings are noisy." if max(loads) > 1.5 else "."),
        "",
        "## Settings (identical on both sides)",
        "",
        f"- Model: {model_name} (`{args.model or 'default'}`); data: "
        + ("pydoc_data.topics text tokenized by nf4lora's Tokenizer" if data == "text" else "seeded random token ids")
        + "; labels = inputs (next-token loss over every position).",
        f"- Decoder Linear layers NF4 + double quantization, blocksize 64, compute dtype {dtype_name} "
        f"(`auto`: {dtype_reason}); embeddings, norms and lm_head {dtype_name} (tied when the checkpoint ties "
        "them); " + (f"{dtype_name} autocast around forward and loss." if dtype_name != "float32"
                     else "no autocast (float32 throughout)."),
        f"- LoRA r={LORA['r']}, alpha={LORA['alpha']}, dropout {LORA['dropout']}, targets all-linear (q,k,v,o,gate,up,"
        f"down; not lm_head), adapters fp32, lora_A initialised to the same values on both sides, lora_B = 0.",
        f"- AdamW lr {ADAMW['lr']}, betas {ADAMW['betas']}, eps {ADAMW['eps']}, weight decay {ADAMW['weight_decay']}. "
        f"Ours: {at['ours']['optimizer']}; peer: {at['peer']['optimizer']}.",
        f"- Gradient checkpointing: {args.grad_ckpt} (non-reentrant on both sides). Sequence length {args.seq_len}; "
        f"{args.warmup} warm-up steps, then {args.steps} timed steps, in each of {args.rounds} rounds (one fresh "
        "process per side and round, the sides taking turns); tokens/s = tokens per step / step time "
        "(forward + backward + optimizer step), median (min .. max) over all rounds' timed steps; the rounds' own "
        "medians are listed to show drift of the machine. Peak memory is the largest of the rounds.",
        f"- Loss: the same shifted cross-entropy on both sides. Ours computes lm_head + loss {LOSS_CHUNK_TOKENS} "
        "positions at a time (nf4lora's default, `loss_chunk_tokens`), never holding the full (tokens, vocab) "
        "logits; the peer materialises them, as transformers does.",
        "- Processes: glibc malloc with its default settings on both sides"
        + (" (nf4lora's training loop can keep freed memory instead, with --keep-freed-memory; both sides with that setting: \"Ablation: the allocator's "
           "share\" below).\n" if not cuda else ".\n")
        + f"- Each side and each point runs in its own process; {mem_name} is that process's peak"
        + (" (RSS includes the Python/torch runtime and, for the peer, transformers + PEFT + bitsandbytes)." if not cuda
           else " (torch's CUDA allocator; neither side's paged optimizer state is in it: ours lives in CPU memory, "
           "bitsandbytes' in CUDA managed memory)."),
        "",
        "## Results",
        "",
        markdown_table(["tokens/step", "batch", "side", "tokens/s median (min .. max)", mem_name, "load",
                        "speed ours/peer", "memory ours/peer"], rows),  # fmt: skip
        "",
        f"![tokens/s vs tokens per step]({name}.png)",
        "",
        f"**At {default} tokens per step: ours {at['speedup']:.2f}x the peer's tokens/s at {at['memory_ratio']:.2f}x its "
        f"{mem_name}** (target >= {target_speed}x" + (f" at <= {target_mem}x {mem_name}" if target_mem else "") + "): "
        + ("met." if met else "not met" + _shortfall(at, target_speed, target_mem) + "."),
    ]
    if cuda:
        md += ["", "## Targets at every point (docs/benchmarking.md)", "",
               f"MFU: {flop_per_token(n_params, args.grad_ckpt == 'on') / 1e9:.2f} GFLOP per token (6N, N = "
               f"{n_params / 1e6:.0f}M checkpoint parameters, + 2N for the forward that checkpointing recomputes; "
               f"attention's own products not counted) x tokens/s, against {args.peak_tflops} TFLOP/s dense bf16.",
               "", markdown_table(["tokens/step", "speed ours/peer", "memory ours/peer", "MFU ours", "MFU peer", "met"],
                                  [gpu_targets_row(p) for p in points])]  # fmt: skip
    if "malloc_kept" in at:
        kept = at["malloc_kept"]

        def ratio(ours, peer):
            return ours["tokens_per_s"]["median"] / peer["tokens_per_s"]["median"]

        md += [
            "",
            f"## Ablation: the allocator's share ({default} tokens per step, one extra process per side)",
            "",
            "The headline runs both sides with glibc malloc's defaults, which return freed activations to the OS, so "
            "each step faults them in again. nf4lora's training loop can keep freed memory for the next step "
            "instead, with --keep-freed-memory (`keep_freed_memory`, train/allocator.py). Each side once more with "
            "that setting:",
            "",
            markdown_table(["side", "malloc", "tokens/s median (min .. max)", "peak RSS"], [
                [LABELS["ours"], "glibc defaults (the headline)", tps(at["ours"]), f"{at['ours'][mem_key]:.0f} MiB"],
                [LABELS["ours"], "freed memory kept", tps(kept["ours"]), f"{kept['ours'][mem_key]:.0f} MiB"],
                [LABELS["peer"], "glibc defaults (the headline)", tps(at["peer"]), f"{at['peer'][mem_key]:.0f} MiB"],
                [LABELS["peer"], "freed memory kept", tps(kept["peer"]), f"{kept['peer'][mem_key]:.0f} MiB"],
            ]),  # fmt: skip
            "",
            f"Ours / peer: both with glibc defaults (the headline) {ratio(at['ours'], at['peer']):.2f}x; both with "
            f"freed memory kept {ratio(kept['ours'], kept['peer']):.2f}x; ours kept vs the peer's defaults (nf4lora's "
            f"training loop vs the Hugging Face Trainer's process, different settings) "
            f"{ratio(kept['ours'], at['peer']):.2f}x.",
        ]
    md += [
        "",
        f"## Loss over the same steps ({default} tokens per step)",
        "",
        f"Largest relative difference: {max_rel:.2%} (different kernels and summation orders in {dtype_name}; the "
        "quantized weights are the same bytes).",
        "",
        markdown_table(["step", "ours", "peer", "ours - peer"], loss_rows),
    ]
    for side in SIDES:
        if "profile" in at[side]:
            kind = "self CUDA time" if cuda else "self CPU time"
            md += ["", f"## Where the time goes: one step of {LABELS[side]} ({default} tokens), torch.profiler {kind}",
                   "", markdown_table(["op", "calls", kind, "share"], at[side]["profile"])]  # fmt: skip
    return "\n".join(md)


def flop_per_token(n_params: int, grad_ckpt: bool) -> float:
    """Training FLOP per token by the usual 6N rule (forward 2N, backward 4N, as for full training), plus the 2N of
    the forward that gradient checkpointing runs a second time."""
    return (8 if grad_ckpt else 6) * n_params


def gpu_targets_row(p: dict) -> list:
    """One point against the GPU targets: speed, memory and our MFU, and which of them are met."""
    ours = p["ours"]["mfu"]
    checks = {"speed": p["speedup"] >= GPU_TARGETS["speed"], "memory": p["memory_ratio"] <= GPU_TARGETS["memory"],
              "MFU": ours >= GPU_TARGETS["mfu"]}  # fmt: skip
    missed = [k for k, ok in checks.items() if not ok]
    return [p["tokens_per_step"], f"{p['speedup']:.2f}x", f"{p['memory_ratio']:.2f}x", f"{ours:.1%}",
            f"{p['peer']['mfu']:.1%}", "yes" if not missed else "no: " + ", ".join(missed)]  # fmt: skip


def _shortfall(at: dict, target_speed: float, target_mem: float | None) -> str:
    parts = []
    if at["speedup"] < target_speed:
        parts.append(f"speed is {at['speedup'] / target_speed:.0%} of the target")
    if target_mem is not None and at["memory_ratio"] > target_mem:
        parts.append(f"memory is {at['memory_ratio'] / target_mem:.0%} of the allowed")
    return " (" + "; ".join(parts) + ")" if parts else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF LLaMA checkpoint directory (default: built-in SmolLM2-135M)")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="benchmark a random-init checkpoint instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", choices=("text", "random"), default="text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="batch at the default point (profiled); default 4")
    parser.add_argument("--tokens-per-step", default="512,1024,2048", help="comma-separated sweep")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2,
                        help="processes per side and point, the sides taking turns (pooled; default 2)")
    parser.add_argument("--grad-ckpt", choices=("on", "off"), default="off")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                        help="dense bf16 rate MFU is measured against on CUDA (default: an H200's measured 790)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-ablation", action="store_true",
                        help="CPU: skip the extra run of each side with freed memory kept (glibc malloc)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    # internal: one side in this process
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=("kept", "default"), default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
    else:
        print(orchestrate(args))


if __name__ == "__main__":
    main()
