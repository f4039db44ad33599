"""Smoke tests of the end-to-end benchmark scripts on a tiny checkpoint built here: each script runs with tiny
sizes into a temporary directory, and the results it writes hold the expected rows and the comparisons with the
real peers (transformers + PEFT + bitsandbytes) come out as they must."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from test_train_helpers import write_tiny_model

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def step_results(directory, suffix: str):
    """The step benchmark's file: qlora-step-cpu, or qlora-step-cpu-capped-<caps> where the environment caps the
    CPU's instruction set (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, as when the suite runs emulating AVX2)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    from harness import capped_suffix

    return directory / f"qlora-step-cpu{capped_suffix()}{suffix}"


def run_script(name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_qlora_step_writes_both_sides(tiny_model, tmp_path):
    run_script("bench_qlora_step.py", "--model", tiny_model, "--seq-len", "32", "--batch", "2",
               "--tokens-per-step", "32,64", "--steps", "2", "--warmup", "1", "--rounds", "2", "--out", str(tmp_path))  # fmt: skip
    data = json.loads(step_results(tmp_path, ".json").read_text())
    assert [p["tokens_per_step"] for p in data["points"]] == [32, 64]
    for point in data["points"]:
        for side in ("ours", "peer"):
            r = point[side]
            assert len(r["losses"]) == len(r["step_s"]) == 3
            assert all(math.isfinite(x) for x in r["losses"])
            # 2 rounds (processes) x 2 timed steps, pooled; each round's own median is kept
            assert r["tokens_per_s"]["n"] == 4 and r["tokens_per_s"]["min"] <= r["tokens_per_s"]["median"]
            assert len(r["tokens_per_s"]["round_medians"]) == len(r["step_s_rounds"]) == 2
            assert r["peak_rss_mib"] > 0
            assert r["trainable_params"] == point["ours"]["trainable_params"]  # same LoRA on both sides
        # Same quantized weights and the same LoRA init (B = 0): the first loss differs only by bf16 rounding.
        assert point["ours"]["losses"][0] == pytest.approx(point["peer"]["losses"][0], rel=2e-2)
    default = next(p for p in data["points"] if p["tokens_per_step"] == 64)
    assert default["ours"]["profile"] and default["peer"]["profile"]
    # the headline runs both sides with the same (glibc default) malloc settings, at every point; the ablation
    # reruns both with freed memory kept, once, at the default point only
    assert all(p[side]["malloc"] == "default" for p in data["points"] for side in ("ours", "peer"))
    kept = default["malloc_kept"]
    assert (kept["ours"]["malloc"], kept["peer"]["malloc"]) == ("kept", "kept")
    assert kept["ours"]["tokens_per_s"]["n"] == 2 and "malloc_kept" not in data["points"][0]
    md = step_results(tmp_path, ".md").read_text()
    # one row per point and side, plus two per side in the allocator table
    assert md.count("| ours (nf4lora) |") == 4 and md.count("| HF transformers + PEFT + bitsandbytes |") == 4
    assert "Where the time goes" in md and "Ablation: the allocator's share" in md
    assert "glibc malloc with its default settings on both sides" in md
    assert step_results(tmp_path, ".png").stat().st_size > 0


@pytest.mark.parametrize("capped", [False, True], ids=["native", "capped-avx2"])
def test_bench_lora_cpu_compares_three_layers(tmp_path, monkeypatch, capped):
    """Three layers, every one computing in the dtype "auto" picks (bf16 on a CPU with native bf16, float32 on
    others and with torch capped to AVX2, where the capped run writes its own -capped- file)."""
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    if capped:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    from nf4lora.kernels.precision import auto_compute_dtype

    auto_compute_dtype.cache_clear()
    dtype = auto_compute_dtype("cpu").dtype
    auto_compute_dtype.cache_clear()
    assert dtype == torch.float32 or not capped
    short = {torch.bfloat16: "bf16", torch.float32: "float32"}[dtype]
    run_script("bench_lora_cpu.py", "--tokens", "64", "--dim", "128", "--rank", "4", "--repeat", "3", "--out", str(tmp_path))
    name = "lora-cpu-capped-avx2" if capped else "lora-cpu"
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(data["timings_s"]) == {"ours (Linear4bit + LoRALinear)", "bitsandbytes Linear4bit + PEFT LoRA",
                                      f"{short} nn.Linear + LoRALinear (floor)"}  # fmt: skip
    assert all(len(t["samples"]) == 3 and t["median"] > 0 for t in data["timings_s"].values())
    paired = data["paired_speedup"]
    assert paired["n"] == 3 and paired["q1"] <= paired["median"] <= paired["q3"]
    assert data["max_abs_diff"] < 0.1  # the same NF4 bytes on both sides, B = 0: the base outputs agree
    # Same precision on every side: autocast exactly where the dtype is 16-bit, both quantized from the weight in
    # that dtype (so both dequantize to it), and every matmul of a step, the adapters' included, on its operands.
    assert data["compute_dtype"].startswith(str(dtype).removeprefix("torch.") + " (")
    assert data["autocast"] == (dtype != torch.float32)
    assert set(data["quant_state_dtypes"].values()) == {str(dtype)}
    assert data["matmul_dtypes"] == {name: [str(dtype)] for name in data["timings_s"]}
    md = (tmp_path / f"{name}.md").read_text()
    autocast = f'torch.autocast("cpu", dtype={dtype}) on every side' if dtype != torch.float32 else "without autocast"
    assert "Turn by turn" in md and autocast in md


def test_quality_matches_bitsandbytes(tiny_model, tmp_path, monkeypatch):
    run_script("quality.py", "--model", tiny_model, "--tokens", "128", "--seq-len", "64", "--stride", "32",
               "--blocksizes", "32", "--out", str(tmp_path))  # fmt: skip
    data = json.loads((tmp_path / "quality.json").read_text())
    ppl = {(r["impl"], r["format"], r["double_quant"], r["blocksize"]): r["ppl"] for r in data["perplexity"]}
    for fmt in ("nf4", "fp4"):
        for dq in (True, False):
            for bs in (32, 64):
                assert math.isfinite(ppl[("nf4lora", fmt, dq, bs)])
            assert ("bitsandbytes", fmt, dq, 64) in ppl
    # float32 forward: the same 16-bit weights give the same perplexity in both implementations, and without
    # double quantization the quantized bytes are identical, so the 4-bit perplexities agree as closely.
    assert ppl[("nf4lora", "16-bit", None, None)] == pytest.approx(ppl[("transformers", "16-bit", None, None)], rel=1e-5)
    for fmt in ("nf4", "fp4"):
        same = data["identical_bytes"][fmt]
        assert same["identical"] == same["tensors"] > 0
        assert ppl[("nf4lora", fmt, False, 64)] == pytest.approx(ppl[("bitsandbytes", fmt, False, 64)], rel=1e-5)
        # With double quantization, bitsandbytes' CPU lookup table misses the nearest 8-bit absmax code now and
        # then: few codes differ, and ours decodes nearer to the exact absmax in most of those.
        dq = data["identical_bytes"][fmt + "+dq"]
        assert dq["absmax_codes_differing"] <= 0.01 * dq["absmax_codes"]
        assert dq["ours_nearer"] >= 0.9 * dq["absmax_codes_differing"]
    assert len(data["layers"]) == 2 * 7  # every decoder Linear of the 2-layer model
    assert all(r["nf4_sqnr_db"] > 10 and r["fp4_sqnr_db"] > 10 for r in data["layers"])
    md = (tmp_path / "quality.md").read_text()
    assert "## nf4lora vs bitsandbytes on the same weights" in md and "| q_proj | 2 |" in md
    for png in ("quality-ppl.png", "quality-sqnr.png"):
        assert (tmp_path / png).stat().st_size > 0
    # A checkpoint given with --model carries no caveat; the default one (dequantized from a Q4_1 GGUF) says first
    # thing, and under each plot, that its 16-bit baseline is already a 4-bit model.
    assert data["baseline_caveat"] is None and "Q4_1" not in md
    monkeypatch.syspath_prepend(BENCHMARKS)
    import quality

    base = next(r for r in data["perplexity"] if r["impl"] == "nf4lora" and r["format"] == "16-bit")
    args = SimpleNamespace(**data["args"])
    md = quality.report(args, "built-in", data["perplexity"], base, data["identical_bytes"], data["layers"], 60.0,
                        quality.DEFAULT_MODEL_CAVEAT)  # fmt: skip
    assert md.splitlines()[2] == f"**{quality.DEFAULT_MODEL_CAVEAT}**"
    assert md.count(quality.PLOT_CAVEAT) == 2


def test_bench_load_checks_the_absolute_peak_without_import_costs(tiny_model, tmp_path):
    run_script("bench_load.py", "--model", tiny_model, "--repeat", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "load_cpu.json").read_text())
    for kind in ("ours", "hf"):
        run = data["runs"][kind][0]
        # the warm-up load imported every library the load path uses before the clock started
        assert run["modules_imported_during_load"] == []
        assert run["peak_rss_mib"] >= run["rss_before_mib"] > 0
    # the target is on the absolute peak RSS, in MiB (300 MB = 286.1 MiB)
    assert data["target_mib"] == pytest.approx(data["ours"]["model_mib"] + data["largest_tensor_mib"] + 300e6 / 2**20)
    assert data["target_met"] == (data["ours"]["peak_rss_mib"] <= data["target_mib"])
    md = (tmp_path / "load_cpu.md").read_text()
    assert "**Peak RSS of our load: " in md and (": met." in md) == data["target_met"]
    assert " MB" not in md.replace("300 MB", "")  # every figure in MiB


