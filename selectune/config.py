"""Composing recipes and checking them against typed schemas.

Recipes are plain YAML composed by Hydra (config groups model / task / method / budget / trainer).
Each section is then checked against the dataclass its owner declares (the trainer's, the task's,
the method's ...), so a wrong override (`trainer.lr=abc`, `trainer.epochs=1.5`) fails before any
work with one line that names the key, instead of deep inside the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selectune.errors import SelectuneError
from selectune.options import CONF_PACKAGE, conf_dir, group_options
from selectune.recipes import list_recipes, register

T = TypeVar("T")

GROUPS = ("model", "task", "method", "budget", "trainer")


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_network(online: bool) -> None:
    """Offline unless `online=true`, whatever the environment says (HF_HUB_OFFLINE=0 included): a missing
    model then fails at once instead of after 25-50 s of Hub retries. The libraries read these variables
    when imported, so an already imported huggingface_hub / datasets is switched as well."""
    import sys

    for name in OFFLINE_VARIABLES:
        if online:
            os.environ.pop(name, None)
        else:
            os.environ[name] = "1"
    for module, attributes in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        loaded = sys.modules.get(module)
        for attribute in attributes:
            if loaded is not None and hasattr(loaded, attribute):
                setattr(loaded, attribute, not online)


def searched_folders(overrides: list[str]) -> list[Path]:
    """The `file://` folders a `hydra.searchpath=[...]` override adds: where users keep their own recipes."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "hydra.searchpath":
            entries = (entry.strip() for entry in value.strip().strip("[]").split(","))
            return [Path(entry[len("file://"):]) for entry in entries if entry.startswith("file://")]
    return []


def check_choice(group: str, value: str, folders: list[Path] | None = None) -> None:
    """Fail with suggestions when `group=value` names no option (Hydra's message lists them all).
    `folders`: users' own config folders (searched_folders), whose `<group>/` options count too."""
    options = list_recipes() if group == "recipe" else group_options(group)
    for folder in folders or []:
        options += group_options(group, folder)
    if value in options or value in ("null", ""):
        return
    close = difflib.get_close_matches(value, options, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"`selectune ls` lists the {group}s"
    raise SelectuneError(f"unknown {group} '{value}': {hint}")


def check_group_overrides(overrides: list[str]) -> None:
    """Check `recipe=`, `task=`, `model=`, ... overrides (multirun lists too) before Hydra sees them; a recipe that a
    user's folder holds under a shipped recipe's name is refused (the run would train the shipped one, not the
    user's edits)."""
    folders = searched_folders(overrides)
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:  # a typo: Hydra only warns and goes on without it (a shipped recipe of that name then runs)
        raise SelectuneError(f"hydra.searchpath names {', '.join(missing)}, which is not a folder here")
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in (*GROUPS, "recipe"):
            continue
        for choice in value.split(","):
            if not choice.startswith(("choice(", "range(", "glob(")):
                check_choice(key, choice.strip(), folders)
                if key == "recipe":
                    check_not_shadowed(choice.strip(), folders)


def shipped_file(name: str) -> bool:
    """Whether recipe `name` is a file under the shipped recipes/: Hydra reads the shipped config folder before
    any `hydra.searchpath` folder, so a user's file of that name would be silently ignored."""
    return (conf_dir() / "recipe" / f"{name}.yaml").is_file()


def check_not_shadowed(name: str, folders: list[Path]) -> None:
    """Refuse recipe `name` where one of the user's `folders` holds it and a shipped file has its name."""
    for folder in folders:
        if (folder / "recipe" / f"{name}.yaml").is_file() and shipped_file(name):
            raise SelectuneError(f"{folder / 'recipe' / name}.yaml has the name of a shipped recipe, which is "
                                 f"read first: rename it (e.g. mine/{name.rpartition('/')[2]})")


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose a primary config with Hydra's compose API (no run dir, no logging side effects)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    check_group_overrides(overrides)
    register(overrides, searched_folders(overrides))
    import yaml

    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as err:
        message = first_line(str(err))
        if message.startswith("Could not override"):
            key = message.split("'")[1] if "'" in message else message
            message = f"unknown config key '{key}'{close_key(config_name, overrides, key)} (`selectune cat <recipe>` " \
                      f"shows every key)"
        raise SelectuneError(message) from err
    except yaml.MarkedYAMLError as err:  # a user's own recipe file that is not YAML
        mark = err.problem_mark or err.context_mark
        where = f"{mark.name}:{mark.line + 1}" if mark is not None else "a config file"
        raise SelectuneError(f"{where}: not valid YAML ({err.problem or err.context})") from None
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise SelectuneError(f"cannot compose the config: {first_line(str(err))}") from None


def resolve_all(cfg: DictConfig) -> None:
    """Resolve every interpolation of a composed config (Hydra's own `hydra:` node aside), so an unknown
    resolver or a value that refers to itself fails in one line naming the key."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise SelectuneError(f"config{f' key {key!r}' if key else ''}: {first_line(str(err))}") from None


# MethodConfig's settings every method has and no method yaml sets (None: the trainer's lr, the method's lr);
# a recipe or a command line adds them: `+method.head_lr=2e-2` (tests/test_recipes.py keeps this list true)
UNSET_METHOD_KEYS = ("lr", "head_lr")


def close_key(config_name: str, overrides: list[str], key: str) -> str:
    """`: did you mean trainer.lr?` for an unknown `trainer.learning_rate`: the keys beside it in the config
    composed without that override (where it composes), matched by spelling; "" when none is close."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    parent, _, leaf = key.rpartition(".")
    if parent == "method" and leaf in UNSET_METHOD_KEYS:
        return f": every method has it, unset in its yaml; add it with +{key}=<value>"
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except (HydraException, OmegaConfBaseException):
        return ""
    if not isinstance(node, DictConfig):
        return ""
    aliases = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "rank": "r"}  # transformers' and peft's names
    names = [str(k) for k in node]
    close = [aliases[leaf]] if aliases.get(leaf) in names else difflib.get_close_matches(leaf, names, n=2, cutoff=0.6)
    return f": did you mean {' or '.join(f'{parent}.{c}' if parent else c for c in close)}?" if close else ""


def typed(schema: type[T], node: Any, where: str) -> T:
    """Merge a config section into its dataclass schema and return the dataclass instance.

    Unknown keys and values of the wrong type fail with `where.key` in the message.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = first_line(str(err))
        if "not in struct" in msg or ("Key '" in msg and "not in" in msg):
            names = [f.name for f in dataclasses.fields(schema)]  # type: ignore[arg-type]
            close = difflib.get_close_matches(str(key).rpartition(".")[2], names, n=1, cutoff=0.6)
            hint = f"did you mean {where}.{close[0]}? " if close else ""
            raise SelectuneError(f"unknown key '{where}.{key}' ({hint}valid keys: {', '.join(names)})") from err
        raise SelectuneError(f"bad value for '{where}.{key}': {msg}") from err


def first_line(text: str) -> str:
    """The first non-empty line of an error message (Hydra and OmegaConf add multi-line context)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return text.strip()
