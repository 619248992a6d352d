#!/usr/bin/env python3
"""Collates the claims every record in docs/results/ checked into one Markdown table (claim,
and whether it holds in the quick and the full record, each linked), and writes it into
README.md between the `<!-- claims -->` markers. Run after `mmke experiment ...`:
    python3 tools/claims_table.py
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
ROW = re.compile(r"^\| ([a-z0-9-]+) \| (.+?) \| (yes|\*\*no\*\*) \| .*\|$")


def claims(preset):
    """{claim: (holds, record file)} of every record of `preset`."""
    found = {}
    for record in sorted(RESULTS.glob(f"*-{preset}.md")):
        for line in record.read_text().splitlines():
            m = ROW.match(line)
            if m:
                found[m.group(2)] = ("yes" if m.group(3) == "yes" else "no", record.name)
    return found


def main():
    quick, full = claims("quick"), claims("full")
    order = list(quick) + [c for c in full if c not in quick]
    lines = ["| claim (where the paper makes it) | quick | full |", "| --- | --- | --- |"]
    for claim in order:
        cells = []
        for found in (quick, full):
            if claim in found:
                holds, name = found[claim]
                cells.append(f"[{holds}](docs/results/{name})")
            else:
                cells.append("not checked yet")
        lines.append(f"| {claim} | {cells[0]} | {cells[1]} |")
    table = "\n".join(lines)
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- claims -->", "<!-- /claims -->"
    a, b = text.index(start) + len(start), text.index(end)
    readme.write_text(text[:a] + "\n" + table + "\n" + text[b:])


if __name__ == "__main__":
    main()
