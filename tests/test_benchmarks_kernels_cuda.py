"""bench_kernels.py's CUDA code path, run on the CPU: the Triton kernels in the interpreter and a stub clock.

GPU time comes in short slots; a Python error in the CUDA half of the benchmark would otherwise first show there
(and cost the slot). The numbers mean nothing here; the test checks that every section runs, that the dispatch
column names the path ops.py takes, and that a failure part-way still writes what was measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from nf4lora.kernels import gemv

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setenv("NF4LORA_BACKEND", "triton")  # CPU tensors through the Triton kernels (interpreter)
    monkeypatch.syspath_prepend(BENCHMARKS)  # bench_kernels imports harness from its own folder
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(BENCHMARKS, "bench_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "QUICK_SHAPES", [(32, 64)])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    profile = module.host_profile
    monkeypatch.setattr(module, "host_profile", lambda fn: profile(fn, calls=2, top=3))  # 1000 calls: minutes here
    return module


class StubTimer:
    """Calls each timed function once (so it must run) and reports 1 ms."""

    def __call__(self, fn):
        fn()
        return {"median": 1e-3, "min": 1e-3, "max": 1e-3}

    def row(self, *fns):
        return [None if fn is None else self(fn) for fn in fns]

    per_call = __call__


def test_cuda_sections_run_and_name_the_dispatch(bench, capsys):
    results, sections = [], []
    args = SimpleNamespace(quick=True, peak_gbps=None, only=None)
    bench.bench_cuda(args, None, StubTimer(), results, sections, device="cpu")
    titles = [title for title, _, _ in sections]
    assert len(titles) == 7 and all(rows for _, _, rows in sections), titles
    paths = {r["m"]: r["path"] for r in results if r["what"] == "forward"}
    assert paths == {**{m: "gemv" for m in bench.DECODE_MS}, 16: "dequant + cuBLAS"}
    assert gemv.MAX_M >= max(bench.DECODE_MS)
    assert "host profile of 2 calls of matmul_4bit" in capsys.readouterr().out


def test_only_runs_the_named_sections(bench):
    """gpu_check.sh's decode step runs the memory-bound sections alone."""
    results, sections = [], []
    args = SimpleNamespace(quick=True, peak_gbps=None, only=["dequant", "decode"])
    bench.bench_cuda(args, None, StubTimer(), results, sections, device="cpu")
    assert [title.split(" ")[0] for title, _, _ in sections] == ["Dequantize", "Dequantize", "Decode:"]


def test_a_failure_part_way_still_writes_the_results(bench, monkeypatch, tmp_path):
    def stop_after_one_section(args, bnb, timer, results, sections, device="cuda"):
        results.append({"what": "dequantize", "ours_s": {"median": 1e-3}})
        sections.append(("Dequantize", ["op"], [["dequantize"]]))
        raise RuntimeError("out of device time")

    monkeypatch.setattr(bench, "bench_cpu", stop_after_one_section)
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == 1
    markdown = (tmp_path / "kernels-cpu-quick.md").read_text()
    assert "The run stopped part-way (RuntimeError: out of device time)" in markdown and "## Dequantize" in markdown
    data = json.loads((tmp_path / "kernels-cpu-quick.json").read_text())
    assert data["stopped"] == "RuntimeError: out of device time" and len(data["results"]) == 1


def test_a_row_is_timed_one_way(bench, monkeypatch):
    """If one fn of a row cannot be captured in a CUDA graph, every fn of that row is timed the fallback way (and
    the table marks the row); otherwise every fn is timed from its graph. Timer's CUDA calls are stubbed here."""
    timer = bench.Timer("cuda", repeat=1)
    monkeypatch.setattr(timer, "_replay", lambda graph: {"median": 1e-5, "min": 1e-5, "max": 1e-5, "method": timer.GRAPH})
    monkeypatch.setattr(timer, "_do_bench", lambda fn: {"median": 2e-5, "min": 2e-5, "max": 2e-5, "method": timer.FALLBACK})
    monkeypatch.setattr(timer, "_capture", lambda fn: fn())

    def ok():
        return "graph"

    def uncapturable():
        raise RuntimeError("operation not permitted when stream is capturing")

    assert [t["method"] for t in timer.row(ok, ok)] == [timer.GRAPH, timer.GRAPH]
    ours, peer, missing = timer.row(ok, uncapturable, None)
    assert ours["method"] == peer["method"] == timer.FALLBACK and missing is None

    results, rows = [], []
    bench.row(results, rows, "forward", (32, 64), 1, ours, {"bitsandbytes": peer})
    bench.row(results, rows, "forward", (32, 64), 1, *timer.row(ok, ok)[:1], {"bitsandbytes": None})
    assert rows[0][0] == "forward ‡" and rows[1][0] == "forward"
    assert results[0]["ours_s"]["method"] == timer.FALLBACK


@pytest.fixture
def versions(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    spec = importlib.util.spec_from_file_location("kernel_versions", os.path.join(BENCHMARKS, "kernel_versions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_versions_check_catches_a_wrong_version_and_writes_results(versions, tmp_path):
    """The CPU run (the interpreter) checks every candidate against F.linear; a version computing something else is
    caught; and the GPU section's code runs here with the stub clock."""
    versions.main(["--device", "cpu", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "kernel-versions-cpu.json").read_text())
    checked = {(row[0], row[1]) for row in written["checked"]}
    for m in versions.CPU_MS:
        assert {name for name, at in checked if at == m} == set(versions.versions(m)), m
    assert any(name.endswith(", loads") for name, _ in checked)

    def wrong(x, *state):  # x's columns swapped pairwise: the same numbers, summed against the wrong weights
        return versions.gemv.gemv(x.view(1, -1, 2).flip(-1).reshape(1, -1).contiguous(), None, *state)

    with pytest.raises(AssertionError, match="wrong M=1 40x512"):
        versions.check("cpu", versions.CPU_SHAPES[:1], 1, {"wrong": wrong})
    rows, records = versions.timed("cpu", versions.CPU_SHAPES[:1], 1, {"a": wrong}, StubTimer(), lambda nbytes: None)
    assert len(rows) == len(records) == 1 and rows[0][-1] == "1.00x"
