"""Regenerate benchmarks/results/README.md: every results file in benchmarks/results/ on one page.

Each <name>.md there (written by a benchmark script through harness.py) becomes one section, its headings moved
one level down and its plots (PNG, linked relative to the folder) shown where the file shows them; a summary
table lists each section's headline line, machine and date. Nothing is measured here, so the page never says
more than the files do.

    .venv/bin/python benchmarks/results_page.py
"""

from __future__ import annotations

import re
from pathlib import Path

from harness import RESULTS

PAGE = "README.md"
# Reading order: the quantizer, the kernels, one layer, loading, a training step, model quality, a real run.
ORDER = ("quant_error", "quant-cpu", "kernels-cpu", "kernels-cuda", "gpu-check", "lora-cpu", "load", "qlora-step-cpu",
         "qlora-step-cuda", "quality", "finetune")  # fmt: skip
# The headline: the first line that starts in bold, whole, so the verdict written after the bold part ("**ours
# 1.21x ...** (target >= 1.5x ...): not met.") stays with it.
HEADLINE = re.compile(r"^\*\*.+\*\*.*$", re.M)


def rank(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(ORDER):
        if name == prefix or name.startswith(prefix + "-") or name.startswith(prefix + "_"):
            return i, name
    return len(ORDER), name


def section(md_file: Path) -> tuple[str, str, str]:
    """(title, headline, body) of one results file; the body's headings are one level deeper."""
    text = md_file.read_text()
    lines = text.splitlines()
    title = next((line[2:].strip() for line in lines if line.startswith("# ")), md_file.stem)
    body = "\n".join("#" + line if line.startswith("#") else line for line in lines if not line.startswith("# "))
    match = HEADLINE.search(text)
    headline = match.group(0).strip().replace("|", "\\|") if match else ""  # it goes into a table cell
    return title, headline, body.strip()


def machine_and_date(markdown: str) -> tuple[str, str]:
    """(machine, date) from the "Machine: k: v, ..." line harness.environment_block writes."""
    match = re.search(r"^Machine: (.*)\.$", markdown, re.M)
    if not match:
        return "not recorded", "not recorded"
    fields = dict(item.split(": ", 1) for item in match.group(1).split(", ") if ": " in item)
    isa = f", {fields['isa']}" if "isa" in fields else ""
    where = fields.get("gpu") or f"{fields.get('cpu', '?')}{isa}, {fields.get('cores', '?')} cores"
    return where, fields.get("date", "not recorded")


def build(results: Path = RESULTS) -> str:
    files = sorted((f for f in results.glob("*.md") if f.name != PAGE), key=lambda f: rank(f.stem))
    summary, sections = [], []
    for f in files:
        title, headline, body = section(f)
        anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
        where, date = machine_and_date(f.read_text())
        summary.append(f"| [{title}](#{anchor}) | {headline or '-'} | {where} | {date} | [{f.name}]({f.name}) |")
        data = f" · data: [{f.stem}.json]({f.stem}.json)" if f.with_suffix(".json").is_file() else ""
        sections.append(f"## {title}\n\nFrom [{f.name}]({f.name}){data}.\n\n{body}\n")
    page = [
        "# Benchmark results",
        "",
        "Every table and plot the benchmark scripts in `benchmarks/` wrote into this folder, side by side with its "
        "peer from the same run. Each section names the machine, the versions and the date it was measured on; "
        "the CPU numbers come from 2-core shared machines, so read the ratios and the spreads, not single "
        "timings. Regenerate this page with `.venv/bin/python benchmarks/results_page.py`.",
        "",
        "| result | headline | machine | date | file |",
        "|---|---|---|---|---|",
        *summary,
        "",
        *sections,
    ]
    return "\n".join(page).rstrip() + "\n"


def main():
    out = RESULTS / PAGE
    out.write_text(build())
    print(out)


if __name__ == "__main__":
    main()
