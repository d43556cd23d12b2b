"""`selectune export`: merge a TaskDelta into its base model and save a plain Hugging Face model.

Merging is done in fp32 (W0 + Δ), then the model is cast to the asked dtype and saved with its
tokenizer, so `AutoModelForSequenceClassification.from_pretrained(out)` works without selectune.
A delta only fits the base weights it was trained on: a base whose hash differs is refused unless
`force=true`. Casting can swallow small updates: the report counts the changed entries whose merged
value equals the base value once both are in the target dtype (|Δ| below the dtype's resolution at
that weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from selectune import runfs
from selectune.errors import SelectuneError
from selectune.peft_export import export_peft, peft_kind
from selectune.tasks.glue import GlueSpec, label_names

FORMATS = ("merged", "peft")  # peft: a LoRA / AdaLoRA adapter folder (selectune.peft_export)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lost_in_cast(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    """(changed entries, of which lost once cast to `dtype`) between two fp32 tensors."""
    changed = after != before
    if dtype == torch.float32:
        return int(changed.sum()), 0
    lost = changed & (after.to(dtype) == before.to(dtype))
    return int(changed.sum()), int(lost.sum())


def _write_model(target: Path, backbone: Any, adapters: dict[str, torch.Tensor], card: str = "") -> None:
    """The merged model, its preprocessor, card and adapters, published as one folder (runfs.publish_dir)."""
    from selectune.backbone import save_preprocessor

    def write(folder: Path) -> None:
        backbone.model.save_pretrained(folder)
        save_preprocessor(backbone, folder)
        if card:
            (folder / "README.md").write_text(card)
        if adapters:  # not linear in x: cannot become weights; shipped beside the merged model as modules
            runfs.save_safetensors(adapters, folder / "adapters.safetensors", {"format": "selectune.adapters/1"})

    runfs.publish_dir(target, write)


def model_card(run: str, meta: dict[str, Any], labels: Any, dtype: str) -> str:
    """README.md of an exported model: what it is, what it scored (the run's results.json when beside the
    delta), how it was trained and how to load it, so the folder explains itself without selectune."""
    import json

    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    lines = [f"# {meta.get('task')} · {meta.get('method')} on {meta.get('base_model')}", "",
             f"A plain transformers sequence-classification model: the {meta.get('method')} task delta of selectune "
             f"run `{folder}` merged into its base model `{meta.get('base_model')}` (base weights hash "
             f"{meta.get('base_hash')}), saved in {dtype}.", "",
             "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
             "model = AutoModelForSequenceClassification.from_pretrained(\"<this folder>\")",
             "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")", "```", ""]
    if labels:
        lines += ["Labels (id: name): " + ", ".join(f"{i}: {name}" for i, name in enumerate(labels)), ""]
    else:
        lines += ["Regression: one output, the predicted score.", ""]
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict) and isinstance(results.get("metrics"), dict):
        lines += ["| split | metric | value |", "|---|---|---|"]
        lines += [f"| {split} | {name} | {'n/a' if value is None else f'{value:.2f}'} |"
                  for split, values in results["metrics"].items() if isinstance(values, dict)
                  for name, value in values.items() if value is None or isinstance(value, (int, float))]
        lines += ["", f"Chosen by `trainer.select={results.get('selection')}` at step {results.get('selected_step')} "
                      f"of {results.get('steps')}.", ""]
    budget = meta.get("budget") or {}
    trainer = (meta.get("config") or {}).get("trainer") or {}
    lines += ["Training: " + ", ".join(f"{k} {trainer[k]}" for k in ("epochs", "max_steps", "batch_size", "lr", "seed")
                                      if trainer.get(k) is not None)
              + (f"; stored {budget['stored']:,} numbers" if isinstance(budget.get("stored"), int) else "")
              + f"; selectune {meta.get('selectune_version')}.", ""]
    return "\n".join(lines)


def export(run: str, out: str, dtype: str = "float32", force: bool = False, fmt: str = "merged") -> dict[str, Any]:
    from selectune.backbone import load_backbone
    from selectune.delta.taskdelta import TaskDelta
    from selectune.runspec import RunSpec
    from selectune.tasks import is_causal, task_spec

    if dtype not in DTYPES:
        raise SelectuneError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise SelectuneError(f"format={fmt}: use one of {', '.join(FORMATS)}")
    target = Path(out)
    runfs.check_folder(target, "out")
    if target.is_symlink():
        raise SelectuneError(f"out={target} is a symbolic link; name the real folder")
    if target.exists() and any(target.iterdir()):
        raise SelectuneError(f"out={target} exists and is not empty; choose another folder")
    delta = TaskDelta.load(run)
    unmerged = delta.unmerged()  # each form says whether it merges and, if not, whether it ships beside the model
    stranded = {name: type(form).__name__ for name, form in unmerged.items() if not form.ships_beside}
    if stranded:
        raise SelectuneError(f"cannot export {run}: {len(stranded)} weights hold "
                             f"{', '.join(sorted(set(stranded.values())))} entries, a "
                             f"form that cannot be merged into weights (`selectune eval run={run}` applies it)")
    if fmt == "peft":
        peft_kind(delta)  # refuse a sparse / SPT delta before loading the model
    spec = RunSpec.from_config(OmegaConf.create(delta.meta["config"]))
    task = task_spec(spec.task)
    names = label_names(task) if isinstance(task, GlueSpec) else task.labels  # id2label: names, not "0"/"1"
    backbone = load_backbone(spec.model, task.num_labels, task.is_regression, names, spec.trainer.seed,
                             causal_lm=is_causal(task))
    found = backbone.base_hash()
    if found != delta.meta["base_hash"] and not force:
        raise SelectuneError(f"base model '{backbone.name}' has weights hash {found}, but the delta was trained on "
                             f"{delta.meta['base_hash']}; pass force=true to merge anyway")
    if fmt == "peft":
        return export_peft(delta, backbone, target, DTYPES[dtype])
    model = backbone.model
    touched = set(delta.by_parameter()) - backbone.head_names
    before = {n: model.get_parameter(n).detach().clone() for n in touched}
    delta.merge_into(model, allow_unmerged=True)
    changed = lost = 0
    for name in touched:
        c, n_lost = lost_in_cast(before[name], model.get_parameter(name).detach(), DTYPES[dtype])
        changed, lost = changed + c, lost + n_lost
    model.to(DTYPES[dtype])
    overflow = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if overflow is not None:  # the merged weights must hold numbers: W0 + Δ beyond the dtype's range is inf
        raise SelectuneError(f"merging gives non-finite values in '{overflow}' in {dtype} (beyond its range); "
                             f"export in float32 or check the delta")
    adapters = list(unmerged)
    groups = delta.by_parameter()
    kept = {f"{name}::{kind}": groups[name][kind].to(DTYPES[dtype]).contiguous()
            for name, form in unmerged.items() for kind in form.kinds}
    _write_model(target, backbone, kept, model_card(run, delta.meta, names, dtype))
    if adapters:
        names = ", ".join(sorted({type(form).__name__ for form in unmerged.values()}))
        print(f"{len(adapters)} {names} modules cannot be merged into weights: they are in "
              f"{target}/adapters.safetensors (the merged model alone lacks them; `selectune eval run={run}` "
              f"applies them)")
    report = {"out": str(target), "dtype": dtype, "base_model": backbone.name, "method": delta.meta["method"],
              "adapters": len(adapters),
              "changed_entries": changed, "lost_in_dtype": lost, "base_hash_matched": found == delta.meta["base_hash"]}
    share = f" ({100 * lost / changed:.2f}%)" if changed else ""
    print(f"exported {delta.meta['method']} delta on {backbone.name} to {target} in {dtype}: "
          f"{changed:,} changed base entries, {lost:,}{share} below {dtype}'s resolution at their weight")
    return report
