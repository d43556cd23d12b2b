"""Recipe names: files and the names composed from a preset and a task, listed, described and composed alike."""

from __future__ import annotations

import dataclasses
import os

import pytest
from omegaconf import OmegaConf

from selectune import recipes
from selectune.commands import RunSpec
from selectune.config import UNSET_METHOD_KEYS, compose, conf_dir, group_options
from selectune.errors import SelectuneError
from selectune.methods.base import MethodConfig
from selectune.tasks import vtab

from conftest import run_cli


def test_every_preset_task_and_recipe_file_composes_into_a_typed_run():
    """Every recipe file, every preset and every task of a set composed at least once: a composed name is its
    preset with its task (the next test), so this covers the ~400 names in ~1/5 of the compositions."""
    names = recipes.list_recipes()
    assert len(names) >= 304  # every glue/<task>_<method> and vtab/<task>_<method> name users typed before presets
    made = recipes.composed()
    covering, presets, tasks = [], set(), set()
    for name in names:
        if name not in made or made[name][0] not in presets or made[name][1] not in tasks:
            covering.append(name)
            if name in made:
                presets.add(made[name][0])
                tasks.add(made[name][1])
    assert presets == {p for p, _ in made.values()} and tasks == {t for _, t in made.values()}
    for name in covering:
        spec = RunSpec.from_config(compose("train", [f"recipe={name}"]))
        folder, _, leaf = name.partition("/")
        assert leaf == f"{spec.task.name}_{spec.method.name}" and spec.task.family == folder, name


def test_a_composed_name_is_its_preset_with_its_task():
    made = recipes.composed()
    # names no sweep writes a file for (WNLI and the online ViT-B set are never tuned here)
    assert made["glue/wnli_lora"] == ("glue/lora", "glue/wnli")
    assert made["vtab/eurosat_sdiff"] == ("vtab/sdiff", "vtab/eurosat")
    assert "glue/cola_sdiff" not in made  # a file with CoLA's own λ takes the name
    # the offline DINOv2 tasks share the folder `vtab` with ViT-B's but not its preset; a sweep may write a
    # file for any one of them, so the check runs over the dtd10 names still composed
    dtd10 = sorted(name for name in made if name.startswith("vtab/dtd10_"))
    assert dtd10 and all(made[name] == (f"vtab_dinov2/{name.removeprefix('vtab/dtd10_')}", "vtab/dtd10")
                         for name in dtd10)
    method = dtd10[0].removeprefix("vtab/dtd10_")
    cfg = compose("train", [f"recipe=vtab/dtd10_{method}"])
    assert (cfg.model.name_or_path, cfg.task.name, cfg.method.name, cfg.trainer.epochs) == (
        compose("train", [f"recipe=vtab/fashion_mnist_1k_{method}"]).model.name_or_path, "dtd10", method, 10)


def test_every_recipe_file_sits_on_the_preset_and_task_its_name_says_and_adds_something():
    for name in group_options("recipe"):
        folder, _, leaf = name.partition("/")
        recipe_set, task = next((s, t) for s in recipes.SETS for t in s.tasks
                                if s.folder == folder and leaf.startswith(f"{t}_"))
        method = leaf[len(task) + 1:]
        cfg = OmegaConf.load(conf_dir() / "recipe" / f"{name}.yaml")
        assert list(cfg.defaults) == [f"/preset/{recipe_set.preset}/{method}", {"override /task": f"{folder}/{task}"}]
        assert set(cfg) - {"defaults"}, f"{name} adds nothing to its preset: delete it, the name is composed"


def test_the_sets_name_existing_tasks_and_vtab_1k_is_the_papers_19():
    assert sorted(recipes.VTAB_1K) == sorted(t for group in vtab.GROUPS.values() for t in group)
    tasks = set(group_options("task"))
    for recipe_set in recipes.SETS:
        assert {f"{recipe_set.folder}/{t}" for t in recipe_set.tasks} <= tasks
        assert any(p.startswith(f"{recipe_set.preset}/") for p in group_options("preset"))


def test_ls_describes_composed_names_with_the_tasks_title(capsys):
    recipes.print_recipes()
    out = capsys.readouterr().out
    assert "{task}" not in out
    line = next(line for line in out.splitlines() if line.startswith("vtab/eurosat_lora "))
    assert "LoRA r=8" in line and "VTAB-1k eurosat (specialized, 10 classes)" in line
    assert "on MRPC, offline MiniLM" in next(line for line in out.splitlines() if line.startswith("glue/mrpc_full "))
    assert f"{len(recipes.list_recipes())} recipes" in out


