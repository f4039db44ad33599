"""PagedAdamW: AdamW whose fp32 state lives in CPU memory and visits the device one page at a time.

QLoRA's point is that the frozen 4-bit base fits where a 16-bit one does not; the optimizer state of the
trainable parameters (two fp32 tensors per parameter, 8 bytes/param) should not take that room back.
bitsandbytes pages state through CUDA unified memory and synchronises after every parameter (docs/formats.md, sec. 7).
Here the state is an ordinary (pinned) CPU tensor per parameter; for a CUDA parameter the update streams the
state through two device page buffers on a side stream, so the copy of page i+1 overlaps the update of page i,
and the buffers are released when `step()` returns. On a CPU-only machine the state is updated in place.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction), computed in fp32 and written
back in the parameter's dtype. State dicts have torch's layout: {"state": {i: {"step", "exp_avg",
"exp_avg_sq"}}, "param_groups": [...]}.

Sharded parameters (DTensors, as FSDP2's fully_shard makes them) are updated shard by shard: each rank keeps
the state of its own shard and updates its shard of the parameter from its shard of the (already reduced)
gradient; AdamW is elementwise, so the shards together make the update of the whole. State dicts always hold
whole tensors, whatever the sharding: `state_dict()` all-gathers the shards (every rank calls it together) and
`load_state_dict()` keeps each rank's shard of what it is given, so a checkpoint loads at any world size.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# 2**20 elements: two fp32 state pages are 8 MiB, large enough that a PCIe/NVLink copy runs near full
# bandwidth and small enough to be invisible next to the model.
DEFAULT_PAGE_NUMEL = 1 << 20


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"PagedAdamW: {name} must be a finite number {bound}, got {value!r}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with optimizer state in CPU memory.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight decay is decoupled: p *= 1 - lr * wd).
        page_numel: elements per page when state is streamed to a CUDA device.
    """

    def __init__(
        self,
        params,
        lr: float = 2e-4,  # the QLoRA paper's rate for 7B-13B adapters
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,  # LoRA factors are small and start at B = 0; decay mostly fights learning
        page_numel: int = DEFAULT_PAGE_NUMEL,
    ):
        _check_positive("lr", lr, allow_zero=True)
        _check_positive("eps", eps, allow_zero=True)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"PagedAdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not (isinstance(page_numel, int) and page_numel > 0):
            raise ValueError(f"PagedAdamW: page_numel must be a positive int, got {page_numel!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.page_numel = page_numel
        # Pinned host memory makes non_blocking copies truly asynchronous; it only exists with CUDA.
        self._pin = torch.cuda.is_available()

    # ----------------------------------------------------------------------------------------------- state
    def _host_zeros(self, p: torch.Tensor) -> torch.Tensor:
        """fp32 CPU zeros shaped like this rank's part of `p` (the whole of an unsharded parameter)."""
        return torch.zeros(_local(p).shape, dtype=torch.float32, device="cpu", pin_memory=self._pin)

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._host_zeros(p)
            state["exp_avg_sq"] = self._host_zeros(p)
        return state

    def state_dict(self) -> dict:
        """torch's state dict with whole tensors: the state of a sharded parameter is all-gathered from every rank's
        shard, a collective that every rank must call together (in the same order, as for any collective)."""
        sd = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for idx in sorted(sd["state"]):
            p = params[idx]
            if isinstance(p, DTensor):
                sd["state"][idx] = {**sd["state"][idx],
                                    **{name: _whole(sd["state"][idx][name], p) for name in ("exp_avg", "exp_avg_sq")}}  # fmt: skip
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from this class or torch.optim.AdamW (whole tensors); state stays in (pinned) CPU fp32,
        and a sharded parameter keeps this rank's shard of it."""
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
            raise ValueError(
                f"PagedAdamW.load_state_dict: state_dict has {len(saved_groups or [])} param groups, "
                f"the optimizer has {len(groups)}"
            )
        index = {}
        for group, saved in zip(groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"PagedAdamW.load_state_dict: a param group has {len(saved['params'])} params in the "
                    f"state_dict and {len(group['params'])} in the optimizer"
                )
            index.update(zip(saved["params"], group["params"]))
        self.state.clear()
        for key, saved_state in state_dict.get("state", {}).items():
            if key not in index:
                raise ValueError(f"PagedAdamW.load_state_dict: state for unknown param index {key!r}")
            p = index[key]
            loaded = {"step": torch.as_tensor(saved_state["step"], dtype=torch.float32).clone().cpu()}
            for name in ("exp_avg", "exp_avg_sq"):
                value = saved_state[name]
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"PagedAdamW.load_state_dict: {name} of param {key} has shape {tuple(value.shape)}, "
                        f"the param has {tuple(p.shape)}"
                    )
                host = self._host_zeros(p)
                host.copy_(_shard_of(value, p) if isinstance(p, DTensor) else value)
                loaded[name] = host
            self.state[p] = loaded
        for group, saved in zip(groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("PagedAdamW does not support sparse gradients")
                param, grad = _local(p), _local(p.grad)  # this rank's shard of a DTensor (views: updated in place)
                if not param.is_contiguous():
                    raise ValueError("PagedAdamW: parameters must be contiguous (state pages are flat slices)")
                state = self._state_for(p)
                state["step"] += 1
                if param.numel() == 0:  # FSDP2 gives a rank past the end of a short dim 0 (lora_A's r) no rows
                    continue
                if param.device.type == "cpu":
                    _adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], group, state["step"].item())
                else:
                    self._paged_update(param, grad, state, group)
        return loss

    def _paged_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """Stream this parameter's state through two device page buffers.

        Stream order per page i (slot i % 2): side: H2D(i) after D2H(i-2) freed the slot; main: update(i)
        after H2D(i); side: D2H(i) after update(i). H2D(i+1) is queued before update(i) finishes, so the copy
        overlaps compute. The host waits for the last D2H so the CPU state is final when step() returns.
        """
        device = p.device
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        step = state["step"].item()
        n = p.numel()
        flat_p, flat_g = p.view(-1), grad.reshape(-1)
        host_m, host_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        page = min(self.page_numel, n)
        bufs = [torch.empty(2, page, dtype=torch.float32, device=device) for _ in range(2)]
        freed = [None, None]  # event: slot's previous D2H done
        for i, start in enumerate(range(0, n, page)):
            end = min(start + page, n)
            buf = bufs[i % 2][:, : end - start]
            with torch.cuda.stream(side):
                if freed[i % 2] is not None:
                    side.wait_event(freed[i % 2])
                buf[0].copy_(host_m[start:end], non_blocking=True)
                buf[1].copy_(host_v[start:end], non_blocking=True)
                loaded = side.record_event()
            main.wait_event(loaded)
            _adamw_update(flat_p[start:end], flat_g[start:end], buf[0], buf[1], group, step)
            updated = main.record_event()
            with torch.cuda.stream(side):
                side.wait_event(updated)
                host_m[start:end].copy_(buf[0], non_blocking=True)
                host_v[start:end].copy_(buf[1], non_blocking=True)
                freed[i % 2] = side.record_event()
        main.wait_stream(side)  # buffers were allocated on `main`: free them only after the side stream is done
        side.synchronize()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _whole(local_state: torch.Tensor, p: DTensor) -> torch.Tensor:
    """The whole fp32 CPU tensor whose shards, one per rank, are `local_state` (laid out like DTensor `p`)."""
    device = p.to_local().device  # the collective runs where the parameter lives (CUDA for nccl)
    sharded = DTensor.from_local(local_state.to(device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return sharded.full_tensor().cpu()


def _shard_of(whole: torch.Tensor, p: DTensor) -> torch.Tensor:
    """This rank's shard of `whole`, cut as DTensor `p` is cut; each rank cuts its own copy (no communication)."""
    device = p.to_local().device
    return distribute_tensor(whole.to(device), p.device_mesh, p.placements, src_data_rank=None).to_local()


def _adamw_update(p, grad, exp_avg, exp_avg_sq, group: dict, step: float) -> None:
    """One AdamW update in fp32, in the order torch.optim.AdamW's single-tensor path uses."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = grad.float()
    p32.mul_(1 - lr * wd)
    exp_avg.lerp_(g32, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p32.addcdiv_(exp_avg, denom, value=-step_size)
    if p32 is not p:
        p.copy_(p32)
