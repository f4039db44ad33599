"""Training checkpoints: written so that an interrupted write never replaces the previous good one.

Layout under <output_dir>/checkpoints/:
    step-00000050/adapter/             the LoRA adapter in PEFT format (save_adapter)
    step-00000050/optimizer.safetensors  "<param index>.exp_avg" / ".exp_avg_sq" / ".step" tensors
    step-00000050/rng.safetensors      torch CPU (and CUDA) generator states
    step-00000050/trainer_state.json   step, data position, optimizer param groups, config
    latest.json                        {"step": 50, "dir": "step-00000050"}

A checkpoint is assembled in a hidden temporary directory, every file fsync'ed, then renamed into place
(os.replace of a directory is atomic on POSIX), and only then does latest.json (itself written to a temporary
file and renamed) point at it. A crash at any moment leaves latest.json naming a complete checkpoint; the hidden
leftovers of a crash (`.step-*` directories, `.latest.json.*` files) are removed by the next save_checkpoint.
Only safetensors and JSON are read back: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from nf4lora.lora import load_adapter, save_adapter
from nf4lora.models.config import write_json_atomic
from nf4lora.models.output_dir import make_hidden_dir, write_file_atomic

LATEST = "latest.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {
        f"{idx}.{key}": value.detach().cpu().contiguous().reshape(value.shape)
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def save_checkpoint(
    root: str, step: int, model, optimizer, trainer_state: dict, keep: int, *, adapter_weights=None, optimizer_state=None
) -> str:
    """Write checkpoint `step` under `root`, point latest.json at it, prune to the newest `keep`. Returns its dir.
    A distributed run gathers the LoRA weights (save_adapter's `weights`) and the optimizer's state dict whole on
    every rank and passes them in; rank 0 writes."""
    os.makedirs(root, exist_ok=True)
    _remove_leftovers(root)
    name = f"step-{step:08d}"
    final = os.path.join(root, name)
    tmp = make_hidden_dir(root, name)  # the ordinary mode, as every file in it (see models/output_dir.py)
    try:
        save_adapter(model, os.path.join(tmp, "adapter"), weights=adapter_weights)
        tensors, groups = _optimizer_tensors(optimizer.state_dict() if optimizer_state is None else optimizer_state)
        write_file_atomic(os.path.join(tmp, OPTIMIZER), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        write_file_atomic(os.path.join(tmp, RNG), lambda f: save_file(rng, f))
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump({**trainer_state, "step": step, "param_groups": groups}, f, indent=1)
        _fsync_tree(tmp)
        if os.path.exists(final):  # a rerun reached the same step: the new one wins, atomically
            stale = make_hidden_dir(root, f"{name}.old")
            os.replace(final, os.path.join(stale, name))
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(os.path.join(root, LATEST), {"step": step, "dir": name})
    _prune(root, keep, protect=name)
    return final


def _remove_leftovers(root: str) -> None:
    """Delete what a process killed inside save_checkpoint or write_json_atomic left: the hidden temporaries
    `.step-N.tmp-XXXX` (a checkpoint being assembled), `.step-N.old.tmp-XXXX` (one being replaced) and
    `.latest.json.PID.XXXX.tmp`.
    Nothing else writes names of that shape under `root`, and only one run writes to an output directory."""
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith(".step-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(f".{LATEST}.") and entry.endswith(".tmp") and os.path.isfile(path):
            os.remove(path)


def _prune(root: str, keep: int, protect: str) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))
    for d in steps[:-keep]:
        if d != protect:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(root: str) -> str | None:
    """The directory latest.json names, or None when there is no checkpoint yet."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        latest = json.load(f)
    ckpt = os.path.join(root, latest["dir"])
    if not os.path.isfile(os.path.join(ckpt, STATE)):
        raise ValueError(f"{path} names {ckpt!r}, which is not a complete checkpoint")
    return ckpt


def read_trainer_state(ckpt: str) -> dict:
    """A checkpoint's trainer_state.json (step, data position, optimizer param groups, config), touching nothing."""
    with open(os.path.join(ckpt, STATE)) as f:
        return json.load(f)


def load_checkpoint(ckpt: str, model, optimizer) -> dict:
    """Restore adapter weights, optimizer state and RNG states in place; return the trainer state."""
    state = read_trainer_state(ckpt)
    load_adapter(model, os.path.join(ckpt, "adapter"))
    tensors = load_file(os.path.join(ckpt, OPTIMIZER))
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    rng = load_file(os.path.join(ckpt, RNG))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state
