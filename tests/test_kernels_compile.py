"""Every Triton kernel compiles for the H200 (sm_90) without a GPU, and the dequantization and GEMV launches pass
their speed gates (tests/sass_gates.py), each shown able to fail: tests/compile_kernels.py --quick, run with
Triton's compiler (not its interpreter) in a subprocess, because tests/conftest.py sets TRITON_INTERPRET=1 for
this process and triton.jit reads it when the kernels are defined."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nf4lora.kernels import gemv, matmul

SCRIPT = Path(__file__).resolve().with_name("compile_kernels.py")
RESULT_LINE = re.compile(r"^(ok|SMEM|FAIL) +(\S+) +(.+?) +[\d.]+s", re.M)  # status, kernel, variant label


@pytest.mark.slow  # about 40 s of CPU: 48 compilations and the gates' 2 self-checks
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--quick"], env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    results = RESULT_LINE.findall(proc.stdout)  # (status, kernel, label) per compiled variant
    assert {kernel for _, kernel, _ in results} == {
        "dequant", "matmul", "grad_input", "gemv", "block_scales", "sum_splits", "rmsnorm", "rmsnorm_bwd", "rope",
        "glu", "glu_bwd", "cross_entropy",
    }  # fmt: skip
    assert not [r for r in results if r[0] == "FAIL"]
    # Every autotune candidate of the matmul kernels was compiled (a label starts with the config's tile sizes, warps
    # and stages: compile_kernels.config_label), and every GEMV launch.
    for kernel, configs in (("matmul", matmul.CONFIGS), ("grad_input", matmul.GRAD_INPUT_CONFIGS)):
        for config in configs:
            sizes = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
            stages = f" p{config.kwargs['STAGES']}" if "STAGES" in config.kwargs else ""
            prefix = f"{sizes} w{config.num_warps} s{config.num_stages}{stages} "
            assert any(k == kernel and label.startswith(prefix) for _, k, label in results), (kernel, config)
    for m, config in gemv.DEFAULT_CONFIGS.items():
        prefix = f"{config.block_n}x{config.words} w{config.num_warps} M{m} "
        assert any(k == "gemv" and label.startswith(prefix) for _, k, label in results), (m, config)
    # The speed gates ran on the launches in use, and passed (a failure would have made the exit status 1).
    gated = re.findall(r"^  (ok|FAIL) +(dequant|gemv) +(.+?) +\{", proc.stdout, re.M)
    assert {kernel for _, kernel, _ in gated} == {"dequant", "gemv"}
    assert all(status == "ok" for status, _, _ in gated)
    assert any(label.startswith("8x1 w8 M1 bf16 dq no-bias aligned") for _, k, label in gated if k == "gemv")
    summary = re.search(r"^(\d+) variants compiled for sm_90 in \d+s, 0 failures$", proc.stdout, re.M)
    assert summary and int(summary[1]) == len(results), out[-3000:]


LAUNCH_CHECK = r"""
import importlib.util, sys
import torch
from triton.runtime.driver import driver
spec = importlib.util.spec_from_file_location("bench_kernels", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
sys.path.insert(0, spec.origin.rsplit("/", 1)[0])
spec.loader.exec_module(bench)


class Stub(bench._StubDriver):
    # The stub driver with a current device to switch, loading a kernel as a function handle of that device (a
    # CUDA function belongs to the context it was loaded in).
    device = 0

    class utils(bench._StubDriver.utils):
        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 100 + device, 64, 0, 1024

    def get_current_device(self):
        return self.device


stub = Stub()
launched = []
stub.launcher_cls = lambda src, metadata: (lambda *args: launched.append(args))
driver.set_active(stub)
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from nf4lora.kernels import gemv
from nf4lora.kernels.dispatch import state_args
from nf4lora.nf4 import quantize_4bit
gemv.check_triton_device = lambda t, name: None
packed, state = quantize_4bit(torch.randn(256, 512), 64, "nf4", True)
x = torch.randn(1, 512, dtype=torch.bfloat16)
for device in (0, 0, 1, 1):
    stub.device = device
    gemv.gemv(x, None, *state_args(packed, state))
assert len(gemv._launch._compiled) == 2, gemv._launch._compiled  # one launch, on two devices
# The launcher gets (grid x, y, z, stream, function, metadata, launch metadata, hooks, *arguments): the cached
# launch passes what Triton's dispatch passed, except the output tensor, which is new at every call; on device 1
# the kernel Triton loaded there, not device 0's.
assert [args[4] for args in launched] == [100, 100, 101, 101], [args[4] for args in launched]
for first, cached in (launched[:2], launched[2:]):
    assert first[:4] == cached[:4] and first[4] == cached[4], (first[:5], cached[:5])
    args_first, args_cached = first[9:], cached[9:]
    assert len(args_first) == len(args_cached)
    for a, b in zip(args_first, args_cached):
        same = a is b or not isinstance(a, torch.Tensor) and a == b or a.shape == b.shape
        assert type(a) is type(b) and same, (a, b)
# An int that Triton passes in another width (i32 up to 2**31 - 1, then i64) is another launch.
launch_args = lambda n: (x, packed, *state_args(packed, state)[1:6], x, x, 1, n, 512, 256)
types = [native_specialize_impl(BaseBackend, n, False, True, True) for n in (2**31 - 16, 2**31 + 16)]
assert types == [("i32", "D"), ("i64", "D")], types
assert gemv._launch.key(0, launch_args(2**31 - 16), {}) != gemv._launch.key(0, launch_args(2**31 + 16), {})
print("same launch")
"""


def test_cached_launch_passes_what_triton_passes(tmp_path):
    """kernels.launch.Launcher: the second call of a launch skips Triton's dispatch and calls the compiled kernel's
    launcher itself; with Triton's CUDA driver stubbed (bench_kernels._StubDriver), both calls reach the launcher
    with the same grid, kernel and arguments. A launch on another current device takes the kernel loaded there,
    and an int Triton passes in another width is another launch. (Compiles one GEMV for sm_90: a few seconds.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    proc = subprocess.run([sys.executable, "-c", LAUNCH_CHECK, str(bench)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "same launch" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
