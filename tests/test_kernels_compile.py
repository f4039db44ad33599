"""Every Triton kernel compiles for the H200 (sm_90) without a GPU: tests/compile_kernels.py --quick, run with
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


@pytest.mark.slow  # about 25 s: 45 compilations
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--quick"], env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    results = RESULT_LINE.findall(proc.stdout)  # (status, kernel, label) per compiled variant
    assert {kernel for _, kernel, _ in results} == {"dequant", "matmul", "grad_input", "gemv"}
    assert not [r for r in results if r[0] == "FAIL"]
    # Every autotune candidate of each kernel was compiled (a label starts with the config's tile sizes, warps and
    # stages: compile_kernels.config_label).
    for kernel, configs in (("matmul", matmul.CONFIGS), ("grad_input", matmul.GRAD_INPUT_CONFIGS), ("gemv", gemv.CONFIGS)):
        for config in configs:
            sizes = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
            stages = f" p{config.kwargs['STAGES']}" if "STAGES" in config.kwargs else ""
            prefix = f"{sizes} w{config.num_warps} s{config.num_stages}{stages} "
            assert any(k == kernel and label.startswith(prefix) for _, k, label in results), (kernel, config)
    summary = re.search(r"^(\d+) variants compiled for sm_90 in \d+s, 0 failures$", proc.stdout, re.M)
    assert summary and int(summary[1]) == len(results), out[-3000:]
