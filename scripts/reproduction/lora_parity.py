"""LoRA parity: selectune's `glue/<task>_lora` recipe vs peft + transformers' Trainer at the same settings.

    pip install -c constraints.txt -e ".[dev]"   # peft (and the accelerate it pulls) are test-only extras
    SELECTUNE_DATA=../shared/data OMP_NUM_THREADS=1 python scripts/reproduction/lora_parity.py --task rte \\
        --seeds 42 43 44 \\
        --out runs/lora_parity [--only selectune|peft] [--max-steps N] [--set KEY=VALUE ...] [--write docs/results.md]

The peer is written the way a peft user writes it, not with selectune's loop: `LoraConfig(r, lora_alpha,
target_modules=["query", "value"], lora_dropout, task_type="SEQ_CLS", modules_to_save=<the pretrained modules
the recipe trains with the head, e.g. BERT's pooler>)` (peft trains the new classifier as a module to save too)
and `transformers.Trainer` with AdamW, a linear schedule with the recipe's warm-up ratio, weight decay,
grad-norm clipping, batch size, epochs and learning rate; the recipe's precision (`bf16=True` where selectune
resolves auto to bf16), `group_by_length`, and with `task.validation` + `trainer.select=best` an evaluation
on the carved `val` split each epoch and `load_best_model_at_end`, all read from the composed recipe, so a
recipe change moves both. The data are selectune's own split and
tokenisation (same rows, same truncation), padded per batch; the data order and head initialisation
come from each implementation's own seeding, so parity means "within the seed spread", not bit equality.
With `--out`, each (seed, implementation) score is kept and not recomputed: seeds can run as separate
processes (two at a time on two cores) and a last call builds the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def selectune_score(task: str, seed: int, extra: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "selectune", "train", f"recipe=glue/{task}_lora", f"trainer.seed={seed}",
           f"out_dir={out}", "trainer.progress=false", *extra]
    subprocess.run(cmd, check=True)
    from selectune.tasks.glue import GLUE

    return json.loads((out / "results.json").read_text())["metrics"]["dev"][GLUE[task].primary]


def peft_score(task: str, seed: int, extra: list[str], out: Path) -> float:
    """The recipe's settings, trained by peft + transformers.Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from selectune.backbone import load_backbone
    from selectune.commands import RunSpec, encode_splits
    from selectune.config import compose
    from selectune.evaluation import evaluate
    from selectune.tasks import load_task
    from selectune.trainer import resolve_precision

    spec = RunSpec.from_config(compose("train", [f"recipe=glue/{task}_lora", f"trainer.seed={seed}", *extra]))
    method, trainer = spec.method, spec.trainer
    task_obj = load_task(spec.task)
    backbone = load_backbone(spec.model, task_obj.spec.num_labels, task_obj.spec.is_regression, None, seed)
    splits = encode_splits(task_obj, backbone, list(task_obj.splits))
    targets = [t for t in method.targets if any(n.endswith(f".{t}") for n, _ in backbone.model.named_modules())]
    model = get_peft_model(backbone.model, LoraConfig(
        r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=targets, task_type="SEQ_CLS",
        modules_to_save=[m.rpartition(".")[2] for m in spec.model.train_with_head] or None))
    train_split = splits["train"]
    steps = trainer.max_steps or math.ceil(trainer.epochs * math.ceil(len(train_split) / trainer.batch_size))
    every = trainer.eval_every or math.ceil(len(train_split) / trainer.batch_size)  # default: each epoch
    choose = trainer.select == "best" and "val" in splits

    class Rows(torch.utils.data.Dataset):  # row ids, with the tokens group_by_length measures
        def __init__(self, split) -> None:
            self.split = split

        def __len__(self) -> int:
            return len(self.split)

        def __getitem__(self, i: int) -> dict:
            return {"row": i, "input_ids": self.split.input_ids[i]}

    def collate(split):
        return lambda items: split.batch([item["row"] for item in items])

    class Peer(Trainer):  # train and val batches come from their own split's rows
        def get_eval_dataloader(self, eval_dataset=None):
            self.data_collator = collate(splits["val"])
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = collate(train_split)

    primary = task_obj.spec.primary
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=trainer.batch_size, per_device_eval_batch_size=
        trainer.eval_batch_size, learning_rate=trainer.lr, max_steps=steps, weight_decay=trainer.weight_decay,
        warmup_steps=int(trainer.warmup_ratio * steps), lr_scheduler_type="linear", max_grad_norm=trainer.max_grad_norm,
        seed=seed, data_seed=seed, report_to=[], logging_strategy="no", use_cpu=True,
        bf16=resolve_precision(trainer.precision, torch.device("cpu")) == "bf16",
        train_sampling_strategy="group_by_length" if trainer.group_by_length else "random",
        remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, save_strategy="steps" if choose else "no", eval_strategy="steps" if choose else "no",
        eval_steps=every, save_steps=every, save_total_limit=1 if choose else None,
        load_best_model_at_end=choose, metric_for_best_model=primary if choose else None, greater_is_better=True)

    def compute_metrics(prediction) -> dict:
        return task_obj.score(prediction.predictions, prediction.label_ids)

    peer = Peer(model=model, args=args, train_dataset=Rows(train_split), data_collator=collate(train_split),
                eval_dataset=Rows(splits["val"]) if choose else None,
                compute_metrics=compute_metrics if choose else None)
    peer.train()
    metrics, _ = evaluate(model, task_obj, {"dev": splits["dev"]}, trainer.eval_batch_size, torch.device("cpu"))
    return metrics["dev"][primary]


def kept(path: Path, compute) -> float:
    """The score stored at `path`, computed (and stored) only when absent."""
    if not path.exists():
        score = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"score": score}))
    return json.loads(path.read_text())["score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--only", choices=["selectune", "peft"], default=None, help="run one implementation")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for both sides, e.g. a sweep's chosen values before they are written")
    parser.add_argument("--out", type=Path, default=None, help="keep each result here (default: a temporary folder)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    extra = [*args.set, *([f"trainer.max_steps={args.max_steps}"] if args.max_steps else [])]
    runners = {"selectune": selectune_score, "peft": peft_score}
    names = [args.only] if args.only else list(runners)
    scores: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for seed in args.seeds:
            for name in names:
                folder = root / f"{args.task}_s{seed}"
                scores[name].append(kept(folder / f"{name}.json",
                                         lambda n=name, s=seed, f=folder: runners[n](args.task, s, extra, f / n)))
    rows = ["| implementation | seeds | dev primary metric (mean ± std) | per seed |", "|---|---|---|---|"]
    for name, values in scores.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(f"| {name} | {','.join(map(str, args.seeds))} | {statistics.mean(values):.2f} ± {std:.2f} | "
                    f"{' / '.join(f'{v:.2f}' for v in values)} |")
    if len(names) == 2:
        diffs = [a - b for a, b in zip(scores["selectune"], scores["peft"], strict=True)]
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        rows.append(f"| selectune − peft (paired) | | {statistics.mean(diffs):+.2f} ± {std:.2f} | "
                    f"{' / '.join(f'{d:+.2f}' for d in diffs)} |")
    body = (f"### LoRA parity with peft + transformers' Trainer ({args.task})\n\n"
            "`SELECTUNE_DATA=../shared/data python scripts/reproduction/lora_parity.py "
            + " ".join(sys.argv[1:]) + "`\n\n"
            + "\n".join(rows))
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for docsection
        from docsection import write_section

        write_section(args.write, "results:lora_parity", body)


if __name__ == "__main__":
    main()
