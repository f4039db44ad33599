"""benchmarks/gpu_check.sh must not rot between the rare sessions that have a GPU: its dry run (CPU only) runs
every step that can run here and must write the files the real run writes."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_benchmarks_e2e import step_results

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run(*args, timeout=600):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The results folder of one full dry run, and the run's process."""
    out = tmp_path_factory.mktemp("gpu-check") / "gpu-results"
    return out, run(str(out), "--dry-run", "--python", sys.executable)


def test_dry_run_runs_every_step_and_writes_results(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = (out / "summary.txt").read_text()
    assert "OK       gpu-tests-collect" in summary
    assert "OK       bench-kernels-dry" in summary
    assert "OK       bench-qlora-step-dry" in summary  # the end-to-end QLoRA step benchmark is part of the check
    # the decode step: the memory-bound kernel sections, generation against transformers + bitsandbytes, the GEMV
    # candidates (each script's CPU run)
    assert "OK       decode-dry" in summary and (out / "kernel-versions-cpu.json").exists()
    generation = json.loads((out / "generate-cpu-tiny.json").read_text())
    assert {r["side"] for r in generation["results"]} == {"nf4lora (decode=auto)", "nf4lora (decode=dynamic)",
                                                          "transformers + bitsandbytes"}  # fmt: skip
    assert all(r["tokens_per_s"] > 0 for r in generation["results"])
    assert "SKIPPED  gpu tests: dry run" in summary  # says clearly what it did not do
    assert "ALL STEPS THAT RAN PASSED" in summary
    assert "torch " in (out / "env.txt").read_text()

    collected = (out / "gpu-tests-collect.log").read_text()
    assert "test_kernels_gpu.py::test_bf16_fused_forward_and_grad_input" in collected

    data = json.loads((out / "kernels-cpu-quick.json").read_text())
    assert data["device"] == "cpu" and data["quick"] is True
    ops = {r["what"] for r in data["results"]}
    assert {"dequantize nf4+DQ -> bf16", "forward (no grad)", "forward + grad-input"} <= ops
    assert all(r["ours_s"]["median"] > 0 for r in data["results"])
    assert "## Dequantize (CPU torch path)" in (out / "kernels-cpu-quick.md").read_text()
    step = json.loads(step_results(out, ".json").read_text())
    assert step["points"] and all(p[side]["tokens_per_s"]["median"] > 0 for p in step["points"] for side in ("ours", "peer"))
    assert "test_kernels_model_ops_gpu.py::test_linear_cross_entropy_bf16" in collected


def test_gpu_step_report_gives_mfu_targets_and_profiles(dry_run, monkeypatch):
    """The QLoRA step's CUDA report (MFU, the targets at every point, each side's per-kernel profile), rendered
    from the points of the dry run's tiny CPU run as if they came from a GPU: its code runs nowhere else here."""
    out, _ = dry_run
    step = json.loads(step_results(out, ".json").read_text())
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_qlora_step

    points = step["points"]
    for p in points:
        p.pop("malloc_kept", None)  # the CPU-only allocator ablation
        for side in ("ours", "peer"):
            p[side]["peak_cuda_mib"] = p[side]["peak_rss_mib"]
    args = SimpleNamespace(**{**step["args"], "device": "cuda", "peak_tflops": 790.0})
    md = bench_qlora_step.report(args, points, step["default_tokens_per_step"], "tiny", "random", "qlora-step-cuda",
                                 (0.0, 0.0), step["params"])  # fmt: skip
    assert "## Targets at every point" in md and f"{8 * step['params'] / 1e9:.2f} GFLOP per token" in md
    ours = points[0]["ours"]
    mfu = 8 * step["params"] * ours["tokens_per_s"]["median"] / 790e12
    assert f"| {points[0]['tokens_per_step']} | {points[0]['speedup']:.2f}x |" in md and f"{mfu:.1%}" in md
    assert md.count("torch.profiler self CUDA time") == 2  # one step of each side, by kernel on a GPU


def test_only_runs_the_named_steps(tmp_path):
    """--only lets a short GPU slot run what is missing first; every step left out is named in the summary."""
    out = tmp_path / "gpu-results"
    proc = run(str(out), "--dry-run", "--only", "tests", "--bnb-wheels", str(tmp_path), "--python", sys.executable)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    assert "OK       gpu-tests-collect" in summary
    for name in ("decode", "bench-kernels", "bench-qlora-step", "triton-tests-compiled"):
        assert f"SKIPPED  {name}: not in --only tests" in summary
    assert "bench-kernels-dry" not in summary and not (out / "kernels-cpu-quick.json").exists()
    # the wheel's bitsandbytes (0.50) replaces any installed version; env.txt names the versions in use
    assert "--force-reinstall --no-deps bitsandbytes==0.50.*" in summary
    assert "bitsandbytes " in (out / "env.txt").read_text()


def test_usage_errors():
    proc = run(timeout=60)
    assert proc.returncode == 2 and "RESULTS_DIR" in proc.stdout
    proc = run("a", "b", timeout=60)
    assert proc.returncode == 2 and "one RESULTS_DIR only" in proc.stderr
    proc = run("a", "--frobnicate", timeout=60)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr
    proc = run("a", "--only", "tests,benchmarks", timeout=60)
    assert proc.returncode == 2 and "unknown step 'benchmarks' in --only" in proc.stderr
