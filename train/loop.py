"""train(config): QLoRA fine-tuning with accumulation, clipping, a warmup + cosine schedule, periodic validation,
metrics (JSONL + PNG), atomic checkpoints and exact resume.

A step, for B = batch_size rows and m = micro_batch_size: take the step's B rows from the DataStream as B / m
micro-batches (fewer at the end of an epoch), run forward + backward on each with the loss weighted by its share
of the step's target tokens (so the step's gradient is that of the mean loss over all its target tokens, whatever
the padding or packing), clip the global norm, set the learning rate for the step, PagedAdamW.step(). Everything
that decides the next step (adapter, optimizer state, step number, data position, RNG) is in the checkpoint, so a
resumed run is bitwise the uninterrupted one on the same machine (and trains on the same rows when it changes
only how the run executes: see config.RESUMABLE_CHANGES). Under torchrun (--parallel ddp|fsdp) the same step
runs split by rank: train/distributed.py says how, and the loop calls it where a single process would not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from nf4lora.lora import add_lora
from nf4lora.models import Tokenizer
from nf4lora.models.generic import read_model_config
from nf4lora.models.output_dir import write_file_atomic, write_text_atomic

from . import distributed
from .allocator import keep_freed_memory
from .checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state
from .config import TrainConfig, check_writable_dir
from .data import DataStream, Example, eval_batches, load_examples, split_validation
from .distributed import OneProcess, packed_bytes, peak_memory_mib
from .merged import finetune_note
from .optim import PagedAdamW
from .resources import check_lora_targets, check_seq_len, load_base, resolve_data, resolve_model

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "adapter", "loss.png")  # what train() writes under --output-dir


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model (LoRA layers unmerged), in eval mode
    tokenizer: object
    adapter_dir: str
    metrics: list[dict]  # every line of metrics.jsonl
    val_examples: list[Example]


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return config.lr
    span = max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup_steps) / span))


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _n_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())  # the model predicts labels[t + 1] at t


def _n_tokens(batch) -> int:
    """Real (non-padding) tokens of a batch: what tokens/s counts."""
    real = batch["doc_ids"] >= 0 if "doc_ids" in batch else batch["attention_mask"].bool()
    return int(real.sum())


def evaluate_loss(model, batches, device, autocast: bool, ranks: OneProcess = OneProcess()) -> float:
    """Mean cross-entropy per target token over `batches` (token-weighted, so batching does not change it); the
    ranks of a distributed run share the batches and the mean is over all of them."""
    was_training = model.training
    model.eval()
    batches, n_real = ranks.eval_batches(batches)
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for i, batch in enumerate(batches):
            n = _n_targets(batch) if i < n_real else 0  # a repeat (i >= n_real) counts nothing
            if n == 0 and not ranks.distributed:  # (ranks run as many forwards: collectives under FSDP2)
                continue
            loss = float(model(**_to(batch, device)).loss)
            if n:
                total += loss * n
                count += n
    total, count = ranks.sum(total, count)
    model.train(was_training)
    return total / max(count, 1)


def _batch_fingerprint(batches) -> str:
    h = hashlib.sha1()
    for b in batches:
        h.update(b["input_ids"].numpy().tobytes())
    return h.hexdigest()[:12]


def prepare(config: TrainConfig):
    """Everything before the first step, with every input checked before the model is loaded (loading and
    quantizing takes minutes for a large model; the checks take well under a second).
    Returns (model, tokenizer, train_examples, val_examples, device)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    check_writable_dir(config.output_dir)
    _check_no_earlier_run(config)
    device = distributed.setup(config)  # --device, or this rank's under torchrun (refuses a batch it cannot share)
    print(f"compute dtype: {config.resolve(device)}")  # "auto" becomes what this device multiplies fastest
    data_path, val_path = resolve_data(config.data, config.val_data)
    path = resolve_model(config.model)
    model_config = read_model_config(path)  # config.json only
    check_seq_len(model_config, config.seq_len)
    check_lora_targets(model_config, config.target_modules)
    tokenizer = Tokenizer.from_pretrained(path)
    examples = load_examples(data_path, tokenizer, config.seq_len)  # every line: JSON, record shape, length
    if val_path is not None:
        train_ex, val_ex = examples, load_examples(val_path, tokenizer, config.seq_len)
    else:
        train_ex, val_ex = split_validation(examples, config.val_fraction, config.seed)
    if config.resume:  # after resolve() (the saved config names what ran, not "auto") and with the data read
        _check_resumable(config, _data_stream(config, train_ex, tokenizer))
    note = finetune_note(path, model_config.nf4lora_merged, config.quant_type)
    if note:
        print(note)

    if config.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed)
    model = load_base(path, config, device)
    add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)
    model.gradient_checkpointing = config.gradient_checkpointing
    model.loss_chunk_tokens = config.loss_chunk_tokens
    return model, tokenizer, train_ex, val_ex, device


