"""AdaLoRA parity: selectune's AdaLoRA vs the maintained `peft` implementation, same configuration.

    pip install -c constraints.txt -e ".[dev]"   # peft is a test-only dependency (dev extra)
    SELECTUNE_DATA=../shared/data python scripts/reproduction/adalora_parity.py --tasks mrpc rte --seeds 1 2 3 \\
        [--max-steps N] [--out runs/parity] [--kept-only] [--write docs/results.md]

With `--out`, each (task, seed, implementation) result is kept there and not recomputed, so seeds can
run in separate processes (one per core) and a last call with every seed only builds the table.

Both runs use the same data order, model (offline MiniLM), head init, AdamW with linear warm-up and
decay (weight decay on matrices only, as selectune: none on λ and biases), targets (six matrix
types), initial rank, b(T), t_init / t_final / ΔT, β1 = β2 = 0.85 and the orthogonality term in
peft's form (`method.orth_form=reference`: γ × mean of unsquared Frobenius norms). peft adds that
term only inside AdaLoraModel.forward, which a PeftModel without a task type bypasses: the peft
model here is made with task_type="SEQ_CLS", and the script stops if the first loss carries no
orthogonality term. peft's schedule is read from its RankAllocator at every step; selectune's
from metrics.jsonl.
Reported: dev primary metric per seed (mean ± std) and the largest difference between the two budget
curves (peft counts its warm-up with `step <= tinit` and its final phase with `step > T - tfinal`,
selectune with `<` and `>=`, so the curves may differ by one step at the two boundaries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

NO_TASK_TYPE = "peft without a task type (no orthogonality term)"


def selectune_run(task: str, seed: int, args, out: Path) -> tuple[float, list[int]]:
    cmd = [sys.executable, "-m", "selectune", "train", f"recipe=glue/{task}_adalora", f"trainer.seed={seed}",
           f"method.target_total={args.target_rank * 36}", f"method.init_ratio={args.init_rank / args.target_rank}",
           f"method.t_init={args.t_init}", f"method.t_final={args.t_final}", f"method.delta_t={args.delta_t}",
           "method.orth_form=reference", f"method.orth_weight={args.orth}", f"method.lora_alpha={args.alpha}",
           f"trainer.lr={args.lr}", f"out_dir={out}", "trainer.log_every=1", "trainer.progress=false"]
    if args.max_steps:
        cmd.append(f"trainer.max_steps={args.max_steps}")
    subprocess.run(cmd, check=True)
    result = json.loads((out / "results.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["adalora_budget"] for r in records if "adalora_budget" in r]
    metric = result["metrics"]["dev"]
    from selectune.tasks.glue import GLUE

    return metric[GLUE[task].primary], curve


def peft_run(task: str, seed: int, args) -> tuple[float, list[int]]:
    import peft_adalora  # beside this script

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec, encode_splits
    from selectune.config import compose
    from selectune.evaluation import evaluate
    from selectune.tasks import load_task

    overrides = [f"recipe=glue/{task}_adalora", f"trainer.seed={seed}", f"trainer.lr={args.lr}"]
    if args.max_steps:
        overrides.append(f"trainer.max_steps={args.max_steps}")
    spec = RunSpec.from_config(compose("train", overrides))
    torch.manual_seed(seed)
    task_obj = load_task(spec.task)
    backbone = load_backbone(spec.model, task_obj.spec.num_labels, task_obj.spec.is_regression, None, seed)
    splits = encode_splits(task_obj, backbone, list(task_obj.splits))
    steps_per_epoch = -(-len(splits["train"]) // spec.trainer.batch_size)
    total = spec.trainer.max_steps or int(spec.trainer.epochs * steps_per_epoch)
    fraction = lambda v: int(round(v * total)) if 0 < v < 1 else int(v)  # noqa: E731
    model = peft_adalora.build(backbone.model, init_r=args.init_rank, target_r=args.target_rank,
                               tinit=fraction(args.t_init), tfinal=fraction(args.t_final), delta_t=args.delta_t,
                               orth_weight=args.orth, total_step=total, alpha=args.alpha)
    curve = peft_adalora.train(model, splits["train"], steps=total, batch_size=spec.trainer.batch_size, seed=seed,
                               lr=args.lr, weight_decay=spec.trainer.weight_decay,
                               warmup_ratio=spec.trainer.warmup_ratio,
                               max_grad_norm=spec.trainer.max_grad_norm, regression=task_obj.spec.is_regression)
    metrics, _ = evaluate(model, task_obj, {"dev": splits["dev"]}, 128, torch.device("cpu"))
    return metrics["dev"][task_obj.spec.primary], curve


def kept(path: Path, run) -> tuple[float, list[int]]:
    """A result stored at `path` (score and budget curve), computed by `run` only when absent."""
    if not path.exists():
        score, curve = run()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"score": score, "curve": curve}))
    record = json.loads(path.read_text())
    return record["score"], record["curve"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "rte"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--init-rank", type=int, default=6)
    parser.add_argument("--target-rank", type=int, default=4)
    parser.add_argument("--t-init", type=float, default=0.1)
    parser.add_argument("--t-final", type=float, default=0.2)
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--orth", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="keep each result here (default: a temporary folder)")
    parser.add_argument("--kept-only", action="store_true",
                        help="build the table from the results already kept in --out; run nothing")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    rows = ["| task | implementation | seeds | dev primary metric (mean ± std) | per seed | max budget-curve gap |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for task in args.tasks:
            runs: dict[str, list[float]] = {"selectune": [], "peft": [], NO_TASK_TYPE: []}
            seeds, gaps = [], []
            for seed in args.seeds:
                folder = root / f"{task}_s{seed}"
                if args.kept_only and not all((folder / f).exists() for f in ("selectune.json", "peft.json")):
                    continue
                score, curve = kept(folder / "selectune.json", partial(selectune_run, task, seed, args,
                                                                       folder / "selectune"))
                peft_score, peft_curve = kept(folder / "peft.json", partial(peft_run, task, seed, args))
                seeds.append(seed)
                runs["selectune"].append(score)
                runs["peft"].append(peft_score)
                gaps.append(max(abs(a - b) for a, b in zip(curve, peft_curve, strict=True)))
                if (folder / "peft_without_task_type.json").exists():  # kept from an earlier, flawed comparison
                    runs[NO_TASK_TYPE].append(json.loads((folder / "peft_without_task_type.json").read_text())["score"])
            for name, scores in runs.items():
                if not scores:
                    continue
                std = statistics.stdev(scores) if len(scores) > 1 else 0.0
                rows.append(f"| {task} | {name} | {','.join(map(str, seeds))} | {statistics.mean(scores):.2f} ± "
                            f"{std:.2f} | {' / '.join(f'{x:.2f}' for x in scores)} | {max(gaps)} |")
    body = ("### AdaLoRA parity with peft\n\n"
            "`SELECTUNE_DATA=../shared/data python scripts/reproduction/adalora_parity.py "
            + " ".join(sys.argv[1:]) + "`\n\n" + "\n".join(rows))
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
        from docsection import write_section

        write_section(args.write, "results:adalora_parity", body)


if __name__ == "__main__":
    main()
