"""Training on more than one process with PyTorch's own engine (torch.distributed, launched by torchrun):

    torchrun --nproc_per_node=N -m nf4lora finetune ... --parallel ddp|fsdp

One process per device: cuda:LOCAL_RANK with nccl, or the CPU with gloo, the same code. The device mesh is always
explicit (one dimension over all ranks): with CUDA visible, the default mesh is CUDA, which a gloo run cannot use.

- ddp: DistributedDataParallel. Every rank holds the whole 4-bit base (loaded identically by each, so only the
  LoRA factors are broadcast from rank 0); only the LoRA gradients are all-reduced.
- fsdp: FSDP2 (`fully_shard`) on every decoder layer, then on the root. Every parameter is sharded on dim 0 over
  the ranks: LoRA factors, norms, embeddings, and the packed 4-bit weights (Linear4bit.weight is a frozen uint8
  Parameter of shape (out * in / 2, 1)). A unit is all-gathered before its forward and again in backward, so a
  rank holds 1/N of the base plus the units in flight whole. The QuantStates (block scales, ~3% of the packed
  bytes with double quantization) are plain attributes, replicated. No MixedPrecisionPolicy: Linear4bit's
  compute dtype and autocast decide the matmul dtype, so nothing casts the uint8 codes or the float32 factors.

A step is the single-process step split by rank. The step's batch_size rows (DataStream.next_rows) are cut into
world_size contiguous blocks, rank r takes block r in micro-batches of micro_batch_size rows, so the global batch
is one process's and every micro-batch is one that a single process would run. The loss of a micro-batch with n
of the step's N target tokens (N summed over all ranks: one all_reduce) is weighted by world_size * n / N: the
engine averages gradients over the ranks, so the step's gradient is that of the mean loss over all N targets,
as in one process. Gradients are reduced once per step (no_sync / set_requires_gradient_sync on the other
micro-batches); clipping uses the global norm (clip_grad_norm_ reduces over shards); PagedAdamW updates each
rank's shards.

Checkpoints are a single process's files, written by rank 0: the adapter and the optimizer state are gathered
whole (LoRA state is small: 8 bytes per LoRA parameter), so a run resumes at any world size or in one process,
and every rank reads the files and keeps its part. Random numbers (dropout) are reseeded at every step from
(seed, step, rank), so a resumed run draws what the uninterrupted one drew without saving N generator states.

Failures: any rank that raises exits non-zero with a one-line error (nf4lora's CLI) and torchrun then stops the
others (they are in a collective waiting for it); TIMEOUT bounds any collective should a rank hang instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from nf4lora.lora import Linear4bit, save_adapter
from nf4lora.models.loading import resolve_device

from .checkpoint import save_checkpoint

# Collectives that wait longer than this fail rather than hang. A rank that dies is caught by torchrun at once;
# this bounds a rank that is alive but stuck. Ten minutes outlasts any single step or checkpoint write we run.
TIMEOUT = timedelta(minutes=10)
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched_by_torchrun() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from the environment torchrun gives each process, or None without it."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun")
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def check_world(config, world_size: int | None) -> None:
    """Refuse a --parallel that does not fit how the run was launched (world_size: torchrun's, None without it), or
    a batch the ranks cannot share evenly; raises ValueError naming the values, before anything is loaded."""
    if config.parallel == "none":
        if world_size is not None and world_size > 1:
            raise ValueError(f"torchrun started {world_size} processes but --parallel is 'none': pass --parallel ddp "
                             "or --parallel fsdp, or run one process")  # fmt: skip
        return
    if world_size is None:
        raise ValueError(f"--parallel={config.parallel!r} runs under torchrun, which sets WORLD_SIZE: "
                         f"torchrun --nproc_per_node=N -m nf4lora finetune ... --parallel {config.parallel}")  # fmt: skip
    per_rank = config.batch_size // world_size
    if config.batch_size % world_size or per_rank % config.micro_batch_size:
        raise ValueError(
            f"--batch-size={config.batch_size} cannot be shared by {world_size} ranks in micro-batches of "
            f"--micro-batch-size={config.micro_batch_size}: each rank takes batch_size / world_size rows per step, "
            f"cut into whole micro-batches, so --batch-size must be a multiple of {world_size * config.micro_batch_size}"
        )


def quiet_other_ranks() -> None:
    """Under torchrun, ranks other than 0 print nothing to stdout from here on (their stderr, where errors go,
    stays), so a run's output reads as one process's."""
    launch = launched_by_torchrun()
    if launch is not None and launch[0] != 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def setup(config) -> torch.device:
    """This process's device. In one process: --device. Under torchrun: check the launch against the config, join
    the process group and return this rank's device (cuda:LOCAL_RANK, or the CPU); quiet_other_ranks()."""
    launch = launched_by_torchrun()
    check_world(config, launch[2] if launch else None)
    if config.parallel == "none":
        return resolve_device(config.device)
    _, local_rank, _ = launch
    device = _rank_device(config.device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    quiet_other_ranks()
    return device


def _rank_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"--device={name!r}: under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda, "
                         "cpu or auto")  # fmt: skip
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise ValueError(f"--device={name!r}: local rank {local_rank} has no CUDA device "
                         f"({torch.cuda.device_count()} visible)")  # fmt: skip
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class OneProcess:
    """What the training loop asks of the processes of a run, for a run of one: every call is the single-process
    step as it always was (Parallel below answers the same calls for torchrun's ranks)."""

    rank, world_size, is_main, distributed = 0, 1, True, False

    @staticmethod
    def of(config, device: torch.device) -> OneProcess:
        """The run's processes: Parallel under torchrun (setup() joined the process group), else OneProcess."""
        if config.parallel == "none":
            return OneProcess()
        world_size = dist.get_world_size()
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
        return Parallel(config.parallel, dist.get_rank(), world_size, device, mesh, config.batch_size)

    def shard(self, model: nn.Module, optimizer):
        """(model, optimizer) for the engine."""
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model itself."""
        return model

    def micro_batches(self, stream, rows: list) -> tuple[list[dict], int]:
        """This process's micro-batches of a step's `rows` and how many of them are real (all, here)."""
        batches = stream.micro_batches(rows)
        return batches, len(batches)

    def eval_batches(self, batches: list[dict]) -> tuple[list[dict], int]:
        """This process's share of the validation batches and how many are real (all, here)."""
        return batches, len(batches)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        return list(values)

    def gather(self, value: float) -> list[float]:
        """[value of rank 0, value of rank 1, ...]."""
        return [value]

    def seed_step(self, seed: int, step: int) -> None:
        """One process draws from the generators it saves in its checkpoints."""

    def sync_gradients(self, model: nn.Module, last: bool):
        """Context for a micro-batch's forward and backward."""
        return contextlib.nullcontext()

    def save_checkpoint(self, root: str, step: int, model, optimizer, trainer_state: dict, keep: int) -> None:
        save_checkpoint(root, step, model, optimizer, trainer_state, keep)

    def save_adapter(self, model: nn.Module, directory: str, **kwargs) -> None:
        save_adapter(model, directory, **kwargs)

    def close(self) -> None:
        """Nothing to leave."""


class Parallel(OneProcess):
    """The ranks of a torchrun run."""

    distributed = True

    def __init__(self, mode: str, rank: int, world_size: int, device: torch.device, mesh: DeviceMesh, batch_size: int):
        self.mode = mode  # "ddp" or "fsdp"
        self.rank, self.world_size, self.device, self.mesh = rank, world_size, device, mesh
        self.batch_size = batch_size  # rows per optimizer step, over all ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the model and its optimizer ------------------------------------------------------------------------
    def shard(self, model: nn.Module, optimizer):
        """Wrap the model for the engine (DDP, or FSDP2 layer by layer) and return (model, optimizer). Under FSDP2
        the parameters become DTensor shards, so the optimizer is made anew over them and keeps this rank's shard of
        the state the given one holds (a resumed run's, loaded whole)."""
        if self.mode == "ddp":
            # Every rank loaded the same checkpoint and quantized it the same way, so the frozen base is the same
            # everywhere; DDP's init_sync would broadcast all of it (a transient copy of the whole model on every
            # rank, and minutes for a 70B base between nodes). Only the trainable factors come from rank 0.
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.detach(), src=0, group=self.mesh.get_group())
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy); no buffer changes
            # in training, so none is synchronised before each forward.
            wrapped = DistributedDataParallel(model, device_ids=device_ids, device_mesh=self.mesh, init_sync=False,
                                              forward_sync_buffers=False, gradient_as_bucket_view=True)  # fmt: skip
            return wrapped, optimizer
        whole = optimizer.state_dict()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)  # the rest: embeddings, final norm, lm_head
        params = [p for p in model.parameters() if p.requires_grad]
        sharded = type(optimizer)(params, page_numel=optimizer.page_numel, **optimizer.defaults)
        sharded.load_state_dict(whole)
        return model, sharded

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model itself (DDP holds it as .module; FSDP2 keeps the module, with sharded parameters)."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def whole_lora_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name: whole float32 CPU tensor} of the trainable (LoRA) parameters; under FSDP2 each is
        all-gathered, so every rank calls this together."""
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu()
                for name, p in self.unwrap(model).named_parameters() if p.requires_grad}  # fmt: skip

    def save_checkpoint(self, root: str, step: int, model, optimizer, trainer_state: dict, keep: int) -> None:
        """Every rank gathers, rank 0 writes a single process's files (plus the world size, which a bitwise resume
        needs unchanged)."""
        weights, optimizer_state = self.whole_lora_weights(model), optimizer.state_dict()
        if self.is_main:
            save_checkpoint(root, step, self.unwrap(model), optimizer, {**trainer_state, "world_size": self.world_size},
                            keep, adapter_weights=weights, optimizer_state=optimizer_state)  # fmt: skip

    def save_adapter(self, model: nn.Module, directory: str, **kwargs) -> None:
        """Every rank gathers, rank 0 writes."""
        weights = self.whole_lora_weights(model)
        if self.is_main:
            save_adapter(self.unwrap(model), directory, weights=weights, **kwargs)

    def sync_gradients(self, model: nn.Module, last: bool):
        """Gradients are reduced over the ranks only on the step's last micro-batch (the others accumulate
        locally)."""
        if self.mode == "ddp":
            return contextlib.nullcontext() if last else model.no_sync()
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # -- the data ------------------------------------------------------------------------------------------
    def micro_batches(self, stream, rows: list) -> tuple[list[dict], int]:
        """Rank r takes rows [r * b, (r + 1) * b), b = batch_size / world_size, in micro-batches. Every rank must
        run as many forward and backward passes (each is a collective), so when the short last step of an epoch
        leaves a rank fewer micro-batches than rank 0, it repeats the step's first one; the loop counts no targets
        for those."""
        per_rank = self.batch_size // self.world_size
        mine = stream.micro_batches(rows[self.rank * per_rank : (self.rank + 1) * per_rank])
        needed = math.ceil(min(per_rank, len(rows)) / stream.micro_batch_size)  # rank 0's count, the largest
        filler = stream.micro_batches(rows[: stream.micro_batch_size])[:1]
        return mine + filler * (needed - len(mine)), len(mine)

    def eval_batches(self, batches: list[dict]) -> tuple[list[dict], int]:
        """Every world_size-th batch, padded with repeats of the first so that every rank runs as many forward
        passes."""
        mine = batches[self.rank :: self.world_size]
        needed = math.ceil(len(batches) / self.world_size)
        return mine + batches[:1] * (needed - len(mine)), len(mine)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, one all_reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh.get_group())
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """One all_gather."""
        out = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=self.device), group=self.mesh.get_group())
        return [float(t) for t in out]

    def seed_step(self, seed: int, step: int) -> None:
        """Reseed this rank's generators for optimizer step `step`: dropout masks differ between ranks, and a
        resumed run draws the same ones as the uninterrupted run without N generator states in the checkpoint."""
        torch.manual_seed(((seed * 1_000_003) + step) * self.world_size + self.rank)

    def close(self) -> None:
        """Leave the process group once every rank is done (rank 0 has written the outputs)."""
        dist.barrier(group=self.mesh.get_group())
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers, FSDP2's units: the nn.ModuleList holding most of the parameters
    (model.layers of the native decoder; transformer.h, gpt_neox.layers, ... of transformers' models)."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise ValueError(f"--parallel fsdp shards a model layer by layer, and {type(model).__name__} keeps no "
                         "layers in an nn.ModuleList; use --parallel ddp")  # fmt: skip
    return max(stacks, key=lambda stack: sum(p.numel() for p in stack.parameters()))


def packed_bytes(model: nn.Module) -> int:
    """Bytes of packed 4-bit weights this process holds (its shards of them under FSDP2)."""
    local = [m.weight.to_local() if isinstance(m.weight, DTensor) else m.weight for m in model.modules()
             if isinstance(m, Linear4bit)]  # fmt: skip
    return sum(t.nbytes for t in local)


def peak_memory_mib(device: torch.device, reset: bool = False) -> float:
    """This process's peak memory so far, in MiB: CUDA memory allocated by torch on a GPU, the peak resident set
    size (VmHWM) on the CPU. `reset` starts a new peak from now (on the CPU where Linux allows it)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    if not os.path.exists("/proc/self/status"):
        return float("nan")  # not Linux
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
        except OSError:
            pass
    return peak

