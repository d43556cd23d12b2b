"""Causal-LM tasks: a decoder LLM (model=smollm2_135m) learns to answer in text (task=causal/<name>).

Two kinds, one split format (`LMSplit`):
- GLUE as instructions (`task=causal/sst2`, `causal/rte`, ...): each example becomes a user prompt (one
  template per task) and its answer is the label's word (`negative` / `positive`, `yes` / `no`). Training
  is next-token cross-entropy on the answer tokens only (the prompt is context, not a target). Evaluation
  scores the label words: at the answer's first position the logits of the words' first tokens are the
  class scores (a restricted argmax), so GLUE's metrics apply unchanged; no sampling, no parsing of text.
- Instruction JSONL (`task=causal/jsonl task.train_file=... task.dev_file=...`): one JSON object per line
  with string fields `prompt` and `response`; loss on the response tokens; reported: the perplexity of the
  dev responses (exp of the mean token NLL over every response token of the split) and that mean NLL.

With a chat template (SmolLM2's) the prompt is wrapped as a user turn and the answer ends with the
template's end-of-turn token, as the instruct model was trained; without one (a test tokenizer) the
prompt is followed by a newline and the answer ends with the tokenizer's end token. Prompt and answer are
tokenised apart, so the answer's tokens are the same in training and scoring. An example longer than
`max_seq_length` loses the end of its user text, never the chat frame or the answer.

Logits are computed only where they are used: a batch names the positions whose next token is an answer
token (`logits_to_keep`, the union over its rows), so the model projects those hidden states onto its
vocabulary and no others. The LM head over 49,152 words is a fifth of SmolLM2's forward cost at every
position, and a GLUE answer is two tokens of a ~70-token row; the loss and the scores are the same numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from selectune.errors import SelectuneError
from selectune.tasks import glue
from selectune.tasks.batches import pad
from selectune.tasks.example import Example
from selectune.tasks.text import excerpt, jsonl_objects

IGNORE = -100  # token targets that are not trained on (prompt, padding)
MARK = "\u0000"  # stands for the user text while the chat frame is rendered

# GLUE task -> (template over the example's texts, one word per label in label-id order)
PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("What is the sentiment of this movie review? Answer with one word, positive or negative.\n"
             "Review: {0}", ("negative", "positive")),
    "cola": ("Is this English sentence grammatically acceptable? Answer yes or no.\nSentence: {0}", ("no", "yes")),
    "mrpc": ("Do these two sentences mean the same thing? Answer yes or no.\nSentence 1: {0}\nSentence 2: {1}",
             ("no", "yes")),
    "qqp": ("Do these two questions ask the same thing? Answer yes or no.\nQuestion 1: {0}\nQuestion 2: {1}",
            ("no", "yes")),
    "rte": ("Does the premise imply the hypothesis? Answer yes or no.\nPremise: {0}\nHypothesis: {1}",
            ("yes", "no")),
    "qnli": ("Does the sentence answer the question? Answer yes or no.\nQuestion: {0}\nSentence: {1}",
             ("yes", "no")),
    "wnli": ("Does the first sentence imply the second? Answer yes or no.\nSentence 1: {0}\nSentence 2: {1}",
             ("no", "yes")),
    "mnli": ("Does the premise imply the hypothesis? Answer yes, maybe or no.\nPremise: {0}\nHypothesis: {1}",
             ("yes", "maybe", "no")),
}


@dataclass(frozen=True)
class PromptSpec:
    """A GLUE classification task asked as an instruction: GLUE's files, labels and metrics, plus the
    prompt template and the label words."""

    glue: glue.GlueSpec
    template: str
    words: tuple[str, ...]
    causal_lm = True

    @property
    def name(self) -> str:
        return self.glue.name

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.glue.labels

    @property
    def num_labels(self) -> int:
        return self.glue.num_labels

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.glue.metrics

    @property
    def primary(self) -> str:
        return self.glue.primary

    @property
    def is_regression(self) -> bool:
        return False

    def prompt(self, texts: tuple[str, ...]) -> str:
        return self.template.format(*texts)


@dataclass(frozen=True)
class JsonlSpec:
    """Free-form instructions from JSONL files, scored by the perplexity of the responses."""

    name: str
    causal_lm = True
    labels: None = None
    num_labels: int = 1
    metrics: tuple[str, ...] = ("perplexity", "nll")
    primary: str = "perplexity"
    lower_is_better: bool = True  # for trainer.select=best
    is_regression: bool = False

    @staticmethod
    def score(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
        """outputs: per row (summed NLL of its response tokens, their count)."""
        total, count = float(outputs[:, 0].sum()), float(outputs[:, 1].sum())
        nll = total / count
        return {"perplexity": math.exp(min(nll, 700.0)), "nll": nll}


def prompt_spec(name: str, template: Optional[str] = None, words: Optional[list[str]] = None) -> PromptSpec:
    spec = glue.glue_spec(name)
    if spec.is_regression:
        raise SelectuneError(f"task causal/{name}: a regression task has no label words to answer with; "
                             f"causal tasks are the classification ones ({', '.join(PROMPTS)})")
    default_template, default_words = PROMPTS[name]
    chosen = tuple(words) if words is not None else default_words
    if len(chosen) != spec.num_labels:
        raise SelectuneError(f"task.label_words={list(chosen)}: {name} has {spec.num_labels} labels "
                             f"({', '.join(spec.labels or ())}), one word each")
    return PromptSpec(spec, template if template is not None else default_template, chosen)


# --------------------------------------------------------------------------- JSONL files
def read_jsonl(path: Path, limit: Optional[int] = None) -> list[Example]:
    """(prompt, response) pairs, one JSON object per line; a malformed line fails naming file and line."""
    if not path.is_file():
        raise SelectuneError(f"missing instruction file {path} (JSONL: one {{\"prompt\": ..., \"response\": ...}} "
                             f"object per line)")
    examples: list[Example] = []
    for lineno, row in jsonl_objects(path, '"prompt" and "response"'):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str) or not row[key]:
                found = "nothing" if key not in row else excerpt(json.dumps(row[key]))
                raise SelectuneError(f"{path}:{lineno}: malformed line: \"{key}\" must be a non-empty string, "
                                     f"found {found}")
        examples.append(Example((row["prompt"], row["response"]), 0))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise SelectuneError(f"{path}: no examples (expected one JSON object per line)")
    return examples


# --------------------------------------------------------------------------- encoding
@dataclass
class LMSplit:
    """Token rows (prompt + answer) with where each answer starts; makes its own batches, loss and outputs.

    `labels` are what a metric compares with (class ids; zeros for JSONL), as in every split; a batch's
    `labels` are the token targets at its kept positions (IGNORE outside the answers), which `loss` and
    `outputs` read."""

    input_ids: list[list[int]]
    answer_start: list[int]
    labels: torch.Tensor
    pad_id: int
    choices: Optional[torch.Tensor]  # first token of each label word (GLUE); None: JSONL, scored by NLL

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: list[int]) -> LMSplit:
        return LMSplit([self.input_ids[i] for i in rows], [self.answer_start[i] for i in rows], self.labels[rows],
                       self.pad_id, self.choices)

    def eval_order(self) -> list[int]:
        return sorted(range(len(self)), key=lambda i: len(self.input_ids[i]))

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded rows, their attention mask, the positions whose next token is an answer token of some
        row (`logits_to_keep`, sorted: the model computes logits there only), and the targets aligned with
        them (`labels`, rows x kept positions: the next token where it belongs to the row's answer, else
        IGNORE)."""
        ids, mask = pad([self.input_ids[i] for i in rows], self.pad_id)
        targets = torch.full_like(ids, IGNORE)
        for row, i in enumerate(rows):
            start, n = self.answer_start[i], len(self.input_ids[i])
            targets[row, start:n] = ids[row, start:n]
        keep = (targets[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
        return {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep, "labels": targets[:, keep + 1]}

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens of the batch (logits and targets at the
        batch's kept positions)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)

    def outputs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per row: the label words' scores where the answer's first token is predicted (GLUE), or (summed NLL
        of the answer tokens, their count) (JSONL); logits and targets at the batch's kept positions."""
        if self.choices is not None:
            first = (targets != IGNORE).int().argmax(dim=1)  # the kept position predicting the first answer token
            at = logits[torch.arange(len(logits), device=logits.device), first]
            return at[:, self.choices.to(logits.device)].float()
        nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")
        return torch.stack([nll.sum(dim=1), (targets != IGNORE).sum(dim=1).float()], dim=1)


class Encoder:
    """Prompt and answer token ids the model's way (its chat frame when it has one)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], add_generation_prompt=True,
                                                 tokenize=False)
            before, after = text.split(MARK)
            self.end = tokenizer.eos_token_id  # SmolLM2: <|im_end|>, the end of a turn
        else:
            before, after = "", "\n"
            self.end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.before, self.after = self._ids(before), self._ids(after)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def answer(self, text: str) -> list[int]:
        return self._ids(text) + ([self.end] if self.end is not None else [])

    def row(self, prompt: str, answer: list[int]) -> tuple[list[int], int]:
        """(prompt + answer ids, where the answer starts), the user text cut to fit max_length."""
        frame = len(self.before) + len(self.after)
        room = self.max_length - frame - len(answer)
        if room < 1:  # a long response: keep one token of the user text, cut the answer's end
            answer, room = answer[:max(1, self.max_length - frame - 1)], 1
        prompt_ids = self.before + self._ids(prompt)[:room] + self.after
        return prompt_ids + answer, len(prompt_ids)


def encode_prompts(spec: PromptSpec, tokenizer: Any, examples: list[Example], max_length: int) -> LMSplit:
    encoder = Encoder(tokenizer, max_length)
    answers = [encoder.answer(word) for word in spec.words]
    firsts = [a[0] for a in answers]
    if len(set(firsts)) != len(firsts):
        raise SelectuneError(f"task.label_words={list(spec.words)}: the words must start with different tokens "
                             f"(scoring compares each word's first token)")
    rows = [encoder.row(spec.prompt(ex.texts), answers[int(ex.label)]) for ex in examples]
    return LMSplit([r for r, _ in rows], [s for _, s in rows], torch.tensor([int(ex.label) for ex in examples]),
                   _pad(tokenizer), torch.tensor(firsts))


def encode_jsonl(tokenizer: Any, examples: list[Example], max_length: int) -> LMSplit:
    encoder = Encoder(tokenizer, max_length)
    rows = [encoder.row(ex.texts[0], encoder.answer(ex.texts[1])) for ex in examples]
    return LMSplit([r for r, _ in rows], [s for _, s in rows], torch.zeros(len(examples), dtype=torch.long),
                   _pad(tokenizer), None)


def _pad(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0  # padded positions are masked and never targets: any id will do
