"""One base model in memory, many task deltas: apply and remove a stored delta in place.

    import selectune
    delta = selectune.load_delta("runs/mrpc_sara/...")       # a run dir or its delta.safetensors
    delta.apply(model)      # sparse entries by index, low-rank / SVD factors merged, head swapped
    ...
    delta.remove(model)     # the base again, bit for bit

`apply` keeps exactly what undoes it (the base values at the touched indices, the replaced tensors,
the replaced modules; `selectune.delta.forms`), so `remove` restores rather than subtracts. A delta is
refused on a base whose weights hash differs from the one it was trained on (the hash `selectune
export` checks; computed on the first apply and cached on the model, which selectune alone changes
from then on) and on a model that already carries a delta. A head for another label count (2 vs 3
labels, regression's 1) replaces the classifier's tensors and the config's labels, restored on remove.
`TaskSwitcher` holds one active task per model and switches between named deltas.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from selectune.backbone import HEAD_PREFIXES, weights_hash
from selectune.delta.forms import Form, Undo, forms_of
from selectune.delta.taskdelta import TaskDelta
from selectune.errors import SelectuneError

ACTIVE = "_selectune_active"  # the model's attribute naming the delta it carries
BASE_HASH = "_selectune_base_hash"


@dataclass
class Active:
    """What a model carries: the delta and how to take each of its changes back."""

    delta: Delta
    undos: list[Undo]
    restore_config: Callable[[], None]
    placed: dict[str, tuple[torch.dtype, torch.device]] = field(default_factory=dict)  # each touched tensor's
    # dtype and device when applied: remove undoes there, whatever .half() / .to() did since

    @property
    def held_bytes(self) -> int:
        return sum(u.held for u in self.undos)


class Delta(TaskDelta):
    """A loaded TaskDelta that can be applied to and removed from a model in memory."""

    @property
    def name(self) -> str:
        return f"{self.meta.get('task', '?')}_{self.meta.get('method', '?')}"

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (what holding this delta in memory costs)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @torch.no_grad()
    def apply(self, model: nn.Module, force: bool = False) -> None:
        """Change `model` in place into this task's model; `force` skips the base-hash check."""
        current = active(model)
        if current is not None:
            raise SelectuneError(f"the model already carries delta '{current.delta.name}'; remove it first "
                                 f"(or switch with selectune.TaskSwitcher)")
        if not force:
            self._check_base(model)
        groups = self._plan(model)
        params = dict(model.named_parameters())
        touched = {name: params[name] for name, _, _ in groups}  # the Parameter objects, to put back on failure
        placed = {name: (p.dtype, p.device) for name, p in touched.items()}
        undos: list[Undo] = []
        try:
            for name, form, parts in groups:
                undos.append(form.apply(model, name, parts))
            restore_config = _set_labels(model, self)
        except BaseException as err:
            for undo in reversed(undos):
                undo.restore()
            _put_back(model, touched)  # a group that failed half-way (a Parameter swapped, no undo returned yet)
            if isinstance(err, SelectuneError) or not isinstance(err, Exception):
                raise
            raise SelectuneError(f"cannot apply delta '{self.name}': {_why(err)}; the model is unchanged") from err
        setattr(model, ACTIVE, Active(self, undos, restore_config, placed))

    @torch.no_grad()
    def remove(self, model: nn.Module) -> None:
        """Take this delta off `model`, restoring the base bit for bit."""
        current = active(model)
        if current is None or current.delta is not self:
            carried = "no delta" if current is None else f"delta '{current.delta.name}'"
            raise SelectuneError(f"cannot remove delta '{self.name}': the model carries {carried}")
        moved: dict[str, tuple[torch.dtype, torch.device]] = {}
        try:
            for name, (dtype, device) in current.placed.items():  # a .half() / .to() since apply: undo in the
                param = model.get_parameter(name)                   # dtype and place it was applied in, then
                if (param.dtype, param.device) != (dtype, device):  # move the restored base where it is now
                    moved[name] = (param.dtype, param.device)
                    param.data = param.data.to(device=device, dtype=dtype)
            for undo in reversed(current.undos):
                undo.restore()
            for name, (dtype, device) in moved.items():
                param = model.get_parameter(name)
                param.data = param.data.to(device=device, dtype=dtype)
        except (RuntimeError, TypeError, ValueError, AttributeError) as err:
            raise SelectuneError(f"cannot remove delta '{self.name}': {_why(err)} (the model was changed in a way "
                                 f"apply cannot take back; reload the base model)") from None
        current.restore_config()
        delattr(model, ACTIVE)

    def _check_base(self, model: nn.Module) -> None:
        want = self.meta.get("base_hash")
        found = base_hash(model)
        if want != found:
            raise SelectuneError(f"delta '{self.name}' was trained on base weights with hash {want}, but this model's "
                                 f"hash is {found} (another base model?); pass force=True to apply anyway")

    def _plan(self, model: nn.Module) -> list[tuple[str, Form, dict[str, torch.Tensor]]]:
        """Every (parameter, form, entries) to apply, all checked by the one fit check (the one merge,
        export and eval use; a head of another label count may replace the model's) before anything is written."""
        self._check_head(model, dict(model.named_parameters()))  # what the head leaves must work and fit its task
        self.check_fits(model, resize_head=True)
        return [(name, form, parts) for name, parts in self.by_parameter().items() for form in forms_of(name, parts)]

    def _check_head(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        """The classifier the delta leaves must work and fit its task, checked before anything is written: only
        the last Linear of the head may change its shape (a head for another label count), its weight stays a
        matrix over the same inputs, its bias has one entry per row, and the rows are the label count of the
        task the delta's metadata names (a 3-label task on a 2-row head would give wrong logits)."""
        last = _last_head_linear(model)
        sets = {n: parts["set"] for n, parts in self.by_parameter().items()
                if "set" in parts and n.startswith(HEAD_PREFIXES)}
        for name, value in sets.items():
            module_name, _, attr = name.rpartition(".")
            if name not in params:  # the one fit check names it
                continue
            if tuple(value.shape) == tuple(params[name].shape):
                continue
            if module_name != last or attr not in ("weight", "bias"):
                raise SelectuneError(f"delta '{self.name}': '{name}' has shape {tuple(value.shape)}, the model's "
                                     f"{tuple(params[name].shape)}; only the head's output layer may change shape")
        if last is None:
            return
        weight, bias = params.get(f"{last}.weight"), params.get(f"{last}.bias")
        new_weight = sets.get(f"{last}.weight", weight)
        new_bias = sets.get(f"{last}.bias", bias)
        if new_weight is None:
            return
        if new_weight.dim() != 2 or (weight is not None and new_weight.shape[1] != weight.shape[1]):
            raise SelectuneError(f"delta '{self.name}': head weight '{last}.weight' has shape "
                                 f"{tuple(new_weight.shape)}; the model's output layer takes "
                                 f"{weight.shape[1] if weight is not None else '?'} inputs")
        rows = new_weight.shape[0]
        if new_bias is not None and tuple(new_bias.shape) != (rows,):
            raise SelectuneError(f"delta '{self.name}': head bias '{last}.bias' has shape {tuple(new_bias.shape)} "
                                 f"for a weight of {rows} rows")
        head = _task_head(self)
        if head is not None and head[0] != rows:
            raise SelectuneError(f"delta '{self.name}': its task has {head[0]} outputs but the head it leaves has "
                                 f"{rows} rows")


def load_delta(path: str | Path) -> Delta:
    """A stored task delta (a run directory or a delta.safetensors), read by selectune's validating loader:
    tensors and JSON only, no pickle."""
    return Delta.load(path)


def active(model: nn.Module) -> Active | None:
    """What delta `model` carries now, if any."""
    return model.__dict__.get(ACTIVE)


def base_hash(model: nn.Module) -> str:
    """The hash of the model's base weights (all but the classification head), as training stored it.
    Computed once per model, while it carries no delta, then cached: only selectune changes it after."""
    cached = model.__dict__.get(BASE_HASH)
    if cached is None:
        if active(model) is not None:
            raise SelectuneError("the model carries a delta: its base hash cannot be computed now")
        cached = weights_hash({n: p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES)})
        setattr(model, BASE_HASH, cached)
    return cached