def test_quant_error_reproduces(tmp_path):
    for run in ("a", "b"):
        run_script("quant_error.py", "--size", "64", "--out", str(tmp_path / run))
    first, second = ((tmp_path / run / "quant_error.json").read_text() for run in ("a", "b"))
    assert first == second and "student-t(3)" in first


def test_results_page_headline_keeps_the_verdict(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import results_page

    (tmp_path / "x.md").write_text("# X\n\n**ours 1.21x the peer** (target >= 1.5x | 0.7x): not met.\n")
    _, headline, _ = results_page.section(tmp_path / "x.md")
    assert headline == "**ours 1.21x the peer** (target >= 1.5x \\| 0.7x): not met."


def test_results_page_equals_the_results_files(monkeypatch):
    """benchmarks/results/README.md is what results_page.py builds from the files beside it: a results file
    committed without regenerating the page leaves the page quoting numbers the file no longer holds."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    import results_page

    page = (results_page.RESULTS / results_page.PAGE).read_text()
    assert page == results_page.build(), "benchmarks/results/README.md is stale: run benchmarks/results_page.py"


def test_bench_dtype_cpu_names_a_capped_run_apart(monkeypatch):
    """Every cap the results file's ISA label names (isa_label) also names the file: a run with only
    ATEN_CPU_CAPABILITY or DNNL_MAX_CPU_ISA set wrote over the uncapped run's dtype-cpu-<isa> file."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    import bench_dtype_cpu

    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    uncapped = bench_dtype_cpu.results_name()
    assert uncapped.startswith("dtype-cpu-") and "capped" not in uncapped
    for var, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("DNNL_MAX_CPU_ISA", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        monkeypatch.setenv(var, value)
        assert bench_dtype_cpu.results_name() == uncapped + "-capped-avx2", var
        monkeypatch.delenv(var)


def _benchmark_module(monkeypatch, name: str):
    """benchmarks/<name>.py imported fresh (it imports harness from its own folder)."""
    import importlib.util

    monkeypatch.syspath_prepend(BENCHMARKS)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLOAT32_AUTO = SimpleNamespace(dtype=torch.float32, name="float32", reason="a CPU without native bf16 (patched)")


def test_bench_generate_runs_both_sides_in_the_auto_dtype(monkeypatch):
    """Both models are built in the compute dtype "auto" picks for the device (float32 on a CPU without native
    bf16), not a fixed bf16 that such a CPU multiplies ~30x slower."""
    bench = _benchmark_module(monkeypatch, "bench_generate")
    monkeypatch.setattr(bench, "auto_compute_dtype", lambda device: FLOAT32_AUTO)
    built = []

    def pair(shape, device, dtype=None):
        built.append(dtype)
        raise KeyboardInterrupt  # stop before generating anything

    monkeypatch.setattr(bench, "random_pair", pair)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--model", "tiny"])
    assert built == [torch.float32]


def test_bench_kernels_cpu_matmuls_run_in_the_auto_dtype(monkeypatch):
    """The CPU matmul rows: ours, bitsandbytes' and the dense reference all compute in the dtype "auto" picks."""
    bench = _benchmark_module(monkeypatch, "bench_kernels")
    monkeypatch.setattr(bench, "auto_compute_dtype", lambda device: FLOAT32_AUTO)
    seen = []  # the dtypes of every matmul's x and W
    matmul_4bit, linear = bench.matmul_4bit, bench.F.linear
    monkeypatch.setattr(bench, "matmul_4bit", lambda x, *a: seen.append(x.dtype) or matmul_4bit(x, *a))
    spy_linear = lambda x, w: seen.append((x.dtype, w.dtype)) or linear(x, w)  # noqa: E731
    monkeypatch.setattr(bench, "F", SimpleNamespace(linear=spy_linear))

    def timer(fn):  # runs each timed call once
        fn()
        return {"median": 1.0, "min": 1.0, "max": 1.0}

    results, sections = [], []
    bench.bench_cpu_matmul(SimpleNamespace(quick=True), None, timer, results, sections, [(4, 64)])
    assert len(seen) == 8 and set(seen) == {torch.float32, (torch.float32, torch.float32)}, seen
    assert all("dense_fp32_s" in r for r in results) and "fp32" in sections[0][0]


def test_fmt_time_resolves_microseconds(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    from harness import fmt_time

    assert [fmt_time(t) for t in (20.4e-6, 123.4e-6, 0.9996e-3, 12.3456e-3)] == ["20.4 µs", "123 µs", "1.00 ms", "12.35 ms"]

