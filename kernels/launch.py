"""Launching a Triton kernel for the cost of a dictionary hit: what a decode step needs from its launchers.

`kernel[grid](*args, **constexprs)` runs Triton's whole dispatch on every call: it binds the arguments, derives
each one's specialization, hashes a cache key, looks the compiled kernel up, and builds launch metadata. At M = 1
that Python work is most of what a 4-bit matmul costs on the host (measured without a GPU, Triton's driver
stubbed: benchmarks/host_overhead.py). `Launcher` runs that dispatch once per distinct specialization and keeps the
compiled kernel; later calls derive the same key (a few comparisons per argument) and call the compiled kernel's
launcher directly, with the same arguments Triton's own dispatch would pass it.

The key holds exactly what Triton specializes a launch on (triton.runtime.jit, Triton 3.6 to 3.9): the current
device (Triton keeps a cache per device, and a compiled kernel's function handle belongs to the device it was
loaded on), a tensor's dtype and whether its address is 16-byte aligned (unless the parameter is
do_not_specialize_on_alignment), an int's type (i32, i64 or u64, by its value) and, unless do_not_specialize, its
being 1 or a multiple of 16, and the constexprs and launch options. Under the interpreter, or with a Triton launch
hook installed (a profiler), every call takes Triton's own dispatch.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime.driver import driver

# The interpreter decides at decoration time (triton.jit reads TRITON_INTERPRET when a kernel module is imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _int_type(value: int) -> str:
    """The type Triton passes an int argument as (its launcher packs the value in that width)."""
    if -(2**31) <= value < 2**31:
        return "i32"
    return "u64" if value >= 2**63 else "i64"


def _hooked(hook) -> bool:
    """Whether a launch hook is installed (Triton 3.6 and 3.9 keep an empty HookChain when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Launcher:
    """`Launcher(kernel)(grid, args, constexprs)`: kernel[grid](*args, **constexprs), cached as described above.

    args are the kernel's runtime arguments in order (tensors, ints), constexprs its constexpr parameters and
    launch options (num_warps, ...) by name; every value must be hashable and the same kind from call to call.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}
        if INTERPRETED:  # an interpreted kernel has no parameter objects; every call goes through Triton
            return
        params = kernel.params
        constexpr = [p.is_constexpr for p in params]
        if constexpr != sorted(constexpr):
            raise ValueError(f"{kernel.__name__}: Launcher needs the constexpr parameters after the runtime ones")
        self._plain_ints = [not p.do_not_specialize for p in params]
        self._aligned_ptrs = [not p.do_not_specialize_on_alignment for p in params]
        self._constexpr_names = [p.name for p in params if p.is_constexpr]

    def key(self, device: int, args: tuple, constexprs: dict) -> tuple:
        spec = [device]
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                spec.append((a.dtype, self._aligned_ptrs[i] and a.data_ptr() % 16 == 0))
            elif self._plain_ints[i]:  # an i32 (the usual case) costs no function call: this runs per launch
                spec.append((-0x80000000 <= a < 0x80000000 or _int_type(a), a == 1, a % 16 == 0))
            else:
                spec.append(-0x80000000 <= a < 0x80000000 or _int_type(a))
        return (*spec, *constexprs.items())

    def __call__(self, grid: tuple, args: tuple, constexprs: dict) -> None:
        if INTERPRETED or _hooked(triton.knobs.runtime.launch_enter_hook):
            self.kernel[grid](*args, **constexprs)
            return
        device = driver.active.get_current_device()
        key = self.key(device, args, constexprs)
        compiled = self._compiled.get(key)
        if compiled is None:  # first launch of this specialization: Triton's dispatch compiles (or loads) it
            self._compiled[key] = self.kernel[grid](*args, **constexprs)
            return
        # As JITFunction.run launches: every argument in signature order (the launcher skips the constexprs).
        values = [*args, *(constexprs[name] for name in self._constexpr_names)]
        stream = driver.active.get_current_stream(device)
        compiled.run(*grid, *(1,) * (3 - len(grid)), stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *values)  # fmt: skip
