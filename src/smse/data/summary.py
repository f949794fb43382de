"""The table of images by class, type and magnification, with patient and slide counts."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from smse.data.records import Record, mag_name


def summarize(records: Sequence[Record]) -> dict:
    """Counts per tumour type and magnification, slide folders and patients, as plain data."""
    mags = sorted({r.magnification for r in records})
    rows: dict[str, Counter] = defaultdict(Counter)
    folders: dict[str, set] = defaultdict(set)
    label_of: dict[str, str] = {}
    for r in records:
        rows[r.tumor_type][r.magnification] += 1
        folders[r.tumor_type].add(str(Path(r.path).parent.parent))
        label_of[r.tumor_type] = r.label
    table = []
    for t in sorted(rows, key=lambda t: (label_of[t], _type_order(t))):
        table.append(
            {
                "type": t,
                "label": label_of[t],
                **{mag_name(m): rows[t][m] for m in mags},
                "total": sum(rows[t].values()),
                "folders": len(folders[t]),
            }
        )
    return {
        "images": len(records),
        "patients": len({r.patient for r in records}),
        "slide_folders": len({str(Path(r.path).parent.parent) for r in records}),
        "by_label": dict(sorted(Counter(r.label for r in records).items())),
        "patients_by_label": {
            lab: len({r.patient for r in records if r.label == lab}) for lab in sorted({r.label for r in records})
        },
        "by_magnification": {mag_name(m): n for m, n in sorted(Counter(r.magnification for r in records).items())},
        "magnifications": [mag_name(m) for m in mags],
        "table": table,
    }


def _type_order(t: str) -> int:
    order = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
    return order.index(t) if t in order else len(order)


def format_table(summary: dict) -> str:
    """Markdown table in the layout of the BreakHis documentation."""
    mags = summary["magnifications"]
    header = "| type | " + " | ".join(mags) + " | total | slide folders |"
    lines = [header, "|" + "---|" * (len(mags) + 3)]
    for row in summary["table"]:
        lines.append(
            f"| {row['type']} | " + " | ".join(str(row[m]) for m in mags) + f" | {row['total']} | {row['folders']} |"
        )
    totals = [sum(row[m] for row in summary["table"]) for m in mags]
    lines.append("| all | " + " | ".join(map(str, totals)) + f" | {summary['images']} | {summary['slide_folders']} |")
    lines.append("")
    # (the images by class follow in the loader's summary line: said once)
    lines.append(
        f"{summary['patients']} patients ("
        + ", ".join(f"{k} {v}" for k, v in summary["patients_by_label"].items())
        + ")"
    )
    return "\n".join(lines)


__all__ = [
    "summarize",
    "format_table",
]
