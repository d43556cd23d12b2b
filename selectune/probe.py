"""`selectune probe`: sensitivity maps of a recipe's model on its task, no training.

Writes to the run directory:
    sensitivity.safetensors   per-parameter scores, keys `<parameter>::<score>` (fp32)
    summary.json              per tensor: size, mean / max score, and for each budget τ its count and
                              share in the global top-τ set (exact, stable ties)
    heatmap_<score>.png       layers × (q, k, v, o, ffn-in, ffn-out, vectors); colour = the share of the
                              top-τ entries that fall in that matrix, or in the layer's biases and
                              LayerNorms (first budget); the title gives the share outside the layers
                              (pooler, final norms), which grad² often ranks high
and prints the same grid as a table.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from selectune import runfs
from selectune.config import typed
from selectune.errors import SelectuneError
from selectune.plots import grid_heatmap
from selectune.sensitivity import SCORES, TYPE_ORDER, Ranking, candidates, layer_index, module_type, probe

GRID_COLUMNS = [*TYPE_ORDER, "vectors"]

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    batches: int = 16
    scores: list[str] = field(default_factory=lambda: ["grad2"])
    budgets: list[float] = field(default_factory=lambda: [0.005])
    include_embeddings: bool = False


def run_probe(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec, encode_splits, probe_batches
    from selectune.tasks import load_task
    from selectune.trainer import resolve_device

    spec = RunSpec.from_config(cfg)
    options = typed(ProbeConfig, cfg.get("probe", {}), "probe")
    bad = [s for s in options.scores if s not in SCORES]
    if bad or not options.scores:
        raise SelectuneError(f"probe.scores={options.scores}: choose from {', '.join(SCORES)}")
    if options.batches <= 0 or not all(0 < b <= 1 for b in options.budgets) or not options.budgets:
        raise SelectuneError("probe.batches must be positive and probe.budgets fractions in (0, 1]")
    task = load_task(spec.task)
    backbone = load_backbone(spec.model, task.spec.num_labels, task.spec.is_regression, None, spec.trainer.seed)
    device = resolve_device(spec.trainer.device)
    model = backbone.model.to(device)
    train = encode_splits(task, backbone, ["train"])["train"]
    feed = probe_batches(task, train, backbone, spec.trainer.batch_size, spec.trainer.seed, device)
    names = candidates(model, backbone.head_names, options.include_embeddings)
    maps = probe(model, names, feed.batches(options.batches), feed.loss, tuple(options.scores))
    runfs.make_dir(run_dir)
    runfs.lock_run_dir(run_dir)  # one probe writes a folder at a time; released when this process ends
    runfs.check_no_links(run_dir)
    tmp = runfs.check_target(run_dir / "sensitivity.safetensors.tmp", run_dir)
    save_file({f"{n}::{s}": t.cpu().contiguous() for s, per in maps.items() for n, t in per.items()}, str(tmp))
    os.replace(tmp, run_dir / "sensitivity.safetensors")  # whole or absent, never half-written
    total = sum(model.get_parameter(n).numel() for n in names)
    taus = [max(1, round(b * backbone.num_base_parameters)) for b in options.budgets]
    summary: dict[str, Any] = {"task": task.name, "model": backbone.name, "batches": options.batches,
                               "batch_size": spec.trainer.batch_size, "seed": spec.trainer.seed,
                               "candidates": total, "budgets": dict(zip(options.budgets, taus, strict=True)),
                               "scores": {}}
    for score, per in maps.items():
        ranking = Ranking(per)
        counts = {tau: ranking.counts(min(tau, total)) for tau in taus}
        summary["scores"][score] = {
            name: {"numel": t.numel(), "mean": float(t.mean()), "max": float(t.max()),
                   "top": {str(tau): {"count": counts[tau][name], "share": counts[tau][name] / min(tau, total)}
                           for tau in taus}}
            for name, t in per.items()}
        grid, outside = share_grid(summary["scores"][score], str(taus[0]))
        title = (f"{task.name} · {score} · share of the top-{taus[0]:,} entries ({options.budgets[0]:.2%})\n"
                 f"outside the layers (pooler, final norms): {100 * outside:.1f}%")
        grid_heatmap([[100 * v for v in row] for row in grid], GRID_COLUMNS, run_dir / f"heatmap_{score}.png",
                     title, "% of the top-τ entries")
        print_grid(grid, title.replace("\n", "; "))
        log.info("%s: %s", title.replace("\n", "; "), "; ".join(  # probe.log: the grid as a person reads it
            f"layer {i} " + " ".join(f"{c} {100 * v:.1f}%" for c, v in zip(GRID_COLUMNS, row, strict=True))
            for i, row in enumerate(grid)))
    runfs.write_text(run_dir / "summary.json.tmp", json.dumps(summary, indent=1) + "\n", run_dir)
    os.replace(run_dir / "summary.json.tmp", run_dir / "summary.json")  # last: marks the probe finished
    runfs.unlock_run_dir(run_dir)
    Console(stderr=True).print(f"wrote sensitivity.safetensors, summary.json, heatmap_*.png to {run_dir}")
    log.info("wrote sensitivity.safetensors, summary.json, heatmap_*.png to %s", run_dir)
    return summary


def share_grid(per_tensor: dict[str, Any], tau: str) -> tuple[list[list[float]], float]:
    """rows = layers, columns = GRID_COLUMNS: the share of the top-τ entries in each weight matrix and in
    each layer's vectors (biases, LayerNorms); and the share outside every layer, so nothing is hidden."""
    cells: dict[tuple[int, str], float] = {}
    outside = 0.0
    for name, info in per_tensor.items():
        share = info["top"][tau]["share"]
        layer, kind = layer_index(name), module_type(name)
        if layer is None:
            outside += share
            continue
        column = kind if kind is not None and name.endswith(".weight") else "vectors"  # norms match no kind
        cells[(layer, column)] = cells.get((layer, column), 0.0) + share
    layers = 1 + max((layer for layer, _ in cells), default=-1)
    return [[cells.get((layer, kind), 0.0) for kind in GRID_COLUMNS] for layer in range(layers)], outside


def print_grid(grid: list[list[float]], title: str) -> None:
    table = Table(*["layer", *GRID_COLUMNS], title=title)
    for i, row in enumerate(grid):
        table.add_row(str(i), *(f"{100 * v:.1f}%" for v in row))
    Console().print(table)
