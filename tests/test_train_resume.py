"""Acceptance: a run killed after a checkpoint and resumed with --resume ends bitwise equal to an uninterrupted
run, having seen the same batches in the same order."""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from test_train_helpers import date_records, read_metrics, write_jsonl, write_tiny_model

# Kills the process (SIGKILL: no cleanup, no atexit) when the optimizer is about to take step KILL_AT, i.e.
# after the checkpoint of step KILL_AT - 1 was written and in the middle of the next step.
STEP_KILLER = """
import os, signal, sys
from nf4lora.train import optim
kill_at, original, calls = int(os.environ["KILL_AT"]), optim.PagedAdamW.step, [0]
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
optim.PagedAdamW.step = step
"""
KILLER = STEP_KILLER + """
from nf4lora.train.cli import main
sys.exit(main(sys.argv[1:]))
"""
CLI = "import sys; from nf4lora.train.cli import main; sys.exit(main(sys.argv[1:]))"


def _run(code, args, cwd, env=None):
    # One thread: tiny matmuls gain nothing from more, and on a shared 2-core machine OpenMP spinning makes
    # them ~10x slower. Every run uses the same setting, as bitwise equality needs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", date_records(40, seed=5))
    common = ["finetune", "--model", model, "--data", data, "--seq-len", "128", "--batch-size", "4",
              "--micro-batch-size", "2", "--max-steps", "5", "--save-every", "2", "--eval-every", "2",
              "--warmup-steps", "1", "--lr", "5e-3", "--lora-r", "4", "--lora-dropout", "0.1",
              "--no-progress"]  # fmt: skip

    full = _run(CLI, [*common, "--output-dir", str(tmp_path / "full")], tmp_path)
    assert full.returncode == 0, full.stderr

    out = str(tmp_path / "killed")
    killed = _run(KILLER, [*common, "--output-dir", out], tmp_path, env={"KILL_AT": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        assert json.load(f)["step"] == 2
    assert not os.path.exists(os.path.join(out, "adapter"))

    resumed = _run(CLI, [*common, "--output-dir", out, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key  # bitwise
    assert any(bool(t.abs().sum()) for k, t in a.items() if "lora_B" in k)  # training did move the adapter

    m_full, m_resumed = read_metrics(tmp_path / "full"), read_metrics(out)
    assert [m["step"] for m in m_resumed] == [1, 2, 3, 4, 5]
    for x, y in zip(m_full, m_resumed):
        for key in ("batch_sha1", "data_epoch", "data_row", "loss", "grad_norm", "lr", "val_loss"):
            assert x.get(key) == y.get(key), (x["step"], key)
