"""Per-rank memory of QLoRA training with nf4lora, on paper: a model config, a run's settings, 1..N ranks, DDP or
FSDP2. Each term is counted from what the code holds (the formulas say which tensor), so the plan can be checked
against runs on this machine (--check) and then read for models that do not fit here.

    .venv/bin/python benchmarks/memory_plan.py                  # the committed table: LLaMA-7B/13B/65B/70B
    .venv/bin/python benchmarks/memory_plan.py --check          # small torchrun runs here, measured against the plan
    .venv/bin/python benchmarks/memory_plan.py --config DIR/config.json --seq-len 2048 --ranks 8

Terms, per rank, in bytes (a = bytes of the compute dtype, M = micro_batch * seq_len tokens, W = world size):
- base: packed 4-bit codes (n / 2 bytes per weight) and their QuantState (block absmax as uint8 codes + nested
  float32 absmax + code tables with double quantization). DDP holds all of it; FSDP2 shards the codes (1/W) and
  replicates the state (a plain attribute, ~3% of the codes).
- float params: embeddings, lm_head (untied), norms, in the compute dtype. FSDP2: 1/W.
- fsdp in flight: what FSDP2 all-gathers whole, beside the shards: the root unit (embeddings, final norm,
  lm_head) for the whole forward and backward, and two decoder layers at a time (the one running and the one
  prefetched).
- lora: A (r, in) and B (out, r) of all 7 linears per layer, float32: parameters and gradients. DDP: whole
  (gradients are the all-reduce buckets); FSDP2: 1/W, but whole gradients when a step has several micro-batches
  per rank (they accumulate unsharded until the reduce-scatter of the last one).
- optimizer: PagedAdamW's two float32 tensors per LoRA parameter live in CPU memory (host); on a GPU only two page
  buffers visit the device during step(). On the CPU it all counts.
- activations: what autograd saves per layer and token (models/llama.py, lora/lora.py, SDPA), see
  `saved_per_token_layer`; with gradient checkpointing each layer keeps only its input and one layer is recomputed
  at a time. Plus backward's transient gradients (~3 (M, I) and 2 (M, H) tensors) and the dequantized weight of
  the largest linear (the CPU path's reused scratch; on CUDA the dense weight cuBLAS reads).
- loss: chunked (models/loss.py): the saved (N, H) gradient plus one chunk's logits (compute dtype), float32
  log-probabilities and their cast back; unchunked: the (M, V) logits, their float32 copy and log-softmax.
- load and shard (the CPU runs' other phases): every rank first loads the whole 4-bit base (quantized layer by
  layer: never the 16-bit model) and float params, one stored tensor being cast, and adds the whole LoRA; FSDP2
  then shards unit by unit, the root last (its whole tensors beside their shards, the layers already sharded).
  The CPU peak is the largest of load, shard and training.
Not counted: the process itself (CUDA context ~0.5 GB; on the CPU the interpreter and libraries, ~0.45 GiB,
measured and subtracted by --check), allocator rounding and fragmentation, communication buffers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness import environment_block, markdown_table, write_results

GiB, MiB = 2**30, 2**20
NESTED_BLOCKSIZE = 256  # double quantization: blocks of 256 absmax values share one float32 nested absmax


@dataclass(frozen=True)
class Model:
    """The shapes that decide memory (Hugging Face config.json names in from_config)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> Model:
        heads = cfg["num_attention_heads"]
        return cls(name, cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)))  # fmt: skip

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 linears of a decoder layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * (sum(a * b for a, b in self.linears()) + 2 * self.hidden) + self.hidden