def _data_stream(config: TrainConfig, train_ex: list[Example], tokenizer) -> DataStream:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataStream(train_ex, config.batch_size, config.micro_batch_size, config.seq_len, config.pack, pad_id,
                      config.seed)  # fmt: skip


def _total_steps(config: TrainConfig, stream: DataStream) -> int:
    return config.max_steps or max(1, math.ceil(config.epochs * stream.steps_per_epoch(0)))


def _check_resumable(config: TrainConfig, stream: DataStream) -> None:
    """--resume: a checkpoint exists under the output directory, was saved with these training settings, and its
    run had as many steps over this data; `stream` (this run's, at its start) takes its data position."""
    root = os.path.join(config.output_dir, "checkpoints")
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise ValueError(f"--resume: no checkpoint under {root!r}")
    state = read_trainer_state(ckpt)
    config.check_resumes(state.get("config", {}), f"checkpoint {ckpt!r}")
    total_steps = _total_steps(config, stream)
    if state["total_steps"] != total_steps:  # the same settings (checked above), so the data differ
        raise ValueError(
            f"--resume: checkpoint {ckpt!r} belongs to a run of {state['total_steps']} steps, and the same settings "
            f"make {total_steps} of this data: the training data (--data, or the tokenizer) changed since it was "
            "saved; give the run's data, or start afresh (--overwrite or a new --output-dir)"
        )
    stream.load_state_dict(state["data"])


def _earlier_run(output_dir: str) -> list[str]:
    """The outputs of an earlier run (RUN_OUTPUTS) present in `output_dir`."""
    return [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, name))]


def _check_no_earlier_run(config: TrainConfig) -> None:
    """A fresh run (no --resume) into a directory holding an earlier run needs --overwrite: otherwise that run's
    checkpoints would stay for a later --resume to continue the wrong run."""
    found = [] if config.resume else _earlier_run(config.output_dir)
    if found and not config.overwrite:
        raise ValueError(
            f"--output-dir={config.output_dir!r} holds an earlier run ({', '.join(found)}): pass --resume to "
            "continue it, --overwrite to replace it, or a new --output-dir"
        )


