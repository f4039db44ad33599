"""Every number in the README's CPU benchmark table is in the results file its row links (or, for a row without a
link, the file of the row above): a re-run that changes a file without the README fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a measured quantity: 13.81 ms, 1.16x, 0.94 s, 354 tok/s, 1659 MiB (targets, in the last column, are not checked)
MEASURED = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) ?(?:ms|x|s|tok/s|MiB)\b")


def cpu_table_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### CPU", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if not set(row) <= set("|- ")]


def test_every_number_in_the_cpu_table_is_in_its_results_file():
    rows = cpu_table_rows()
    assert len(rows) >= 10
    files: list[Path] = []
    checked = 0
    for cells in rows:
        linked = [ROOT / path for path in re.findall(r"\((benchmarks/results/[\w.-]+\.md)\)", " ".join(cells))]
        files = linked or files
        assert files, f"no results file for the row {cells[0]!r}"
        text = " ".join(path.read_text() for path in files)
        numbers = set(re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", text))
        for cell in cells[1:-1]:  # not the description, not the target
            for value in MEASURED.findall(cell):
                assert value in numbers, f"{value} (row {cells[0]!r}) is in none of {[p.name for p in files]}"
                checked += 1
    assert checked >= 40
