"""One AdamW step over MiniLM-sized parameters (22.7M, random gradients): fused vs foreach vs the loop.

    python scripts/bench/bench_adamw.py [--rounds 3] [--steps 5]

Why the trainer asks for `fused=True` on CPU too (selectune.trainer.adamw). Modes alternate within each
round to spread the machine's noise; the table gives ms per step for each round.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

MODES = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)  # all-MiniLM-L6-v2's shapes
    params = list(BertForSequenceClassification(config).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, options in MODES.items():
            optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
            optimizer.step()  # state allocated outside the timing
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times[mode].append((time.perf_counter() - start) / args.steps * 1000)
    print(f"AdamW step, {sum(p.numel() for p in params):,} parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, ms per step per round:")
    for mode, values in times.items():
        print(f"  {mode:8s} " + "  ".join(f"{v:7.1f}" for v in values))


if __name__ == "__main__":
    main()