def _set_labels(model: nn.Module, delta: Delta) -> Callable[[], None]:
    """Point the model's config (label names, problem type, label count) at the delta's task; returns
    the undo. A delta without a stored config only resizes the label count to its head."""
    config = getattr(model, "config", None)
    if config is None:
        return lambda: None
    saved = {"id2label": config.id2label, "label2id": config.label2id, "problem_type": config.problem_type}
    saved_num = model.__dict__.get("num_labels")
    head = _task_head(delta)
    if head is not None:
        num_labels, regression, labels = head
        config.num_labels = num_labels
        config.problem_type = "regression" if regression else "single_label_classification"
        if labels:
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
    else:
        config.num_labels = _head_outputs(model, config.num_labels)
    if saved_num is not None:
        model.num_labels = config.num_labels  # BERT-style models keep their own copy for the loss

    def restore() -> None:
        for key, value in saved.items():
            setattr(config, key, value)
        if saved_num is not None:
            model.num_labels = saved_num

    return restore


def _task_head(delta: Delta) -> tuple[int, bool, tuple[str, ...] | None] | None:
    """(label count, regression?, label names) of the task the delta was trained on, from its config."""
    task = (delta.meta.get("config") or {}).get("task")
    if not task:
        return None
    from selectune.tasks import TaskConfig, is_causal, task_spec

    own = {k: task[k] for k in ("train_file", "text_column", "label_column", "labels", "regression", "metrics")
           if k in task}  # a custom text task (tasks/custom.py): its labels are in its config or its file
    spec = task_spec(TaskConfig(name=task["name"], family=task.get("family", "glue"),
                                num_classes=task.get("num_classes"), **own))
    if is_causal(spec):  # a causal LM answers with its own LM head: no labels to point its config at
        return None
    return spec.num_labels, spec.is_regression, (None if spec.is_regression else spec.labels)


