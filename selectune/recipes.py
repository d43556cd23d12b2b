"""Recipe names: the files under recipes/, and the ones composed from a preset and a task.

A recipe is what a user types after `recipe=` (`glue/mrpc_lora`). Most recipes hold nothing of a task's own:
the backbone, the method's settings, the budget and the schedule of a family live once in a preset,
`conf/preset/<set>/<method>.yaml`, and `glue/<task>_<method>` is that preset with `task=glue/<task>`.
Those names are made here for every task of a set and every preset of that set, and put in Hydra's
ConfigStore, so `recipe=`, multirun (`-m recipe=a,b`), `cat` and completion treat them as files.
A file `recipes/<folder>/<task>_<method>.yaml` holds what one task needs on top of its preset (CoLA's λ,
epochs chosen on validation) and takes that name's place. A new method needs one preset per set; a new
task, its name in a set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selectune.options import conf_dir, group_options


@dataclass(frozen=True)
class RecipeSet:
    """`<folder>/<task>_<method>` for each task here and each preset in `conf/preset/<preset>/`."""

    folder: str  # what users type before the slash, and the task group's folder: glue, vtab
    preset: str  # the preset folder: one backbone and schedule for these tasks
    tasks: tuple[str, ...]


VTAB_1K = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",  # natural
           "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",  # specialized
           "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
           "smallnorb_ele")  # structured (tasks/vtab.py GROUPS; a test keeps the two equal)

SETS = (
    RecipeSet("glue", "glue", ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")),
    RecipeSet("text", "glue", ("custom",)),  # a user's own CSV/TSV/JSONL with the GLUE presets: text/custom_lora
    RecipeSet("vtab", "vtab", VTAB_1K),  # ViT-B/16 IN-21k, the references' backbone (online)
    # the VTAB-1k-layout tasks scripts/reproduction/vtab_digits.py writes, on the offline DINOv2 ViT-S/14
    RecipeSet("vtab", "vtab_dinov2", ("cifar10_1k", "digits", "dtd10", "fashion_mnist_1k")),
    # GLUE asked as instructions to the offline SmolLM2-135M-Instruct (task family causal)
    RecipeSet("causal", "causal", ("cola", "mrpc", "qnli", "rte", "sst2", "wnli")),
)


def composed() -> dict[str, tuple[str, str]]:
    """Recipe name -> (preset option, task option), for every name of a set that has no file of its own."""
    files = set(group_options("recipe"))
    presets = group_options("preset")
    names: dict[str, tuple[str, str]] = {}
    for recipe_set in SETS:
        methods = [p.split("/", 1)[1] for p in presets if p.startswith(f"{recipe_set.preset}/")]
        for task in recipe_set.tasks:
            for method in methods:
                name = f"{recipe_set.folder}/{task}_{method}"
                if name not in files:
                    names[name] = (f"{recipe_set.preset}/{method}", f"{recipe_set.folder}/{task}")
    return names


def list_recipes(made: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """Recipe names as users type them after `recipe=` (`glue/mrpc_full`, ...): files and composed.
    `made`: composed(), when the caller already has it."""
    return sorted({*group_options("recipe"), *(composed() if made is None else made)})


def register(overrides: list[str], folders: list[Path] | None = None) -> None:
    """Make the composed recipes that `overrides` ask for (`recipe=a` or a sweep's `recipe=a,b`; all of them
    for a sweep function such as `glob(...)`) the ones in Hydra's ConfigStore, where Hydra looks after the files.
    A name that is a file in one of `folders` (a user's config folders on `hydra.searchpath`) is that file's, as
    a file under recipes/ takes a composed name's place (Hydra refuses a file and a stored node of one name).

    Only those asked for, and those asked for earlier in this process are taken out again: Hydra copies the
    whole store on every composition (0.05 s more per composition with all 300 in it, and `--help` 2.9 ->
    11.6 s; its footer points to `selectune ls` instead)."""
    from hydra.core.config_store import ConfigStore

    made = composed()
    for folder in folders or []:
        for name in group_options("recipe", folder):
            made.pop(name, None)
    wanted: set[str] = set()
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "recipe":
            wanted |= set(made) if "(" in value else {choice.strip() for choice in value.split(",")}
    store = ConfigStore.instance()
    stored = store.repo.get("recipe", {})
    for folder, entries in stored.items():  # earlier compositions' names, and any that a file has taken over since
        if isinstance(entries, dict):
            for key in [k for k in entries if f"{folder}/{k.removesuffix('.yaml')}" not in wanted.intersection(made)]:
                entries.pop(key)
    for name, (preset, task) in made.items():
        folder, _, leaf = name.rpartition("/")
        if name in wanted:
            node = {"defaults": [f"/preset/{preset}", {"override /task": task}]}
            store.store(group=f"recipe/{folder}", name=leaf, node=node, package="_global_")


def header(path_text: str) -> str:
    """The first line of a YAML file's header comment, after the em dash (`glue/mrpc_full — <this>`)."""
    for line in path_text.splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text.split(" — ", 1)[-1]
    return ""


def task_title(task: str) -> str:
    """A task's short title: its config's header up to the colon (`MRPC`, `VTAB-1k cifar (natural, 100 classes)`)."""
    return header((conf_dir() / "task" / f"{task}.yaml").read_text()).split(": ", 1)[0]


def recipe_description(name: str, made: dict[str, tuple[str, str]] | None = None) -> str:
    """What `selectune ls` shows for a recipe: its file's header, or its preset's with the task's title in.
    `made`: composed(), when the caller already has it."""
    preset_task = (composed() if made is None else made).get(name)
    if preset_task is None:
        return header((conf_dir() / "recipe" / f"{name}.yaml").read_text())
    preset, task = preset_task
    return header((conf_dir() / "preset" / f"{preset}.yaml").read_text()).replace("{task}", task_title(task))


def print_recipes(names: list[str] | None = None) -> None:
    """`selectune ls`: every recipe (or `names`, those a filter kept) with the first line of its header comment."""
    made = composed()
    names = list_recipes(made) if names is None else names
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {recipe_description(name, made)}")
    print(f"\n{len(names)} recipes · run one: selectune train recipe=<recipe> · see it: selectune cat <recipe>")


def matching(names: list[str], patterns: list[str]) -> list[str]:
    """The names that `selectune ls <patterns>` shows: those containing every pattern (`mrpc lora`), where a
    pattern with `*`, `?` or `[` is a shell-style glob matched against the whole name (`glue/*_sdiff`)."""
    from fnmatch import fnmatchcase

    def fits(name: str, pattern: str) -> bool:
        return fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern in name

    return [name for name in names if all(fits(name, p) for p in patterns)]


def recipe_text(name: str, new_name: str, made: dict[str, tuple[str, str]] | None = None) -> str:
    """An editable copy of recipe `name` as a file of its own (`selectune cp`): the shipped recipe file's
    body, or for a composed recipe its preset's body with the task picked in its defaults, under a header
    saying where it came from. The body's values are the recipe's own, so editing one changes the run."""
    made = composed() if made is None else made
    if name in made:
        preset, task = made[name]
        source = (conf_dir() / "preset" / f"{preset}.yaml").read_text()
    else:
        source, task = (conf_dir() / "recipe" / f"{name}.yaml").read_text(), None
    lines = source.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):  # its header: replaced below
        lines.pop(0)
    if task is not None:
        if "defaults:" not in lines:
            lines[:0] = ["defaults:"]
        at = lines.index("defaults:") + 1
        while at < len(lines) and lines[at].startswith("  - "):
            at += 1
        lines.insert(at, f"  - override /task: {task}")
    head = ["# @package _global_",  # a recipe sets keys of the whole config (model, task, trainer...), not recipe.*
            f"# {new_name} — a copy of {name} ({recipe_description(name, made)}): edit the values below",
            f"#   every key it sets, with its value: selectune cat {name} (add any of them here to change it)"]
    return "\n".join(head + [""] + lines) + "\n"
