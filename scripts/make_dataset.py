"""Write the bundled fine-tuning dataset: numeric dates (DD/MM/YYYY) rewritten in words ("March 15, 2024").

Why this task: success is crisp (exact match of the answer), SmolLM2-135M-Instruct cannot do it out of the box
(it echoes the digits back), and it needs only a small mapping (month number -> name, drop the day's leading
zero), which a rank-16 adapter learns within a few hundred optimizer updates on a CPU.

    python scripts/make_dataset.py            # rewrites train/datasets/dates_{train,valid}.jsonl

The output is a pure function of SEED; the files in the repository are its output.
"""

from __future__ import annotations

import calendar
import datetime
import json
import random
from pathlib import Path

SEED = 20240315
N_TRAIN, N_VALID = 400, 100
OUT = Path(__file__).resolve().parent.parent / "train" / "datasets"
# A short system turn: it replaces the chat template's 17-token default one, and every token counts when
# training on two CPU cores (41 tokens per example instead of 59). The user turn is the bare date.
SYSTEM = "Write dates in words."


def example(rng: random.Random) -> tuple[tuple[int, int, int], dict]:
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    date = datetime.date(year, month, day)
    numeric = date.strftime("%d/%m/%Y")
    words = f"{calendar.month_name[month]} {day}, {year}"
    record = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": numeric},
                           {"role": "assistant", "content": words}]}  # fmt: skip
    return (year, month, day), record


def main() -> None:
    rng = random.Random(SEED)
    seen: set[tuple[int, int, int]] = set()
    records = []
    while len(records) < N_TRAIN + N_VALID:
        key, record = example(rng)
        if key not in seen:  # no date appears in both splits
            seen.add(key)
            records.append(record)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("dates_train.jsonl", records[:N_TRAIN]), ("dates_valid.jsonl", records[N_TRAIN:])):
        with open(OUT / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(part)} records to {OUT / name}")


if __name__ == "__main__":
    main()
