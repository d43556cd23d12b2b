"""Cached features for the linear probe (`method=linear method.cached=true`).

A probe freezes everything below its head, so the frozen part computes the same features for a row in
every epoch. Cached, the frozen backbone runs once over each split (eval mode: no dropout), the input of
the first head module is stored per row, and the loop then trains a `HeadModel` on those features: the
head's own modules (the same objects, under the same names as in the full model), so the optimiser,
the checkpoint and the stored delta cannot tell the difference, and eval/export/TaskSwitcher apply the
delta to the full model as for the uncached probe.

The one difference from the uncached probe is dropout inside the frozen encoder (off here, on in the
uncached probe's training forward); dropout inside the head (BERT's before its classifier) still applies.
Where the first head module reads only the first position of a sequence (BERT's pooler, RoBERTa's
classification head) only that position is stored, as a length-1 sequence: rows × 1 × hidden, not
rows × tokens × hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from selectune.backbone import Backbone
from selectune.errors import SelectuneError
from selectune.tasks.batches import EncodedSplit, eval_batches

# What each architecture's forward applies after its encoder, in order: (module, reads only position 0
# of a sequence). The cached head is the tail of this list after the last module with frozen parameters.
HEADS: dict[str, tuple[tuple[str, bool], ...]] = {
    "BertForSequenceClassification": (("bert.pooler", True), ("dropout", False), ("classifier", False)),
    "RobertaForSequenceClassification": (("classifier", True),),
    "ViTForImageClassification": (("classifier", False),),
    "Dinov2ForImageClassification": (("classifier", False),),  # its input: [CLS] ‖ mean patch token
}


@dataclass(frozen=True)
class HeadPlan:
    """The head modules the cached probe runs on stored features, and what to store."""

    modules: tuple[str, ...]  # module paths, in the order the full model applies them
    first_token: bool  # the first module reads position 0 of a sequence: store only that position


def head_plan(backbone: Backbone) -> HeadPlan:
    """The cached head of `backbone`'s model, or a one-line refusal: an architecture whose head this table
    does not know, or a head (model.train_with_head) that reaches into the encoder, where the stored
    features would have to be every token of a layer that still trains."""
    model = backbone.model
    kind = type(model).__name__
    if kind not in HEADS:
        raise SelectuneError(f"method.cached=true: no cached head for {kind} (known: {', '.join(HEADS)}); "
                             f"use method.cached=false")
    chain = HEADS[kind]
    frozen = backbone.base_names
    start = 0
    for i, (path, _) in enumerate(chain):
        if any(n.startswith(path + ".") for n in frozen):
            start = i + 1
    modules = tuple(path for path, _ in chain[start:])
    outside = sorted(n for n in backbone.head_names if not n.startswith(tuple(m + "." for m in modules)))
    if not modules or outside:
        raise SelectuneError(f"method.cached=true: '{outside[0] if outside else kind}' trains with the head but "
                             f"lies below the cached features (input of {chain[-1][0]}); use method.cached=false")
    return HeadPlan(modules, chain[start][1])


class HeadModel(nn.Module):
    """The head modules of a full model (shared, not copied) at their own paths, so `named_parameters()`
    gives the full model's names; `forward(features)` applies them in order and returns `.logits`."""

    def __init__(self, model: nn.Module, plan: HeadPlan) -> None:
        super().__init__()
        self.paths = plan.modules
        for path in plan.modules:
            parent: nn.Module = self
            *outer, leaf = path.split(".")
            for part in outer:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, model.get_submodule(path))

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        x = features
        for path in self.paths:
            x = self.get_submodule(path)(x)
        return SequenceClassifierOutput(logits=x)


@dataclass
class FeatureSplit:
    """Stored features of a split, row by row, with its labels: batches are `{"features", "labels"}`."""

    features: torch.Tensor  # rows × hidden, or rows × 1 × hidden (first position only)
    labels: torch.Tensor
    source_lengths: list[int] | None = None  # the token count of each row the features were read from (text)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: list[int]) -> FeatureSplit:
        lengths = None if self.source_lengths is None else [self.source_lengths[i] for i in rows]
        return FeatureSplit(self.features[rows], self.labels[rows], lengths)

    def lengths(self) -> list[int] | None:
        """The source rows' token counts: with trainer.group_by_length the head sees the batches, in the order,
        the uncached probe would (one vector per row needs no padding; this keeps the two runs the same run)."""
        return self.source_lengths

    def eval_order(self) -> list[int]:
        return list(range(len(self)))

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"features": self.features[rows], "labels": self.labels[rows]}


@torch.no_grad()  # not inference_mode: the head's backward saves these features
def extract(model: nn.Module, plan: HeadPlan, split: EncodedSplit, batch_size: int,
            device: torch.device) -> FeatureSplit:
    """One eval-mode pass of the full model over `split`, keeping the input of the first head module. In fp32
    whatever the run's precision: the dev features are what the head is scored on, and a later `selectune eval`
    (fp32, the full model) must give the same scores; one frozen pass costs little next to the head's epochs."""
    captured: list[torch.Tensor] = []
    first = model.get_submodule(plan.modules[0])
    handle = first.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    features: torch.Tensor | None = None
    try:
        for rows in eval_batches(split, batch_size):
            batch = split.batch(rows)
            batch.pop("labels")
            model(**{k: v.to(device) for k, v in batch.items()})
            x = captured.pop()
            x = (x[:, :1] if plan.first_token else x).float().cpu()
            if features is None:
                features = torch.empty((len(split), *x.shape[1:]))
            features[rows] = x
    finally:
        handle.remove()
        model.train(was_training)
    assert features is not None, "an empty split has no features"
    return FeatureSplit(features, split.labels, split.lengths())
