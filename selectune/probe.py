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
import math
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
# a gated MLP (Llama: gate_proj, up_proj = ffn-in, down_proj = ffn-out) adds the gate's column
GATED_COLUMNS = ["q", "k", "v", "o", "gate", "ffn-in", "ffn-out", "vectors"]


def grid_columns(names: list[str]) -> list[str]:
    """The heat map's columns for a model whose parameters are `names` (layers x roles)."""
    return GATED_COLUMNS if any(module_type(n) == "gate" for n in names) else GRID_COLUMNS

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    batches: int = 16
    scores: list[str] = field(default_factory=lambda: ["grad2"])
    budgets: list[float] = field(default_factory=lambda: [0.005])
    include_embeddings: bool = False


def run_probe(cfg: DictConfig, run_dir: Path, stage: Path | None = None, owned: bool = False) -> dict[str, Any]:
    """Probe into `run_dir`, owning it (the run lock) from before the first check to the end. Every refusal
    (a finished probe or a training run there, another process, a symbolic link) comes before anything is
    written; `stage` holds what Hydra logged meanwhile and moves in once the probe proceeds. On failure, what
    this call made goes (the folder, if it made it or Hydra made it for this job: `owned`)."""
    from selectune.commands import _remove_new

    created, before = False, None
    try:
        runfs.check_folder(run_dir)
        created = runfs.make_run_dir(run_dir) or owned
        runfs.lock_run_dir(run_dir)  # one writer at a time, a train included; released when this process ends
        before = set(os.listdir(run_dir))
        return _probe(cfg, run_dir, stage)
    except (SelectuneError, OSError, KeyboardInterrupt):
        if before is not None and not (run_dir / "summary.json").exists():
            _remove_new(run_dir, before, created)  # a half-written probe goes; what was there stays
        raise
    finally:
        runfs.unlock_run_dir(run_dir)


def check_probe_dir(run_dir: Path) -> None:
    """Refuse a folder a probe must not write into: a finished probe's, a training run's, one holding a link."""
    from selectune.commands import RUN_OUTPUTS

    if (run_dir / "summary.json").exists():
        raise SelectuneError(f"{run_dir} holds a finished probe (summary.json); choose another out_dir")
    trained = [name for name in ("results.json", *RUN_OUTPUTS, "config.yaml") if (run_dir / name).exists()]
    if trained:
        raise SelectuneError(f"{run_dir} holds a training run ({trained[0]}); choose another out_dir")
    runfs.check_no_links(run_dir)


def _probe(cfg: DictConfig, run_dir: Path, stage: Path | None) -> dict[str, Any]:
    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec, encode_splits, probe_batches
    from selectune.tasks import is_causal, load_task
    from selectune.trainer import resolve_device

    spec = RunSpec.from_config(cfg)
    options = typed(ProbeConfig, cfg.get("probe", {}), "probe")
    bad = [s for s in options.scores if s not in SCORES]
    if bad or not options.scores:
        raise SelectuneError(f"probe.scores={options.scores}: choose from {', '.join(SCORES)}")
    if options.batches <= 0 or not all(0 < b <= 1 for b in options.budgets) or not options.budgets:
        raise SelectuneError("probe.batches must be positive and probe.budgets fractions in (0, 1]")
    check_probe_dir(run_dir)
    task = load_task(spec.task)
    backbone = load_backbone(spec.model, task.spec.num_labels, task.spec.is_regression, None, spec.trainer.seed,
                             causal_lm=is_causal(task.spec))
    device = resolve_device(spec.trainer.device)
    model = backbone.model.to(device)
    train = encode_splits(task, backbone, ["train"])["train"]
    available = math.ceil(len(train) / spec.trainer.batch_size)
    if options.batches > available:  # the summary must say how many batches were really probed
        raise SelectuneError(f"probe.batches={options.batches} but the training data gives {available} batches of "
                             f"{spec.trainer.batch_size}; use probe.batches={available} or fewer")
    feed = probe_batches(task, train, backbone, spec.trainer.batch_size, spec.trainer.seed, device)
    names = candidates(model, backbone.head_names, options.include_embeddings)
    maps = probe(model, names, feed.batches(options.batches), feed.loss, tuple(options.scores))
    check_probe_dir(run_dir)  # still (the lock keeps selectune out; this is for anything else)
    if stage is not None:  # the probe proceeds: what Hydra logged moves in
        runfs.adopt_staging(stage, run_dir)
    runfs.write_hydra_record(run_dir, cfg)
    tmp = runfs.check_target(run_dir / "sensitivity.safetensors.tmp", run_dir)
    runfs.save_safetensors({f"{n}::{s}": t.cpu().contiguous() for s, per in maps.items() for n, t in per.items()},
                           tmp)
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
        columns = grid_columns(names)
        grid, outside = share_grid(summary["scores"][score], str(taus[0]), columns)
        title = (f"{task.name} · {score} · share of the top-{taus[0]:,} entries ({options.budgets[0]:.2%})\n"
                 f"outside the layers (pooler, final norms): {100 * outside:.1f}%")
        grid_heatmap([[100 * v for v in row] for row in grid], columns, run_dir / f"heatmap_{score}.png",
                     title, "% of the top-τ entries")
        print_grid(grid, title.replace("\n", "; "), columns)
        log.info("%s: %s", title.replace("\n", "; "), "; ".join(  # probe.log: the grid as a person reads it
            f"layer {i} " + " ".join(f"{c} {100 * v:.1f}%" for c, v in zip(columns, row, strict=True))
            for i, row in enumerate(grid)))
    runfs.write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n", run_dir)  # last: finished
    Console(stderr=True).print(f"wrote sensitivity.safetensors, summary.json, heatmap_*.png to {run_dir}")
    log.info("wrote sensitivity.safetensors, summary.json, heatmap_*.png to %s", run_dir)
    return summary


def share_grid(per_tensor: dict[str, Any], tau: str,
               columns: list[str] = GRID_COLUMNS) -> tuple[list[list[float]], float]:
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
    return [[cells.get((layer, kind), 0.0) for kind in columns] for layer in range(layers)], outside


def print_grid(grid: list[list[float]], title: str, columns: list[str] = GRID_COLUMNS) -> None:
    table = Table(*["layer", *columns], title=title)
    for i, row in enumerate(grid):
        table.add_row(str(i), *(f"{100 * v:.1f}%" for v in row))
    Console().print(table)
