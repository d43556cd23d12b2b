"""Put `selectune report`'s table for a runs folder into docs/results.md (and its plot into docs/).

    python scripts/analysis/results_table.py runs/baselines [more runs folders] --title "..." --command "..."
                                             [--section name]
                                    [--pair sdiff:full --pair sdiff:udiff]   (A − B per task on common seeds)

The table replaces the text between `<!-- results:<section> -->` and `<!-- /results:<section> -->`
in docs/results.md (appended if absent): the document is generated from results.json files, not typed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from selectune.errors import SelectuneError
from selectune.report import collect, glue_matrix, markdown, paired, parse_pair, plots, summarise, vtab_averages

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import write_section

DOCS = Path(__file__).resolve().parents[2] / "docs"


def method_pair(text: str) -> tuple[str, str]:
    try:
        return parse_pair(text)
    except SelectuneError as error:  # argparse turns only its own error types into a usage message
        raise argparse.ArgumentTypeError(str(error)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+")
    parser.add_argument("--title", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--section", default=None, help="marker name (default: the runs folder's name)")
    parser.add_argument("--pair", action="append", default=[], metavar="A:B", type=method_pair,
                        help="two method labels as the tables name them; adds A − B per task on common seeds")
    args = parser.parse_args()
    section = args.section or args.roots[0].name
    runs = collect(args.roots)
    rows = summarise(runs)
    differences = paired(runs, args.pair) if args.pair else ""
    plots(rows, runs, args.roots[0])
    image = f"{section}_metric_vs_budget.png"
    shutil.copy(args.roots[0] / "metric_vs_budget.png", DOCS / image)
    matrix = glue_matrix(runs)
    sources = ", ".join(f"`{root}/**/results.json`" for root in args.roots)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
               f"torch {torch.__version__}")
    body = (f"### {args.title}\n\nGenerated {datetime.date.today()} by `scripts/analysis/results_table.py` "
            "(selectune report) "
            f"from {sources}.  \nCommand: `{args.command}`  \nTable made on: {machine}. The runs ran where their "
            "session did (s/step and peak memory are theirs, averaged; a row whose seeds trained in different "
            "precisions, as `trainer.precision=auto` resolved on each machine, names them by seed, and where the runs "
            "that recorded their machine ran on more than one, s/step names the machine that timed each seed).  \n"
            + ("Selection rule: each run keeps the evaluation with the best score on `val` (the share of train "
               "its recipe carves out at a fixed seed and does not train on; `trainer.select=best`); dev is scored "
               "at that evaluation and never chosen on. "
               if runs and all(r.get("selection") == "best" and r.get("selected_on") == "val" for r in runs) else
               "Selection rule: the final protocol (train on train800val200, evaluate on test at the end of "
               "training, `trainer.select=last`); nothing is chosen on the test split. "
               if any(r["split"] == "test" for r in rows) else
               "Selection rule: each run's evaluation on VTAB's val200 (the select protocol: train on train800) at "
               "the end of training (`trainer.select=last`); no test split is used. "
               if any(r["split"] == "val" for r in rows) else
               "Selection rule: each run's dev-split evaluation at the end of training (`trainer.select=last`); "
               "no test split is used. ")
            + "Metrics are percentages; ± is the sample std over seeds (a one-seed value is printed alone).\n\n"
            f"{markdown(rows)}\n\n"
            + (f"Per method, the primary dev metric of each task (seeds in brackets) and the average over the "
               f"tasks (only where a method has them all):\n\n{matrix}\n\n" if matrix else "")
            + (f"Paired on the seeds both methods have (A − B of the primary metric on the runs' split, GLUE dev: "
               f"mean ± sample std of the per-seed differences; the average over the tasks only where every task "
               f"has a pair):"
               f"\n\n{differences}\n\n" if differences else "")
            + (f"Both VTAB averages over the image tasks present:\n\n{vtab_averages(rows)}\n\n"
                                        if vtab_averages(rows) else "") + f"![{section}]({image})")
    write_section(DOCS / "results.md", f"results:{section}", body)
    print(body)


if __name__ == "__main__":
    try:
        main()
    except SelectuneError as err:  # a wrong --pair label, an unreadable folder: one line, nothing written
        sys.exit(f"results_table: {err}")
