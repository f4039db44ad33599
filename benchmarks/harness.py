"""The one small harness every benchmark shares: timing, memory, environment, and results files.

Scripts import it as a sibling module (`python benchmarks/<script>.py` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of torch, triton, nf4lora and any peers named."""
    out = {}
    for name in ("torch", "triton", "nf4lora", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, str]:
    """Where the numbers were taken: CPU model, its ISA (what decides the fast dtypes and kernels) and cores, GPU
    if any, Python, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from nf4lora.kernels.precision import isa_label

    info = {
        "cpu": cpu,
        "isa": f"{isa_label()} (torch ATen kernels: {torch.backends.cpu.get_cpu_capability()})",
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_fn(fn, *, warmup: int = 2, repeat: int = 7, min_time: float = 0.0) -> dict[str, float]:
    """Median and spread (min, max) in seconds of `fn()` over `repeat` runs after `warmup` runs.

    On CUDA it synchronises around each call. These machines are shared and noisy: report the median.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        gc.collect()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt_time(seconds: float) -> str:
    """A duration for a table: below 1 ms in µs to 3 significant figures (a 20 µs kernel reads "20.4 µs", not
    "0.02 ms"), else in ms with 2 decimals."""
    us = seconds * 1e6
    if us < 999.5:  # what .3g would print as "1e+03"
        return f"{us:.3g} µs"
    return f"{seconds * 1e3:.2f} ms"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_block(*packages: str) -> str:
    """A markdown paragraph naming machine and versions, for the top of every results file."""
    m, v = machine(), versions(*packages)
    where = ", ".join(f"{k}: {val}" for k, val in m.items())
    what = ", ".join(f"{k} {val}" for k, val in v.items())
    return f"Machine: {where}.\n\nVersions: {what}.\n"


def capped_suffix() -> str:
    """"-capped-<each cap's value>" where the environment caps this process's CPU instruction set
    (precision.CAP_VARS, e.g. ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to behave like an AVX2 machine),
    else "": a capped run's results file never overwrites the uncapped one's."""
    from nf4lora.kernels.precision import CAP_VARS

    caps = dict.fromkeys(os.environ[var].lower() for var in CAP_VARS if os.environ.get(var))  # ordered, no repeats
    return "-capped-" + "-".join(caps) if caps else ""


def write_results(name: str, markdown: str, data: dict | None = None) -> Path:
    """Write benchmarks/results/<name>.md (and .json if data is given); returns the markdown path."""
    return write_results_in(RESULTS, name, markdown, data)


def write_results_in(directory: str | os.PathLike, name: str, markdown: str, data: dict | None = None) -> Path:
    """write_results into another directory (smoke tests and scratch runs leave benchmarks/results/ alone)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    if data is not None:
        (directory / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md


def english_text(min_chars: int) -> str:
    """Real English text on every machine: CPython's documentation topics (pydoc_data.topics, in key order),
    at least `min_chars` characters (all of it, about 1 MB, if fewer exist)."""
    from pydoc_data.topics import topics

    parts, n = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        n += len(topics[key])
        if n >= min_chars:
            break
    return "\n\n".join(parts)
