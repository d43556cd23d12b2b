"""A causal-LM run's delta, exported, loads in plain transformers (and peft) with selectune's logits.

    SELECTUNE_DATA=../shared/data python scripts/analysis/causal_export_check.py <run dir> [--rows 8] [--peft]
        [--write docs/results.md]

Exports the run's delta with `selectune export` (merged, float32; with --peft also format=peft), reloads
it with `AutoModelForCausalLM.from_pretrained` (and `PeftModel.from_pretrained` on the base), and compares
the full next-token logits (every position, the whole vocabulary) on the first `--rows` dev rows with
the base carrying the delta through `selectune.load_delta(...).apply` (which merges low-rank factors into the
weights, as the merged export does; peft computes them beside the weights, so its logits differ by float32
rounding accumulated over the layers). Prints one JSON line; --write adds it as a row of the
`results:causal_export_check` section (one row per method, replaced when re-run).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
from docsection import write_section

SECTION = "results:causal_export_check"
HEADER = ["Export check on the decoder: full logits (every position, whole vocabulary) of the first dev rows,",
          "the base + delta in memory vs the exported folder in plain transformers / peft",
          "(`python scripts/analysis/causal_export_check.py <run> [--peft] --write docs/results.md`).", "",
          "| method | model | rows | tokens | delta moves logits by | max abs logit | merged (AutoModelForCausalLM) "
          "| tied after load | peft (PeftModel) | peft merged by peft |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--peft", action="store_true")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    import selectune
    from selectune.commands import RunSpec, build
    from selectune.tasks import load_task

    delta = selectune.load_delta(args.run)
    spec = RunSpec.from_config(OmegaConf.create(delta.meta["config"]))
    spec.task.max_train_examples, spec.task.max_eval_examples = 1, args.rows
    task = load_task(spec.task)
    backbone, _ = build(spec, task)
    model = backbone.model.eval()
    batch = task.encode(task.eval_splits[0], backbone).batch(list(range(args.rows)))
    batch.pop("labels")
    batch.pop("logits_to_keep")  # every position, not only those training and scoring read
    report: dict = {"run": str(args.run), "method": delta.meta["method"], "model": backbone.name, "rows": args.rows,
                    "tokens": int(batch["attention_mask"].sum())}
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        bare = model(**batch).logits[mask]
        delta.apply(model)
        ours = model(**batch).logits[mask]
        report["delta_moves_logits_by"] = float((ours - bare).abs().max())
        report["max_abs_logit"] = float(ours.abs().max())  # the scale the differences below compare with
        out = Path(tmp) / "merged"
        subprocess.run([sys.executable, "-m", "selectune", "export", f"run={args.run}", f"out={out}"], check=True,
                       capture_output=True)
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        report["merged_max_abs_diff"] = float((merged(**batch).logits[mask] - ours).abs().max())
        report["merged_tied"] = merged.lm_head.weight is merged.model.embed_tokens.weight
        del merged
        if args.peft:
            from peft import PeftModel

            delta.remove(model)
            out = Path(tmp) / "peft"
            subprocess.run([sys.executable, "-m", "selectune", "export", f"run={args.run}", f"out={out}",
                            "format=peft"], check=True, capture_output=True)
            peft_model = PeftModel.from_pretrained(model, out).eval()
            report["peft_max_abs_diff"] = float((peft_model(**batch).logits[mask] - ours).abs().max())
            merged_peft = peft_model.merge_and_unload()  # peft's own merge: are its factors the delta's?
            report["peft_merged_max_abs_diff"] = float((merged_peft(**batch).logits[mask] - ours).abs().max())
    print(json.dumps(report), flush=True)
    if args.write is not None:
        write(args.write, report)


def write(path: Path, r: dict) -> None:
    """This run's row in the section, replacing an earlier row of the same method."""
    text = path.read_text() if path.exists() else ""
    found = re.search(rf"<!-- {SECTION} -->\n(.*?)\n<!-- /{SECTION} -->", text, re.S)
    rows = [line for line in (found.group(1).splitlines() if found else [])
            if line.startswith("| ") and not line.startswith(("| method", f"| {r['method']} |"))]
    columns = HEADER[-2].count("|") - 1
    rows = [row + " - |" * (columns - (row.count("|") - 1)) for row in rows]  # a row from before a column was added
    peft = f"{r['peft_max_abs_diff']:.2e}" if "peft_max_abs_diff" in r else "-"
    peft_merged = f"{r['peft_merged_max_abs_diff']:.2e}" if "peft_merged_max_abs_diff" in r else "-"
    rows.append(f"| {r['method']} | {r['model']} | {r['rows']} | {r['tokens']} | {r['delta_moves_logits_by']:.3f} "
                f"| {r['max_abs_logit']:.1f} | {r['merged_max_abs_diff']:.2e} | {r['merged_tied']} | {peft} "
                f"| {peft_merged} |")
    write_section(path, SECTION, "\n".join(HEADER + sorted(rows)))


if __name__ == "__main__":
    main()
