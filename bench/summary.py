"""The summary table in bench/README.md, rebuilt from the full-mode JSON in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, Bound

README = Path(__file__).parent / "README.md"
START, END = "<!-- summary:start -->", "<!-- summary:end -->"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _comparison(row: dict[str, Any]) -> str:
    if row["compare"] == "added":
        return "—" if row["added"] is None else f"{row['added']:+.3g} {row['unit']}"
    return "—" if row["ratio"] is None else f"{row['ratio']:.3g}×"


def table(documents: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | metric | baseline | baseline value | Shoal | Shoal vs baseline | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for document in documents:
        for row in document["rows"]:
            target = Bound(**row["bound"]).text if row["bound"] else ""
            met = {True: " ✅ met", False: " ❌ not met", None: ""}[row["met"]]
            shoal = (
                _number(row["shoal_median"]) if row["shoal"] else f"not measured ({row['missing']})"
            )
            lines.append(
                f"| {document['scenario']} | {row['metric']} ({row['unit']}) "
                f"| {row['baseline_name'] or '—'} | {_number(row['baseline_median'])} "
                f"| {shoal} | {_comparison(row)} "
                f"| {target}{met} |"
            )
    return "\n".join(lines)


def write(readme: Path = README) -> Path:
    documents = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not documents:
        return readme
    dates = sorted({d["date"] for d in documents})
    machine = documents[-1]["machine"]
    commits = sorted({d.get("source", {}).get("commit") or "?" for d in documents})
    text = (
        f"{START}\nMeasured {dates[0]}"
        + (f" to {dates[-1]}" if len(dates) > 1 else "")
        + f" on {machine['cpu'] or 'an unknown CPU'}, {machine['cores']} cores, "
        f"{machine.get('memory', '')}, Linux {machine.get('kernel', '')}, "
        f"Python {machine['python']}, Shoal at commit {', '.join(commits)} "
        "(full mode; values are medians over rounds, "
        "the per-round spread is in each JSON and PNG).\n\n"
        f"{table(documents)}\n{END}"
    )
    current = readme.read_text() if readme.exists() else ""
    if START in current and END in current:
        head, rest = current.split(START, 1)
        current = head + text + rest.split(END, 1)[1]
    else:
        current += f"\n{text}\n"
    readme.write_text(current)
    return readme
