"""Render the results.json files under a runs folder as a Markdown table in docs/results.md.

    python scripts/results_table.py runs/baselines --title "..." --command "..." [--section baselines]

The table replaces the text between `<!-- results:<section> -->` and `<!-- /results:<section> -->`
in docs/results.md (appended if the markers are absent), so the document is generated, not typed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from docsection import write_section


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(root: Path) -> str:
    rows = ["| run | task | method | seed | selection | dev metrics | stored params | % of backbone | "
            "delta on disk | steps | s/step | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(root.glob("*/results.json")):
        r = json.loads(path.read_text())
        metrics = "; ".join(f"{split}: " + ", ".join(f"{k} {fmt(v)}" for k, v in m.items())
                            for split, m in r["metrics"].items())
        b = r["budget"]
        rows.append(f"| {path.parent.name} | {r['task']} | {r['method']} | {r['seed']} | "
                    f"{r['selection']} (step {r['selected_step']}) | {metrics} | {b['stored']:,} | "
                    f"{b['stored_percent']:.3f}% | {r['delta_bytes'] / 2**20:.2f} MiB | {r['steps']} | "
                    f"{r['step_time_s']:.2f} | {r['peak_memory_mb'] / 1024:.2f} GiB |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--title", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--section", default=None, help="marker name (default: the runs folder's name)")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results.md")
    args = parser.parse_args()
    section = args.section or args.root.name
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
               f"torch {torch.__version__}")
    body = (f"### {args.title}\n\n"
            f"Generated {datetime.date.today()} by `scripts/results_table.py` from `{args.root}/*/results.json`.\n"
            f"Command: `{args.command}`  \nMachine: {machine}.  \n"
            "Selection rule: the evaluation named in the *selection* column on the GLUE dev split "
            "(`last` = the end of training; no test split is used). Metrics are percentages.\n\n"
            f"{table(args.root)}")
    write_section(args.doc, f"results:{section}", body)
    print(body)


if __name__ == "__main__":
    main()
