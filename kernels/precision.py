"""The compute dtype "auto": the dtype the hardware multiplies fastest, decided in one place, with its reason.

- CUDA: bfloat16 where the GPU has it natively (compute capability 8.0 and newer), else float16.
- CPU: bfloat16 only where oneDNN can use native bf16 matrix instructions (AVX512-BF16 or AMX), else float32.
  Without them torch's bf16 matmul is emulated and far slower than float32. Measured on a 2-core AMD EPYC VM
  with AVX512-BF16, idle (benchmarks/bench_dtype_cpu.py; benchmarks/results/dtype-cpu-avx512bf16*.md,
  2026-12-05): a Linear4bit NF4+DQ forward + backward at a SmolLM2-135M MLP shape ran at 286.6 GFLOP/s in bf16
  against 149.6 in float32 (1.92x); capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) at 5.0
  against 161.3 (32x slower in bf16; a 512^3 matmul 2.5 against 162.8 GFLOP/s). Other CPUs (aarch64, ...) get
  float32: no bf16 path has been measured there.

oneDNN obeys ONEDNN_MAX_CPU_ISA (or the older DNNL_MAX_CPU_ISA): a cap below AVX512_CORE_BF16 takes the native
bf16 instructions away even on a CPU that has them, so "auto" honours it (which also lets an AVX-512 machine
behave like an AVX2 one, together with ATEN_CPU_CAPABILITY=avx2). An explicit dtype always wins over "auto".
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

AUTO = "auto"
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Environment variables that make this process compute like a lesser CPU: oneDNN's ISA cap (new and old name) and
# the ATen kernels' capability.
CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# oneDNN ISA caps that leave out the bf16 dot-product instructions (AVX512_CORE_BF16 and every later ISA have them).
_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class ComputeDtype:
    dtype: torch.dtype
    reason: str  # one line for people: "this CPU has no native bf16: AVX2"

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_isa() -> str:
    """The CPU's matrix-relevant ISA as results files name it: AMX, AVX512-BF16, AVX-512, AVX2 or the machine."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return platform.machine() or "unknown"
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"),
              ("AVX-512", "_is_avx512_supported"), ("AVX2", "_is_avx2_supported"))  # fmt: skip
    for name, probe in probes:
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return "x86 without AVX2"


def isa_label() -> str:
    """cpu_isa(), plus the caps that make this process compute like a lesser CPU, for results files: e.g.
    "AVX512-BF16 capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2; ATEN_CPU_CAPABILITY=avx2)" (no commas: results files
    list machine fields separated by ", ")."""
    caps = [f"{var}={os.environ[var]}" for var in CAP_VARS if os.environ.get(var)]
    if not caps:
        return cpu_isa()
    onednn = next((c.split("=", 1)[1] for c in caps if "MAX_CPU_ISA" in c), None)
    return f"{cpu_isa()} capped to {onednn or 'its ATen kernels'} ({'; '.join(caps)})"


def _onednn_cap() -> str | None:
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def auto_compute_dtype(device: torch.device | str = "cpu", index: int | None = None) -> ComputeDtype:
    """What "auto" means on this device: a torch.device or a device string ("cpu", "cuda", "cuda:1")."""
    device = torch.device(device)
    return _auto_compute_dtype(device.type, device.index if index is None else index)


@functools.cache  # the hardware does not change while a process runs
def _auto_compute_dtype(device_type: str, index: int | None) -> ComputeDtype:
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return ComputeDtype(torch.bfloat16, f"{name} has native bf16")
        return ComputeDtype(torch.float16, f"{name} has no native bf16")
    if device_type != "cpu":
        return ComputeDtype(torch.float32, f"no measured 16-bit path on {device_type}")
    isa = cpu_isa()
    if isa not in ("AMX", "AVX512-BF16"):
        return ComputeDtype(torch.float32, f"this CPU has no native bf16: {isa}")
    cap = _onednn_cap()
    if cap is not None and cap.split("=", 1)[1].upper() in _CAPS_WITHOUT_BF16:
        return ComputeDtype(torch.float32, f"{cap} keeps oneDNN from this CPU's native bf16 ({isa})")
    return ComputeDtype(torch.bfloat16, f"this CPU has native bf16: {isa}")


auto_compute_dtype.cache_clear = _auto_compute_dtype.cache_clear  # forgets the probes' answers (tests patch them)


def auto_dtype(device_type: str, index: int | None = None) -> torch.dtype:
    """auto_compute_dtype(...).dtype, which torch.compile takes as a constant instead of tracing the probes."""
    return auto_compute_dtype(device_type, index).dtype


# What torch.compiler.assume_constant_result(auto_dtype) sets, without that function's import of torch._dynamo:
# ~140 MiB of RSS for every process that builds a Linear4bit (tests/test_load.py checks that loading imports none
# of the compiler stack; tests/test_lora_compile.py that a compiled model has no graph break here).
auto_dtype._dynamo_marked_constant = True


def resolve_compute_dtype(value, device: torch.device | str = "cpu") -> ComputeDtype:
    """A compute dtype as users give it ("auto", a name such as "bfloat16", or a torch.dtype) -> ComputeDtype."""
    if isinstance(value, str) and value == AUTO:
        device = torch.device(device)
        return auto_compute_dtype(device.type, device.index)
    dtype = DTYPE_NAMES.get(value) if isinstance(value, str) else value
    if dtype not in DTYPE_NAMES.values():
        raise ValueError(f"compute dtype must be 'auto', {', '.join(map(repr, DTYPE_NAMES))} or one of those "
                         f"torch dtypes, got {value!r}")  # fmt: skip
    return ComputeDtype(dtype, "given")
