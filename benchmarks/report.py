"""Builds BENCHMARKS.md from `BENCHMARKS.in.md` and the tables the benchmarks wrote.

Every table in BENCHMARKS.md comes from a file in `benchmarks/results/` written by the
benchmark script named next to it; this script only stitches them into the prose. A line
`<!-- include results/NAME.md -->` in the template is replaced by that file, its headings
moved two levels down and its first heading dropped (the template has its own).

    python benchmarks/report.py            # rewrites BENCHMARKS.md
    python benchmarks/report.py --check    # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
INCLUDE = re.compile(r"^<!-- include (results/[\w./-]+\.md) -->$")


def _embed(path):
    lines = (HERE / path).read_text(encoding="utf-8").rstrip("\n").splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    out = []
    for line in lines:
        if line.startswith("#"):
            line = "##" + line
        line = line.replace("](accuracy_vs_sparsity.png)", "](benchmarks/results/"
                            "accuracy_vs_sparsity.png)")
        prev = out[-1] if out else ""
        if prev.strip() and prev.startswith("|") != line.startswith("|"):
            out.append("")  # a table needs blank lines around it to render
        out.append(line)
    return [f"<!-- from benchmarks/{path} (written by its script) -->", *out,
            f"<!-- end of benchmarks/{path} -->"]


def build():
    out = []
    for line in (HERE / "BENCHMARKS.in.md").read_text(encoding="utf-8").splitlines():
        m = INCLUDE.match(line.strip())
        out.extend(_embed(m.group(1)) if m else [line])
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = build()
    target = ROOT / "BENCHMARKS.md"
    if args.check:
        ok = target.exists() and target.read_text(encoding="utf-8") == text
        print("BENCHMARKS.md is up to date" if ok else "BENCHMARKS.md is out of date")
        return 0 if ok else 1
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
