"""``ntm report``: every table from the results JSON. Rewrites ``results/<name>.md`` beside each
``results/<name>.json`` and fills each marker pair in the README and ``docs/*.md``::

    <!-- results: results/mnist.json -->
    (the table of that file, replaced on every run)
    <!-- /results -->

``<!-- results: results/mnist.json rows -->`` keeps an image bench's main table only (no per-step splits).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DataError
from ..io import write_text
from .tables import is_generated_table, table_for

MARKER = re.compile(r"(<!-- results: (?P<file>[^ ]+?)(?P<rows> rows)? -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def fill_markers(text: str, root: Path, where: str = "") -> tuple[str, int]:
    """``text`` with every marker pair filled from the results file it names (relative to ``root``),
    and the number of pairs filled."""
    count = 0

    def table(match: re.Match) -> str:
        nonlocal count
        file = root / match.group("file")
        try:
            results = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{where}: cannot read {file} ({exc.__class__.__name__})") from None
        count += 1
        return match.group(1) + table_for(results, details=not match.group("rows")) + match.group(5)

    return MARKER.sub(table, text), count


def bench_results(file: Path) -> dict | None:
    """The bench results in ``file`` (a dict with "rows" and "config"), or None for any other JSON."""
    try:
        res = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {file} ({exc.__class__.__name__})") from None
    return res if isinstance(res, dict) and "rows" in res and "config" in res else None


def report(root: str | Path = ".", documents: tuple[str, ...] = ("README.md", "docs/*.md")) -> dict:
    """Regenerate the tables under ``root``; returns {"tables": [...], "documents": {path: pairs},
    "skipped": [...]}. A JSON that is not a bench result, and a ``.md`` beside it that is not a table
    this command wrote, are left alone (listed in "skipped")."""
    root = Path(root)
    tables, skipped = [], []
    for file in sorted((root / "results").glob("*.json")):
        md = file.with_suffix(".md")
        results = bench_results(file)
        if results is None or (md.exists() and not is_generated_table(md)):
            skipped.append(str(file.relative_to(root)))
            continue
        text = table_for(results)
        if not md.is_file() or md.read_text() != text:
            write_text(md, text)
        tables.append(str(md.relative_to(root)))
    filled = {}
    for pattern in documents:
        for doc in sorted(root.glob(pattern)):
            old = doc.read_text()
            new, n = fill_markers(old, root, str(doc))
            if new != old:
                write_text(doc, new)
            filled[str(doc.relative_to(root))] = n
    return {"tables": tables, "documents": filled, "skipped": skipped}