def _last_head_linear(model: nn.Module) -> str | None:
    """The name of the classification head's last Linear (its output layer), if the model has one."""
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear) and (name + ".").startswith(HEAD_PREFIXES):
            return name
    return None


def _put_back(model: nn.Module, touched: dict[str, nn.Parameter]) -> None:
    """Put back every Parameter object an apply replaced (with the Linear's feature counts): the undo of a
    group that failed before it could return its own."""
    for name, param in touched.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if getattr(module, attr, None) is not param:
            setattr(module, attr, param)
            if isinstance(module, nn.Linear) and attr == "weight":
                module.out_features, module.in_features = param.shape


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _head_outputs(model: nn.Module, default: int) -> int:
    """Output count of the classification head's last Linear (after a swap)."""
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear) and (name + ".").startswith(HEAD_PREFIXES):
            return module.out_features
    return default


class TaskSwitcher:
    """One base model, one active task at a time, switched by name:

        switcher = selectune.TaskSwitcher(model, {"mrpc": "runs/mrpc", "rte": "runs/rte"})
        switcher.switch("rte"); logits = model(**batch).logits; switcher.clear()
    """

    def __init__(self, model: nn.Module, deltas: Mapping[str, Delta | str | Path] | None = None) -> None:
        self.model = model
        self.deltas: dict[str, Delta] = {}
        base_hash(model)  # once, on the clean base
        for name, delta in (deltas or {}).items():
            self.add(name, delta)

    def add(self, name: str, delta: Delta | str | Path) -> Delta:
        """Register a delta (or the path of one) under `name`; it is checked against the base now."""
        loaded = delta if isinstance(delta, Delta) else load_delta(delta)
        loaded._check_base(self.model)
        self.deltas[name] = loaded
        return loaded

    @property
    def active(self) -> str | None:
        """The name of the active task (a delta switched to without a name goes by `Delta.name`)."""
        current = active(self.model)
        if current is None:
            return None
        return next((n for n, d in self.deltas.items() if d is current.delta), current.delta.name)

    def switch(self, task: str | Delta) -> Delta:
        """Make `task` (a registered name, a Delta, or a delta path) the active one."""
        if isinstance(task, Delta):
            delta = task
        elif task in self.deltas:
            delta = self.deltas[task]
        elif Path(task).exists():
            delta = self.add(str(task), task)
        else:
            raise SelectuneError(f"no task '{task}' in this switcher (known: {', '.join(self.deltas) or 'none'})")
        current = active(self.model)
        if current is not None and current.delta is delta:
            return delta
        self.clear()
        try:
            delta.apply(self.model)
        except BaseException:
            if current is not None:  # all or nothing: a refused switch leaves the previous task active
                current.delta.apply(self.model, force=True)
            raise
        return delta

    def clear(self) -> None:
        """Back to the bare base model."""
        current = active(self.model)
        if current is not None:
            current.delta.remove(self.model)