def _remove_earlier_run(output_dir: str) -> None:
    """--overwrite: remove an earlier run's outputs before training starts afresh."""
    for name in _earlier_run(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def train(config: TrainConfig, prepared: tuple | None = None) -> TrainResult:
    """Run the training described by `config`; `prepared` is prepare(config)'s result when already computed."""
    model, tokenizer, train_ex, val_ex, device = prepared if prepared is not None else prepare(config)
    ranks = OneProcess.of(config, device)  # torchrun's ranks (train/distributed.py), or this process alone
    out = config.output_dir
    ckpt_root = os.path.join(out, "checkpoints")
    stream = _data_stream(config, train_ex, tokenizer)
    accum = config.grad_accum_steps
    total_steps = _total_steps(config, stream)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(
        params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    autocast = config.bf16 and (device.type == "cpu" or torch.cuda.is_bf16_supported())
    val_batches = list(eval_batches(val_ex, config.micro_batch_size, config.seq_len, config.pack, stream.pad_id))

    metrics_path = os.path.join(out, "metrics.jsonl")
    metrics: list[dict] = []
    start = 0
    if config.resume:  # prepare() checked that the checkpoint continues this run (_check_resumable)
        state = load_checkpoint(latest_checkpoint(ckpt_root), model, optimizer)  # whole, into every rank
        stream.load_state_dict(state["data"])
        start = state["step"]
        if os.path.exists(metrics_path):  # keep the history up to the checkpoint; later lines are redone
            metrics = [m for m in _read_metrics(metrics_path) if m["step"] <= start]
        if state.get("world_size", 1) != ranks.world_size:
            print(f"resuming a run of {state.get('world_size', 1)} processes in {ranks.world_size}: the same rows "
                  "per step, summed in another order (close to, not bitwise, the uninterrupted run)")  # fmt: skip
    elif ranks.is_main:
        _remove_earlier_run(out)  # what is there is what --overwrite allowed (prepare checked)
    if ranks.is_main:
        _write_metrics(metrics_path, metrics)
    if ranks.distributed:  # every rank loaded the whole 4-bit base (quantized layer by layer): now shard it
        memory = {"peak_load_mib": ranks.gather(peak_memory_mib(device, reset=True)),
                  "packed_bytes_whole": packed_bytes(model)}  # fmt: skip
        model, optimizer = ranks.shard(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        memory["peak_shard_mib"] = ranks.gather(peak_memory_mib(device, reset=True))
        memory["packed_bytes"] = ranks.gather(packed_bytes(model))
        print(f"packed 4-bit weights per rank: {_mib(memory['packed_bytes'])} of "
              f"{_mib([memory['packed_bytes_whole']])}; peak memory per rank while loading: "
              f"{_mib(memory['peak_load_mib'], 1)}, while sharding: {_mib(memory['peak_shard_mib'], 1)}")  # fmt: skip

    n_trainable = sum(p.numel() for p in params)  # a DTensor counts its whole shape
    where = f"{device}" if not ranks.distributed else f"{ranks.world_size} ranks ({ranks.mode}, {device.type})"
    print(f"training {n_trainable:,} LoRA parameters for {total_steps} steps ({len(train_ex)} examples, "
          f"{accum // ranks.world_size} micro-batches of {config.micro_batch_size} rows per step"
          f"{' per rank' if ranks.distributed else ''}) on {where}")  # fmt: skip
    bar = _progress(config.progress and ranks.is_main, total_steps, start)
    model.train()
    t0, tokens_done = time.perf_counter(), 0
    for step in range(start, total_steps):
        position = stream.state_dict()
        rows = stream.next_rows()  # the step's rows, over all ranks
        batches, n_real = ranks.micro_batches(stream, rows)  # this rank's share (repeats after the n_real first)
        ranks.seed_step(config.seed, step)
        counts = [_n_targets(b) if i < n_real else 0 for i, b in enumerate(batches)]
        step_targets = int(ranks.sum(sum(counts))[0])
        lr = lr_at(step, config, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = _forward_backward(model, batches, counts, step_targets, ranks, device, autocast)
        loss_sum, tokens = ranks.sum(loss_sum, sum(_n_tokens(b) for b in batches[:n_real]))
        tokens = int(tokens)
        grad_norm = _grad_norm(params, config.max_grad_norm)
        if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):  # before the update: nothing is spoiled
            raise ValueError(
                f"step {step + 1}: the loss ({loss_sum / max(step_targets, 1):.4g}) or the gradient norm "
                f"({float(grad_norm):.4g}) is not finite (rows from data row {position['row']} of epoch "
                f"{position['epoch']}); training stopped before updating the adapter, so the checkpoints in "
                f"{ckpt_root!r} stay as they were: check the data, or start afresh with a lower --lr (--overwrite)"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_done += tokens
        elapsed = time.perf_counter() - t0
        record = {
            "step": step + 1, "loss": loss_sum / max(step_targets, 1), "lr": lr, "grad_norm": float(grad_norm),
            "tokens": tokens, "tokens_per_s": tokens_done / elapsed, "elapsed_s": elapsed,
            "data_epoch": position["epoch"], "data_row": position["row"],
            "batch_sha1": _batch_fingerprint(stream.micro_batches(rows) if ranks.distributed else batches),
            "compute_dtype": config.compute_dtype, "bf16_autocast": autocast,
        }  # fmt: skip
        done = step + 1
        if val_batches and (done == total_steps or (config.eval_every and done % config.eval_every == 0)):
            record["val_loss"] = evaluate_loss(model, val_batches, device, autocast, ranks)
        if ranks.distributed and done == total_steps:
            record["memory"] = {**memory, "peak_train_mib": ranks.gather(peak_memory_mib(device))}
            print(f"peak memory per rank while training: {_mib(record['memory']['peak_train_mib'], 1)}")
        metrics.append(record)
        if ranks.is_main:
            _append_metrics(metrics_path, record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            ranks.save_checkpoint(
                ckpt_root, done, model, optimizer,
                {"total_steps": total_steps, "data": stream.state_dict(), "config": config.to_dict()},
                config.keep_checkpoints,
            )  # fmt: skip
    if bar is not None:
        bar.close()

    adapter_dir = os.path.join(out, "adapter")
    ranks.save_adapter(model, adapter_dir, base_model_name_or_path=config.model or "HuggingFaceTB/SmolLM2-135M-Instruct")
    if ranks.is_main:
        plot_losses(metrics, os.path.join(out, "loss.png"))
    ranks.close()  # every rank waits here until rank 0 has written everything
    model = ranks.unwrap(model).eval()
    return TrainResult(model, tokenizer, adapter_dir, metrics, val_ex)


def _forward_backward(model, batches: list[dict], counts: list[int], step_targets: int, ranks: OneProcess, device,
                      autocast: bool) -> float:  # fmt: skip
    """Forward and backward of this process's micro-batches of a step, accumulating gradients; `counts` are their
    target tokens (0 for a repeat), `step_targets` the step's over all ranks. Returns sum(loss * targets)."""
    loss_sum = 0.0
    for i, (batch, n) in enumerate(zip(batches, counts)):
        if n == 0 and not ranks.distributed:
            continue  # (ranks run as many passes as each other: a repeat is weighted 0 instead)
        with ranks.sync_gradients(model, last=i == len(batches) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**_to(batch, device)).loss
            # The engine averages gradients over the ranks: world_size * n / N sums to the mean over all N.
            (loss * (n * ranks.world_size / step_targets)).backward()
        if n:
            loss_sum += float(loss.detach()) * n
    return loss_sum


def _mib(values: list[float], unit: float = 2**20) -> str:
    """"12.5/12.4 MiB": one value per rank (in bytes, or in MiB with unit=1)."""
    return "/".join(f"{v / unit:.4g}" for v in values) + " MiB"


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients before clipping; clips them to `max_norm` when it is > 0. Parameters
    without a gradient count as zero (a step may leave all of them without one). Sharded (DTensor) gradients give
    the norm over all ranks' shards."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)


def _write_metrics(path: str, metrics: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in metrics))


def _read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl. A last line that does not parse is what a kill in the middle of a write
    leaves, and is dropped (the resumed run redoes its step); a bad line anywhere else is an error."""
    with open(path, encoding="utf-8") as f:
        lines = [(lineno, line) for lineno, line in enumerate(f, start=1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("no integer 'step'")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if k == len(lines) - 1:
                print(f"{path}:{lineno}: dropping a partly written last line")
                break
            raise ValueError(
                f"{path}:{lineno}: not a metrics record ({e}); only the last line may be cut short by a kill: "
                "repair or remove the line to resume"
            ) from None
        records.append(record)
    return records


def _append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(metrics: list[dict], path: str) -> None:
    """Training loss per step and validation loss where measured, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss", lw=1.2)
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)

