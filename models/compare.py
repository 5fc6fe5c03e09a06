"""Markdown comparison table from evaluation folders (``metrics.json`` written by models.evaluate).

    python -m models.compare --row "PCA=runs/eval/pca-val,runs/eval/pca-test" --row ...

Each row is ``LABEL=VAL_DIR,TEST_DIR`` (either may be ``-``). Columns: modality P@20 and finding
mAP@10 per modality and macro, for validation and test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.data import MODALITIES


def _cells(folder: str) -> list[str]:
    if folder in ("", "-"):
        return ["–"] * 6
    metrics = json.loads((Path(folder) / "metrics.json").read_text())
    finding = metrics["finding"]
    cells = [f"{100 * metrics['modality']['precision@20']:.2f}"]
    for modality in MODALITIES:
        value = finding.get(modality, {}).get("map@10")
        cells.append("–" if value is None else f"{value:.3f}")
    cells.append(f"{finding['macro']['map@10']:.3f}")
    return cells


def table(rows: list[tuple[str, str, str]]) -> str:
    head = ["P@20 mod. %"] + [f"{m} mAP@10" for m in MODALITIES] + ["macro"]
    lines = ["| model | split | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for label, val_dir, test_dir in rows:
        for split, folder in (("val", val_dir), ("test", test_dir)):
            if folder in ("", "-"):
                continue
            lines.append(f"| {label} | {split} | " + " | ".join(_cells(folder)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="LABEL=VAL_DIR,TEST_DIR")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.row:
        label, _, dirs = spec.rpartition("=")
        val_dir, _, test_dir = dirs.partition(",")
        rows.append((label, val_dir, test_dir or "-"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