# The published configurations (config.json of each checkpoint).
LLAMA = dict(vocab_size=32000, tie_word_embeddings=False)
PRESETS = {
    "LLaMA-7B": Model.from_config("LLaMA-7B", dict(LLAMA, hidden_size=4096, intermediate_size=11008,
                                                   num_hidden_layers=32, num_attention_heads=32)),
    "LLaMA-13B": Model.from_config("LLaMA-13B", dict(LLAMA, hidden_size=5120, intermediate_size=13824,
                                                     num_hidden_layers=40, num_attention_heads=40)),
    "LLaMA-65B": Model.from_config("LLaMA-65B", dict(LLAMA, hidden_size=8192, intermediate_size=22016,
                                                     num_hidden_layers=80, num_attention_heads=64)),
    "LLaMA-2-70B": Model.from_config("LLaMA-2-70B", dict(LLAMA, hidden_size=8192, intermediate_size=28672,
                                                         num_hidden_layers=80, num_attention_heads=64,
                                                         num_key_value_heads=8)),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """A training run's settings (TrainConfig's names where they exist); defaults are QLoRA's on a GPU."""

    seq_len: int = 512
    micro_batch_size: int = 1  # rows per forward, on each rank
    micro_batches: int = 1  # per rank per optimizer step (batch_size / world_size / micro_batch_size)
    lora_r: int = 16
    blocksize: int = 64
    double_quant: bool = True
    compute_bytes: int = 2  # bf16
    gradient_checkpointing: bool = True
    loss_chunk_tokens: int = 128
    lora_dropout: float = 0.0
    pack: bool = True
    device: str = "cuda"
    page_numel: int = 1 << 20  # PagedAdamW's page (train/optim.py)
    stored_bytes: int = 2  # dtype of the checkpoint's weights (bf16), for the load phase

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


def quantized_bytes(n: int, run: Run) -> tuple[int, int]:
    """(packed codes, QuantState tensors) of one n-element weight (nf4/state.py's fields)."""
    blocks = -(-n // run.blocksize)
    if run.double_quant:  # uint8 absmax codes, float32 nested absmax per 256 blocks, 16 + 256 float32 code tables, offset
        state = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * (16 + 256) + 4
    else:
        state = 4 * blocks + 4 * 16
    return (n + 1) // 2, state


def saved_per_token_layer(model: Model, run: Run) -> int:
    """Bytes autograd keeps per token and decoder layer without recomputation (checked against saved-tensor hooks
    in tests/test_distributed_memory_plan.py):
    2 RMSNorm inputs, float32 (the float32 activation itself, or its float32 copy under bf16) + their rsqrt;
    q and the attention output, k and v after RoPE (SDPA's saved inputs) + its float32 log-sum-exp per head;
    gate, silu(gate) and up (the MLP); each LoRA's (tokens, r) product x @ A.T; without LoRA dropout the inputs
    of the fused LoRA layers (the two normed inputs, shared by q/k/v and by gate/up, and down's input), with
    dropout each linear's dropout mask and dropped input instead; packed rows: SDPA's copy of the (T, T) document
    mask in the compute dtype."""
    a, h, i, r = run.compute_bytes, model.hidden, model.intermediate, run.lora_r
    q, kv = model.heads * model.head_dim, model.kv_heads * model.head_dim
    saved = 2 * h * 4 + 2 * 4 + a * (2 * q + 2 * kv) + 4 * model.heads + 3 * i * a + 7 * r * a
    if run.lora_dropout > 0:
        saved += 2 * a * sum(n_in for n_in, _ in model.linears())
    else:
        saved += a * (2 * h + i)
    if run.pack:
        saved += a * run.seq_len
    return saved


def shard_of(n: int, world: int) -> int:
    """Bytes of a rank's shard of n bytes (FSDP2 pads dim 0 to a multiple of the ranks)."""
    return -(-n // world)


def plan(model: Model, run: Run, world: int, mode: str) -> dict:
    """Bytes per rank, by term (see the module docstring), with "device" (on the GPU, or RAM for a CPU run),
    "host" (CPU memory of a GPU run), "load" and "shard" (the phases before training) totals."""
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"mode must be 'ddp' or 'fsdp', got {mode!r}")
    a, sharded = run.compute_bytes, mode == "fsdp"
    shard = (lambda n: shard_of(n, world)) if sharded else (lambda n: n)
    linears = model.linears()
    packed_layer, state_layer = map(sum, zip(*(quantized_bytes(i * o, run) for i, o in linears)))
    norms_layer = 2 * model.hidden * a
    root = (model.vocab * model.hidden * (1 if model.tied else 2) + model.hidden) * a  # embeddings, lm_head, norm
    lora_layer = 4 * run.lora_r * sum(i + o for i, o in linears)  # float32 A and B
    L, M = model.layers, run.tokens
    t = {
        "base": shard(L * packed_layer) + L * state_layer,
        "float params": shard(root + L * norms_layer),
        "fsdp in flight": 0,
        "lora params": shard(L * lora_layer),
        "lora grads": L * lora_layer if (not sharded or run.micro_batches > 1) else shard(L * lora_layer),
    }
    if sharded:  # all-gathered whole while in use, beside the shards (also with one rank: a second copy)
        t["fsdp in flight"] = root + 2 * (packed_layer + norms_layer + lora_layer)
    state_bytes = 2 * shard(L * lora_layer)  # exp_avg and exp_avg_sq: float32, like the factors
    biggest_lora = 4 * run.lora_r * max(max(i, o) for i, o in linears)
    pages = 2 * 2 * 4 * min(run.page_numel, biggest_lora // 4)  # two slots of (2, page) float32
    t["optimizer"] = state_bytes if run.device == "cpu" else pages
    per_layer = saved_per_token_layer(model, run) * M
    rope_and_mask = M * 2 * model.head_dim * a + (M * run.seq_len if run.pack else 0)  # cos, sin; the bool mask
    if run.gradient_checkpointing:
        t["activations"] = L * M * model.hidden * a + per_layer + rope_and_mask
    else:
        t["activations"] = L * per_layer + rope_and_mask
    largest = max(i * o for i, o in linears)
    chunk_scratch = 6 * MiB if run.device == "cpu" else 0  # the CPU dequantize's codes / pairs buffers
    t["backward transients"] = M * a * (3 * model.intermediate + 2 * model.hidden) + largest * a + chunk_scratch
    final = M * (model.hidden * 4 + 4)  # the final norm's float32 input and rsqrt
    if run.loss_chunk_tokens > 0:
        c = min(run.loss_chunk_tokens, M)
        t["loss"] = final + M * model.hidden * a + c * model.vocab * (2 * a + 4)
    else:
        t["loss"] = final + M * model.hidden * a + M * model.vocab * (a + 4 + 4 + 4)
    device = sum(t.values())
    host = 0 if run.device == "cpu" else state_bytes
    # Load (models/loading.py, in module order): the embeddings first, read as stored and cast (both alive for a
    # moment); at the end the whole base and float params, the last weight being quantized (its stored bytes in the
    # reused read buffer, float32 temporaries).
    embed = model.vocab * model.hidden
    whole = L * (packed_layer + state_layer) + root + L * norms_layer + L * lora_layer
    load = max(embed * (run.stored_bytes + a), whole + largest * (run.stored_bytes + 4))
    if sharded:  # the first layer's shards beside everything whole; the root beside its own shards
        layers_sharded = t["base"] + shard_of(L * norms_layer, world) + t["lora params"]
        sharding = max(whole + shard_of(packed_layer + norms_layer + lora_layer, world),
                       root + shard_of(root, world) + layers_sharded)  # fmt: skip
    else:  # DDP allocates its gradient buckets (the LoRA gradients' size); nothing is broadcast but LoRA
        sharding = whole + L * lora_layer
    return {"terms": t, "device": device, "host": host, "load": load, "shard": sharding}


# ----------------------------------------------------------------------------------------------- the table
def table_rows(models: list[Model], runs: list[Run], worlds: list[int]) -> tuple[list[list], list[dict]]:
    """One row per model, run (sequence length), engine and checkpointing; one cell per world size."""
    rows, data = [], []
    for model in models:
        for run in runs:
            for mode in ("ddp", "fsdp"):
                for gc in (True, False):
                    r = replace(run, gradient_checkpointing=gc)
                    cells = []
                    for w in worlds:
                        p = plan(model, r, w, mode)
                        cells.append(f"{p['device'] / GiB:.1f}")
                        data.append({"model": model.name, "seq_len": r.seq_len, "mode": mode, "world": w,
                                     "gradient_checkpointing": gc, "device_bytes": p["device"],
                                     "host_bytes": p["host"], "terms": p["terms"]})  # fmt: skip
                    one = plan(model, r, 1, mode)
                    rows.append([model.name, f"{r.micro_batch_size} x {r.seq_len}", mode, "on" if gc else "off", *cells,
                                 f"{one['host'] / GiB:.1f}", f"{one['load'] / GiB:.1f}"])  # fmt: skip
    return rows, data


TABLE_HEADER = ["model", "tokens per micro-batch", "engine", "grad. checkpointing"]
TABLE_TAIL = ["host GiB", "load GiB"]


def breakdown(model: Model, run: Run, world: int, mode: str) -> str:
    p = plan(model, run, world, mode)
    rows = [[k, f"{v / GiB:.2f}"] for k, v in p["terms"].items()]
    rows += [["**device total**", f"**{p['device'] / GiB:.2f}**"], ["host (optimizer state)", f"{p['host'] / GiB:.2f}"]]
    return markdown_table(["term", "GiB"], rows)


def write_table(run: Run, worlds: list[int]) -> None:
    models = [PRESETS[n] for n in ("LLaMA-7B", "LLaMA-13B", "LLaMA-2-70B")]
    rows, data = table_rows(models, [run, replace(run, seq_len=4 * run.seq_len)], worlds)
    paper = replace(run, lora_r=64)  # the QLoRA paper: r=64 on every linear, batch 1, seq 512, checkpointing
    p65 = plan(PRESETS["LLaMA-65B"], paper, 1, "ddp")
    p70 = plan(PRESETS["LLaMA-2-70B"], run, worlds[-1], "fsdp")
    d70 = plan(PRESETS["LLaMA-2-70B"], run, 1, "ddp")
    check = load_check()
    md = [
        "# Memory plan: QLoRA per rank, DDP and FSDP2",
        "",
        f"**LLaMA-2-70B, {run.micro_batch_size} x {run.seq_len} tokens per rank, r={run.lora_r}, checkpointing: "
        f"{d70['device'] / GiB:.1f} GiB per rank with DDP at any number of ranks, "
        + " / ".join(f"{plan(PRESETS['LLaMA-2-70B'], run, w, 'fsdp')['device'] / GiB:.1f}" for w in worlds[1:])
        + f" GiB with FSDP2 on {' / '.join(map(str, worlds[1:]))} ranks, after loading {p70['load'] / GiB:.1f} GiB "
        f"on each; the QLoRA paper's 65B on one 48 GB GPU holds on paper ({p65['device'] / 1e9:.1f} GB). The plan "
        f"is within {check['worst']:.1%} of the peaks measured here.**",
        "",
        "From `benchmarks/memory_plan.py` (on paper; the formulas are in its docstring and checked against runs "
        "here, below). Device memory per rank in GiB (GPU; 2**30 bytes) for one micro-batch of "
        f"{run.micro_batch_size} x {run.seq_len} or {4 * run.seq_len} tokens per rank, LoRA r={run.lora_r} on all 7 "
        "linears per layer, NF4 blocks "
        f"of {run.blocksize} with double quantization, bf16 compute, float32 LoRA factors and gradients, "
        f"loss in chunks of {run.loss_chunk_tokens} positions, packed rows, no LoRA dropout. PagedAdamW keeps "
        "the optimizer state in host memory (host: per rank at 1 rank; it divides by the ranks under FSDP2). "
        "Not counted: CUDA context and allocator slack (~0.5-1 GiB), NCCL buffers.",
        "",
        "**Loading comes first and is not sharded**: every rank loads the whole 4-bit base onto its device "
        "(quantized layer by layer, never the 16-bit model), then FSDP2 shards it. The last column is that peak "
        "per rank, whatever the number of ranks; where it exceeds the training column it is the rank's peak (e.g. "
        f"LLaMA-2-70B needs {p70['load'] / GiB:.1f} GiB per device to load, even with {worlds[-1]} ranks that train in "
        f"{p70['device'] / GiB:.1f} GiB each). Sharding while "
        "loading (each rank quantizing and keeping only its rows) would remove it; nf4lora does not do that yet.",
        "",
        markdown_table([*TABLE_HEADER, *[f"{w} rank{'s' if w > 1 else ''}" for w in worlds], *TABLE_TAIL], rows),
        "",
        "DDP replicates the 4-bit base, so adding ranks adds throughput, not room. FSDP2 divides the packed codes, "
        "float parameters and LoRA state by the ranks; what stays per rank is the replicated QuantState (~3% of "
        "the codes), the units in flight (the root unit's embeddings and lm_head whole, two decoder layers) and "
        "the activations of the rank's own micro-batch. On one rank FSDP2 costs more than DDP: the all-gathered "
        "copies sit beside the shards.",
        "",
        "## The QLoRA paper's claim: a 65B model fine-tunes on one 48 GB GPU",
        "",
        "LLaMA-65B, r=64 on all linears (the paper's setting), one row of 512 tokens, gradient checkpointing, one "
        f"rank: **{p65['device'] / GiB:.1f} GiB = {p65['device'] / 1e9:.1f} GB** of device memory "
        f"(+ {p65['host'] / GiB:.1f} GiB of host memory for the paged optimizer state), under 48 GB with "
        f"{48 - p65['device'] / 1e9:.1f} GB to spare for the CUDA context and allocator slack: the claim holds on "
        "paper for nf4lora. Most of it is the 4-bit base; nf4lora keeps LoRA factors and gradients in float32 "
        "(the paper's adapters are bf16), which costs 2 x 4 bytes per LoRA parameter:",
        "",
        breakdown(PRESETS["LLaMA-65B"], paper, 1, "ddp"),
        "",
        "## Checked against runs on this machine",
        "",
        check["markdown"],
        "",
        environment_block(),
    ]
    write_results("memory-plan", "\n".join(md), {"run": asdict(run), "worlds": worlds, "table": data,
                                                  "llama_65b_paper": {**p65, "run": asdict(paper)},
                                                  "check": check.get("data")})  # fmt: skip


# ----------------------------------------------------------------------------------------------- --check
# Runs of the built-in SmolLM2-135M (30 layers, hidden 576, vocabulary 49152) on the bundled data, float32, two
# optimizer steps: sized so that the model's memory is most of each rank's resident set.
CHECK_RUNS = [
    dict(parallel="ddp", ranks=1, gradient_checkpointing=False),
    dict(parallel="ddp", ranks=2, gradient_checkpointing=False),
    dict(parallel="fsdp", ranks=2, gradient_checkpointing=False),
    dict(parallel="fsdp", ranks=2, gradient_checkpointing=True),
    dict(parallel="ddp", ranks=2, gradient_checkpointing=True),
]
PHASES = {"load": "load", "shard": "shard", "train": "device"}  # measured phase: the plan's total for it
CHECK_ARGS = dict(seq_len=256, micro_batch_size=1, lora_r=16, loss_chunk_tokens=128)
CHECK_FILE = Path(__file__).resolve().parent / "results" / "memory-plan-check.json"
# The twin: the same architecture and tokenizer shrunk to almost nothing. The same run on it measures what the
# process holds whatever the model (interpreter, torch, the libraries the run imports on the way, thread pools).
TWIN_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Large blocks always come from mmap and go back to the OS when freed, so the resident set follows the live tensors.
# glibc's default raises this threshold as blocks are freed, after which a freed step's activations stay in the
# heap and the resident set grows over the first steps with the allocator's history (measured on SmolLM2-135M
# without checkpointing: 974, 1131, 1203 MiB after steps 1-3, against 580-592 MiB with the fixed threshold).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def write_twin(model_dir: str, out: Path) -> str:
    """`model_dir`'s config with TWIN_SIZES, random bf16 weights, its tokenizer files."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from nf4lora.models import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig.from_dict({**json.loads(Path(model_dir, "config.json").read_text()), **TWIN_SIZES})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tensors = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if Path(model_dir, name).is_file():
            shutil.copyfile(Path(model_dir, name), out / name)
    return str(out)


def measure(spec: dict, model_dir: str, out: Path) -> dict:
    """One torchrun run of `spec`; returns its per-rank memory record (metrics.jsonl's last "memory")."""
    ranks = spec["ranks"]
    args = ["finetune", "--model", model_dir, "--output-dir", str(out), "--parallel", spec["parallel"],
            "--batch-size", str(ranks * CHECK_ARGS["micro_batch_size"]), "--micro-batch-size",
            str(CHECK_ARGS["micro_batch_size"]), "--seq-len", str(CHECK_ARGS["seq_len"]), "--max-steps", "2",
            "--save-every", "0", "--eval-every", "0", "--val-fraction", "0", "--lora-r", str(CHECK_ARGS["lora_r"]),
            "--lora-dropout", "0", "--loss-chunk-tokens", str(CHECK_ARGS["loss_chunk_tokens"]),
            "--compute-dtype", "float32", "--no-progress", "--overwrite",
            "--gradient-checkpointing" if spec["gradient_checkpointing"] else "--no-gradient-checkpointing"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **MALLOC_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "nf4lora",
           *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f][-1]["memory"]


def run_check() -> dict:
    """Measure CHECK_RUNS and their twins here (~15 minutes on 2 busy cores); raw numbers go to CHECK_FILE."""
    from nf4lora.train.resources import default_model_dir

    model_dir = default_model_dir()
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        twin = write_twin(model_dir, Path(tmp) / "twin")
        for k, spec in enumerate(CHECK_RUNS):
            print(f"measuring {spec} and its twin", flush=True)
            real = measure(spec, model_dir, Path(tmp) / f"run{k}")
            small = measure(spec, twin, Path(tmp) / f"twin{k}")
            measured.append({**spec, "model": real, "twin": small})
        configs = {name: json.loads(Path(d, "config.json").read_text()) for name, d in (("model", model_dir),
                                                                                        ("twin", twin))}  # fmt: skip
    CHECK_FILE.write_text(json.dumps({"configs": configs, "args": CHECK_ARGS, "malloc_env": MALLOC_ENV,
                                      "runs": measured}, indent=2) + "\n")  # fmt: skip
    return load_check()


def load_check() -> dict:
    """The plan against the runs in CHECK_FILE: markdown and data (empty when not measured yet)."""
    if not CHECK_FILE.exists():
        return {"markdown": "(not measured yet: run with --check)", "data": None, "worst": float("nan")}
    saved = json.loads(CHECK_FILE.read_text())
    models = {name: Model.from_config(name, cfg) for name, cfg in saved["configs"].items()}
    args = saved["args"]
    rows, data = [], []
    for m in saved["runs"]:
        run = Run(seq_len=args["seq_len"], micro_batch_size=args["micro_batch_size"], lora_r=args["lora_r"],
                  compute_bytes=4, device="cpu", gradient_checkpointing=m["gradient_checkpointing"],
                  loss_chunk_tokens=args["loss_chunk_tokens"])  # fmt: skip
        planned = {name: plan(model, run, m["ranks"], m["parallel"]) for name, model in models.items()}
        for rank in range(m["ranks"]):
            got = {phase: m["model"][f"peak_{phase}_mib"][rank] - m["twin"][f"peak_{phase}_mib"][rank]
                   for phase in PHASES}  # fmt: skip
            want = {phase: (planned["model"][key] - planned["twin"][key]) / MiB for phase, key in PHASES.items()}
            err = max(want.values()) / max(got.values()) - 1
            data.append({**{k: m[k] for k in ("parallel", "ranks", "gradient_checkpointing")}, "rank": rank,
                         "measured_mib": got, "planned_mib": want, "peak_error": err})  # fmt: skip
            rows.append([m["parallel"], m["ranks"], "on" if m["gradient_checkpointing"] else "off", rank,
                         *(f"{got[phase]:.0f} / {want[phase]:.0f}" for phase in PHASES), f"{err:+.1%}"])  # fmt: skip
    worst = max(abs(d["peak_error"]) for d in data)
    md = (f"The built-in SmolLM2-135M-Instruct on the bundled data, float32 compute, 1 row of {args['seq_len']} "
          f"tokens per rank and step, r={args['lora_r']}, loss chunks of {args['loss_chunk_tokens']}, 2 optimizer "
          "steps, torchrun with gloo on the CPU, one thread per rank. Measured per rank: the peak resident set "
          "(VmHWM) while loading, while sharding (DDP's or FSDP2's wrapping) and while training (reset between), "
          "minus the same of the same run on a "
          f"twin shrunk to {TWIN_SIZES} (the process's own memory: interpreter, torch, the libraries a run imports "
          "on the way, e.g. ~120 MiB at the first fully_shard, ~150 MiB the first time gradient checkpointing runs). "
          "Planned: the CPU plan's load, shard and training totals (optimizer state in RAM), model minus twin. "
          "The runs set "
          f"{' '.join(f'{k}={v}' for k, v in saved['malloc_env'].items())} so that freed activations go back to the "
          "OS and the resident set follows the live tensors (see MALLOC_ENV in the script). Error: planned "
          f"peak (the largest phase) over measured peak, minus 1; **largest error {worst:.1%}** (target: within "
          "15%).\n\n" + markdown_table(["engine", "ranks", "checkpointing", "rank",
                                         *(f"{phase} MiB measured / planned" for phase in PHASES), "peak error"],
                                        rows))  # fmt: skip
    return {"markdown": md, "data": data, "worst": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="measure small torchrun runs here first (minutes)")
    ap.add_argument("--config", help="plan this config.json instead of writing the table")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--ranks", type=int, default=8, help="plan 1, 2, 4, ... up to this many ranks")
    args = ap.parse_args()
    run = Run(seq_len=args.seq_len, micro_batch_size=args.micro_batch_size, lora_r=args.lora_r)
    worlds = [2**k for k in range(int(math.log2(args.ranks)) + 1)]
    if args.config:
        model = Model.from_config(Path(args.config).parent.name, json.loads(Path(args.config).read_text()))
        rows, _ = table_rows([model], [run], worlds)
        print(markdown_table([*TABLE_HEADER, *map(str, worlds), *TABLE_TAIL], rows))
        return
    if args.check:
        print(run_check()["markdown"])
    write_table(run, worlds)
    print("wrote benchmarks/results/memory-plan.md and .json")


if __name__ == "__main__":
    main()
