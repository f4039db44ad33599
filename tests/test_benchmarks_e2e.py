"""Smoke tests of the end-to-end benchmark scripts on a tiny checkpoint built here: each script runs with tiny
sizes into a temporary directory, and the results it writes hold the expected rows and the comparisons with the
real peers (transformers + PEFT + bitsandbytes) come out as they must."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from test_train_helpers import write_tiny_model

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def run_script(name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_qlora_step_writes_both_sides(tiny_model, tmp_path):
    run_script("bench_qlora_step.py", "--model", tiny_model, "--seq-len", "32", "--batch", "2",
               "--tokens-per-step", "32,64", "--steps", "2", "--warmup", "1", "--rounds", "2", "--out", str(tmp_path))  # fmt: skip
    data = json.loads((tmp_path / "qlora-step-cpu.json").read_text())
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
    # ours runs with nf4lora's malloc settings, the peer with the defaults; the ablation swaps them, once
    assert (default["ours"]["malloc"], default["peer"]["malloc"]) == ("kept", "default")
    swapped = default["swapped_malloc"]
    assert (swapped["ours"]["malloc"], swapped["peer"]["malloc"]) == ("default", "kept")
    assert swapped["ours"]["tokens_per_s"]["n"] == 2 and "swapped_malloc" not in data["points"][0]
    md = (tmp_path / "qlora-step-cpu.md").read_text()
    # one row per point and side, plus two per side in the allocator table
    assert md.count("| ours (nf4lora) |") == 4 and md.count("| HF transformers + PEFT + bitsandbytes |") == 4
    assert "Where the time goes" in md and "The allocator's share" in md
    assert (tmp_path / "qlora-step-cpu.png").stat().st_size > 0


def test_bench_lora_cpu_compares_three_layers(tmp_path):
    run_script("bench_lora_cpu.py", "--tokens", "64", "--dim", "128", "--rank", "4", "--repeat", "3", "--out", str(tmp_path))
    data = json.loads((tmp_path / "lora-cpu.json").read_text())
    assert set(data["timings_s"]) == {"ours (Linear4bit + LoRALinear)", "bitsandbytes Linear4bit + PEFT LoRA",
                                      "bf16 nn.Linear + LoRALinear (floor)"}  # fmt: skip
    assert all(len(t["samples"]) == 3 and t["median"] > 0 for t in data["timings_s"].values())
    paired = data["paired_speedup"]
    assert paired["n"] == 3 and paired["q1"] <= paired["median"] <= paired["q3"]
    assert data["max_abs_diff"] < 0.1  # the same NF4 bytes on both sides, B = 0: the base outputs agree in bf16
    assert "Turn by turn" in (tmp_path / "lora-cpu.md").read_text()


def test_quality_matches_bitsandbytes(tiny_model, tmp_path):
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