@pytest.mark.parametrize("preset", group_options("preset"))
def test_every_preset_names_its_task_in_its_header(preset):
    text = (conf_dir() / "preset" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "{task}" in recipes.header(text)
    assert "override /task" not in text  # the recipe name picks the task


def test_an_own_recipe_folder_on_the_searchpath_builds_on_a_shipped_preset(tmp_path):
    (tmp_path / "recipe" / "mine").mkdir(parents=True)
    (tmp_path / "recipe" / "mine" / "x.yaml").write_text(
        "# @package _global_\n# mine/x — my LoRA on RTE at r=4\n"
        "defaults:\n  - /preset/glue/lora\n  - override /task: glue/rte\nmethod:\n  r: 4\n")
    searchpath = f"hydra.searchpath=[pkg://selectune.conf,file://{tmp_path}]"
    cfg = compose("train", [searchpath, "recipe=mine/x"])
    assert (cfg.task.name, cfg.method.name, cfg.method.r, cfg.trainer.lr) == (
        "rte", "lora", 4, compose("train", ["recipe=glue/rte_lora"]).trainer.lr)
    result = run_cli("cat", searchpath, "recipe=mine/y", cwd=tmp_path)
    assert result.returncode != 0 and "unknown recipe 'mine/y': did you mean mine/x?" in result.stderr
    result = run_cli("train", searchpath, "recipe=mine/x", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0 and "r: 4" in result.stdout, result.stderr


def test_validate_goes_online_when_the_recipe_itself_says_online(tmp_path, monkeypatch):
    """A recipe's own top-level values win over base.yaml's (they were silently replaced by them before), and
    `online: true` in a recipe counts for validate as it does for train, not only `online=true` typed."""
    from selectune import cli, commands
    from selectune.config import OFFLINE_VARIABLES, set_network

    for name in OFFLINE_VARIABLES:  # restored after the test, whatever the command sets
        monkeypatch.setenv(name, "1")
    (tmp_path / "recipe" / "mine").mkdir(parents=True)
    (tmp_path / "recipe" / "mine" / "hub.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /preset/glue/lora\n  - override /task: glue/rte\nonline: true\n"
        "run_name: mine\n")
    cfg = compose("train", [f"hydra.searchpath=[file://{tmp_path}]", "recipe=mine/hub"])
    assert (cfg.online, cfg.run_name) == (True, "mine")
    seen = {}
    monkeypatch.setattr(commands, "validate", lambda cfg: seen.update(offline=os.environ.get("HF_HUB_OFFLINE")))
    try:
        set_network(False)  # what main() does first when `online=true` is not typed
        cli._validate("validate", [f"hydra.searchpath=[file://{tmp_path}]", "recipe=mine/hub"])
    finally:
        set_network(False)
    assert seen == {"offline": None}


def test_each_method_has_the_presets_of_the_families_it_runs_on_and_no_other():
    """Method.quick_test names the families a method runs on: the registry-wide tests build glue/rte_<m>
    for "text" and vtab/dtd10_<m> for "vision", so those presets exist, and a method wants no other."""
    from selectune.methods import METHODS

    presets = set(group_options("preset"))
    for family, folder in (("text", "glue"), ("vision", "vtab_dinov2")):
        wanted = {f"{folder}/{name}" for name, cls in METHODS.items() if family in cls.quick_test}
        assert wanted == {p for p in presets if p.startswith(f"{folder}/")}, family


def test_a_method_setting_no_yaml_sets_says_to_add_it_with_a_plus():
    """`method.head_lr` is every method's setting (docs/methods.md) but in no method's yaml, so Hydra refuses
    a plain override: the message says how to add it, and the added value reaches the method."""
    assert set(UNSET_METHOD_KEYS) <= {f.name for f in dataclasses.fields(MethodConfig)}
    for path in (conf_dir() / "method").glob("*.yaml"):
        assert not set(UNSET_METHOD_KEYS) & set(OmegaConf.load(path)), path  # else the hint would be wrong
    with pytest.raises(SelectuneError, match=r"every method has it, unset in its yaml; add it with \+method.head_lr"):
        compose("train", ["recipe=glue/rte_bitfit", "method.head_lr=1e-2"])
    spec = RunSpec.from_config(compose("train", ["recipe=glue/rte_bitfit", "+method.head_lr=1e-2"]))
    assert spec.method.head_lr == 0.01
