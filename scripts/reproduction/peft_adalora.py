"""peft's AdaLoRA trained the way `selectune train` trains, for parity checks only (needs `peft`).

One copy of the reference side, shared by the step-for-step test (tests/test_adalora.py) and the dev-set
comparison (scripts/reproduction/adalora_parity.py, beside this file), so the two cannot drift apart. What
has to match selectune for a fair comparison lives here: the same batches (`train_batches`), AdamW with
weight decay on matrices only (none on λ and biases), linear warm-up then decay, gradient clipping, and
peft's orthogonality term, which peft adds only when the model has a task type (a `PeftModel` without one
calls the wrapped model directly and trains with no orthogonality term at all — the mistake this module
guards against).
"""

from __future__ import annotations

import torch

from selectune.tasks.batches import TextSplit, train_batches
from selectune.trainer import lr_multiplier, task_loss

# The six matrix types of a BERT layer: q, k, v, attention output, FFN in, FFN out.
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def build(model: torch.nn.Module, *, init_r: int, target_r: int, tinit: int, tfinal: int, delta_t: int,
          orth_weight: float, total_step: int, alpha: float, targets: list[str] = BERT_TARGETS) -> torch.nn.Module:
    """Wrap a sequence classifier in peft's AdaLoRA (β1 = β2 = 0.85, no dropout, head trained densely)."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                           beta1=0.85, beta2=0.85, orth_reg_weight=orth_weight, total_step=total_step,
                           target_modules=targets, lora_alpha=alpha, lora_dropout=0.0,
                           task_type="SEQ_CLS")  # without a task type peft skips its orthogonality term
    return get_peft_model(model, config)


def train(model: torch.nn.Module, split: TextSplit, *, steps: int, batch_size: int, seed: int, lr: float,
          weight_decay: float, warmup_ratio: float, max_grad_norm: float, regression: bool) -> list[int]:
    """Train `steps` steps on selectune's batches; returns peft's budget b(t) after every step.

    Stops with an error if the first loss is the bare task loss while an orthogonality weight is set:
    then peft is not running the configuration it is compared as."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = {n for n, p in params if p.ndim >= 2 and "lora_E" not in n}
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params if n in decayed], "weight_decay": weight_decay},
                                   {"params": [p for n, p in params if n not in decayed], "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, 0, steps, warmup_ratio))
    per_epoch = -(-len(split) // batch_size)
    allocator = model.base_model
    curve = []
    model.train()
    for step in range(1, steps + 1):
        epoch, offset = divmod(step - 1, per_epoch)
        batch = split.batch(train_batches(len(split), batch_size, seed, epoch)[offset])
        output = model(**batch)
        if step == 1 and allocator.peft_config["default"].orth_reg_weight > 0 and torch.isclose(
                output.loss, task_loss(output.logits, batch["labels"], regression)):
            raise RuntimeError("peft added no orthogonality term to the loss: not the configuration compared")
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
        optimizer.step()
        scheduler.step()
        allocator.update_and_allocate(step)
        curve.append(allocator.rankallocator.budget_schedule(step)[0])
        optimizer.zero_grad()
    return curve
