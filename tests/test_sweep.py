"""`selectune sweep`: a grid searched on the carved validation split, hopeless candidates pruned at an evaluation,
the study kept in a journal that a later sweep resumes from, the winner written into a recipe that composes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from selectune import commands, sweep
from selectune.config import compose, conf_dir
from selectune.errors import SelectuneError

from conftest import REPO
from conftest import run_cli as cli

# val accuracy per evaluation for each lr: 1e-3 learns, 1e-2 is best at its end, 1e-1 never leaves chance
CURVES = {"0.001": [60.0, 64.0, 66.0, 67.0], "0.01": [62.0, 66.0, 70.0, 71.0], "0.1": [50.0, 50.0, 51.0, 50.0]}


def fake_train(calls: list[str]):
    """commands.train as the sweep sees it: one evaluation per epoch reported to on_eval, stopped when it says."""

    def train(cfg, run_dir: Path, on_eval=None, **_):
        lr = f"{cfg.trainer.lr:g}"
        calls.append(lr)
        evals = []
        for i, score in enumerate(CURVES[lr], start=1):
            evals.append({"step": 10 * i, "metrics": {"val": {"accuracy": score}}})
            if on_eval(10 * i, score) and i < len(CURVES[lr]):
                break
        best = max(evals, key=lambda e: e["metrics"]["val"]["accuracy"])
        stopped = evals[-1]["step"] if len(evals) < len(CURVES[lr]) else None
        return {"task": "rte", "family": "glue", "selected_on": "val", "metrics": best["metrics"],
                "selected_step": best["step"], "evals": evals, "steps": evals[-1]["step"], "step_time_s": 0.1,
                "train_time_s": 1.0, "eval_time_s": 0.5, "stopped_at": stopped}

    return train


def test_the_table_counts_the_evaluations_a_candidate_made_not_the_ones_it_was_told(tmp_path, monkeypatch):
    """A method whose first evaluations are not of its stored form (diff pruning's phase 1, AdaLoRA before its final
    mask) tells the sweep only the later ones; the table's evaluations are the run's own."""
    def train(cfg, run_dir: Path, on_eval=None, **_):
        scores = CURVES[f"{cfg.trainer.lr:g}"]
        evals = [{"step": 10 * i, "metrics": {"val": {"accuracy": s}}} for i, s in enumerate(scores, start=1)]
        for e in evals[:2]:
            e["storable"] = False
        for e in evals[2:]:
            on_eval(e["step"], e["metrics"]["val"]["accuracy"])
        best = max(evals[2:], key=lambda e: e["metrics"]["val"]["accuracy"])
        return {"task": "rte", "family": "glue", "selected_on": "val", "metrics": best["metrics"],
                "selected_step": best["step"], "evals": evals, "steps": 40, "step_time_s": 0.1,
                "train_time_s": 1.0, "eval_time_s": 0.5, "stopped_at": None}

    monkeypatch.setattr(commands, "train", train)
    plan = plan_for(tmp_path)
    sweep.run(plan)
    study = sweep.open_study(plan, create=False)
    assert {len(t.intermediate_values) for t in study.trials} == {2}  # told 2 of 4
    assert {r["evals"] for r in sweep.rows(study)} == {4}


def plan_for(tmp_path: Path, *extra: str, recipe: str = "glue/rte_lora") -> sweep.SweepPlan:
    return sweep.parse([recipe, "model=tiny_random", "trainer.lr=1e-3,1e-2,1e-1", "trainer.epochs=4",
                        f"study={tmp_path / 'study'}", *extra])


def own_conf(tmp_path: Path, recipe: str) -> tuple[str, Path]:
    """A user's config folder on the searchpath, where write=true writes `recipe`: (the override, the file). Tests
    never write into the shipped recipes/ (a test stopped midway would leave a file there; two at once would clash)."""
    (tmp_path / "conf").mkdir(exist_ok=True)
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]", tmp_path / "conf" / "recipe" / f"{recipe}.yaml"


def test_the_hopeless_candidate_is_pruned_and_the_best_one_wins(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(commands, "train", fake_train(calls))
    plan = plan_for(tmp_path, "prune_after=2")
    sweep.run(plan)
    study = sweep.open_study(plan, create=False)
    rows = {r["params"]["trainer.lr"]: r for r in sweep.rows(study)}
    assert sorted(calls) == ["0.001", "0.01", "0.1"]
    assert rows["1e-1"]["state"] == "pruned" and rows["1e-1"]["evals"] == 2
    assert sweep.winner(study)["params"] == {"trainer.lr": "1e-2"}
    text = sweep.table(plan, study)
    assert "**chosen**" in text and "1 pruned" in text


def test_a_killed_sweep_resumes_without_redoing_finished_candidates(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(commands, "train", fake_train(calls))
    plan = plan_for(tmp_path, "pruner=none")
    study = sweep.open_study(plan, create=True)
    sweep.run_candidate(plan, study, {"trainer.lr": "1e-3"})  # finished before the kill
    killed = study.ask()  # a candidate that was running when the process died: nobody holds its run folder
    killed.set_user_attr("candidate", "lr1e-2")
    killed.set_user_attr("run_dir", str(plan.study / "runs" / "lr1e-2"))
    killed.set_user_attr("host", "elsewhere:1")
    calls.clear()
    sweep.run(sweep.parse(["study=" + str(plan.study)]))  # the recipe and grid come back from the study
    assert sorted(calls) == ["0.01", "0.1"]
    states = sorted(t.state.name for t in sweep.open_study(plan, create=False).get_trials())
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]


def test_the_winner_is_written_into_a_recipe_that_composes(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "train", fake_train([]))
    searchpath, made = own_conf(tmp_path, "glue/wnli_lora")
    kept = conf_dir() / "recipe" / "glue" / "rte_sdiff.yaml"
    before = kept.read_text()
    # the training subset every candidate saw is written with the winner; the backbone override is not
    args = ("write=true", "task.max_train_examples=48", "+method.head_lr=0.05", searchpath)
    sweep.run(plan_for(tmp_path, *args, recipe="glue/wnli_lora"))
    text = made.read_text()
    assert "chosen by selectune sweep on val" in text and "lr1e-1" in text
    cfg = compose("train", ["recipe=glue/wnli_lora", searchpath])
    assert cfg.trainer.lr == 0.01 and cfg.trainer.select == "best" and cfg.task.validation == 0.1
    assert cfg.trainer.epochs == 4 and cfg.method.name == "lora" and cfg.task.max_train_examples == 48
    assert cfg.method.head_lr == 0.05  # added with `+` on the command line, a plain key in the recipe
    assert not cfg.model.get("random_init", False) and "hydra" not in text
    sweep.run(plan_for(tmp_path, *args, recipe="glue/wnli_lora"))  # twice: one block
    assert made.read_text().count("  lr:") == 1 and made.read_text().count("chosen by") == 1
    assert kept.read_text() == before and not (conf_dir() / "recipe" / "glue" / "wnli_lora.yaml").exists()
    assert compose("train", ["recipe=glue/wnli_lora"]).trainer.lr == 5e-4  # without the folder: the preset's
    # two folders on the searchpath: the recipe is written where it is, not into the first
    first = tmp_path / "first"
    first.mkdir()
    both = f"hydra.searchpath=[file://{first},file://{tmp_path / 'conf'}]"
    sweep.run(plan_for(tmp_path, *args[:-1], both, "study=" + str(tmp_path / "s2"), recipe="glue/wnli_lora"))
    assert not any(first.iterdir()) and made.read_text().count("chosen by") == 1 and f"({tmp_path / 's2'})" in \
        made.read_text()
    # the note heads the section of the value searched, not that of the first value written (trainer.epochs)
    sweep.run(sweep.parse(["glue/wnli_lora", "model=tiny_random", "trainer.epochs=4", "trainer.lr=1e-2", searchpath,
                           "method.r=4,8", f"study={tmp_path / 'r'}", "write=true"]))
    lines = made.read_text().splitlines()
    assert lines[next(i for i, line in enumerate(lines) if "chosen by" in line) - 1] == "method:"
    made.unlink()
    # one value and nothing searched (an empty grid): written, the note with the first value written
    sweep.run(sweep.parse(["glue/wnli_lora", "model=tiny_random", "trainer.epochs=4", "trainer.lr=1e-2", searchpath,
                           f"study={tmp_path / 'one'}", "write=true"]))
    assert "  # chosen by selectune sweep on val" in made.read_text() and "  lr: 1e-2" in made.read_text()


def test_write_into_a_users_folder_refuses_a_shipped_recipes_name_before_training(tmp_path, monkeypatch):
    """The shipped recipes/ is read before a user's folder, so a winner written there under a shipped name would be
    ignored; a folder that is not there is a typo. Each refused when the sweep starts, nothing trained or written."""
    calls: list[str] = []
    monkeypatch.setattr(commands, "train", fake_train(calls))
    searchpath, made = own_conf(tmp_path, "glue/rte_lora")
    with pytest.raises(SelectuneError, match=r"glue/rte_lora is a shipped recipe's name, which is read before your "
                                             r"folder; sweep a copy \(selectune cp glue/rte_lora "):
        sweep.run(plan_for(tmp_path, "write=true", searchpath))
    assert calls == [] and not made.exists() and not (tmp_path / "study").exists()
    typo = f"hydra.searchpath=[file://{tmp_path / 'cnof'}]"
    with pytest.raises(SelectuneError, match=rf"hydra.searchpath names {tmp_path / 'cnof'}, which is not a folder "
                                             r"here"):
        sweep.run(plan_for(tmp_path, "write=true", typo, recipe="glue/wnli_lora"))
    assert calls == [] and not (tmp_path / "cnof").exists() and not (tmp_path / "study").exists()


def test_an_image_winner_is_written_without_the_sweeps_evaluation_cadence(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "train", fake_train([]))
    searchpath, made = own_conf(tmp_path, "vtab/svhn_lora")
    sweep.run(sweep.parse(["vtab/svhn_lora", "model=vit_micro_random", "trainer.lr=1e-3,1e-2,1e-1", searchpath,
                           "trainer.eval_every=null", f"study={tmp_path / 's'}", "write=true"]))
    cfg = compose("train", ["recipe=vtab/svhn_lora", searchpath])
    assert cfg.trainer.lr == 0.01 and cfg.trainer.select == "last" and "validation" not in cfg.task
    # the preset's cadence, not the sweep's per-epoch one: the final run scores test once, at the end
    assert "eval_every" not in made.read_text() and "chosen by selectune sweep on val200 (" in made.read_text()
    assert cfg.trainer.eval_every == compose("train", ["recipe=vtab/svhn_lora"]).trainer.eval_every


def test_a_choice_made_on_a_shorter_schedule_is_written_without_it(tmp_path, monkeypatch):
    """select_only: the candidates trained 4 epochs, the recipe keeps its preset's 100 and says where the lr came
    from; the study remembers the option, so a later write=true from its folder alone does the same."""
    monkeypatch.setattr(commands, "train", fake_train([]))
    searchpath, made = own_conf(tmp_path, "vtab/svhn_lora")
    sweep.run(sweep.parse(["vtab/svhn_lora", "model=vit_micro_random", "trainer.lr=1e-3,1e-2,1e-1", searchpath,
                           "trainer.epochs=4", "trainer.eval_every=null", f"study={tmp_path / 's'}",
                           "select_only=trainer.epochs", "write=true"]))
    cfg = compose("train", ["recipe=vtab/svhn_lora", searchpath])
    assert cfg.trainer.lr == 0.01 and cfg.trainer.epochs == 100  # the preset's schedule, not the sweep's
    assert "chosen by selectune sweep on val200 at trainer.epochs=4 (" in made.read_text()
    made.unlink()  # the study writes it again, from its folder alone
    sweep.run(sweep.parse([f"study={tmp_path / 's'}", "write=true"]))
    assert compose("train", ["recipe=vtab/svhn_lora", searchpath]).trainer.epochs == 100


def test_a_recipe_file_keeps_its_own_values_when_the_choice_is_written():
    text = (conf_dir() / "recipe" / "glue" / "rte_sdiff.yaml").read_text()
    out = sweep.set_in_yaml(sweep.set_in_yaml(text, "trainer", "lr", "1e-4", "chosen"), "task", "validation", "0.1")
    assert "  epochs: 8  # phase 1" in out and "  l0_weight: 6.25e-8" in out and "  lr: 1e-4" in out
    assert out.count("trainer:") == 1 and out.rstrip().endswith("validation: 0.1")
    # the value a line already holds, as the sweep writes it (6.25e-08 for 6.25e-8): the line and its why stay
    again = sweep.set_in_yaml(sweep.set_in_yaml(text, "method", "l0_weight", "6.25e-08"), "trainer", "epochs", "8")
    assert again == text
    moved = sweep.set_in_yaml(text, "method", "l0_weight", "1.25e-07")
    assert "  l0_weight: 1.25e-07\n" in moved and "closes RTE's gates" not in moved  # the why of the old value goes


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m selectune sweep ...` (a fork of the worker's pre-imported interpreter, as every CLI test's)."""
    return cli("sweep", *args, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    ([], "which recipe?"),
    (["glue/rte_lora", "trainer.seed=1,2"], "'trainer.seed' cannot be searched"),
    (["glue/rte_lora", "task.validation=0.2"], "the sweep sets task.validation"),
    (["glue/rte_lora", "trainer.lr=1e-3,1e-3"], "repeats or leaves out a value"),
    (["glue/rte_lora", "pruner=hyperband"], "pruner=hyperband: use median or none"),
    (["glue/rte_lora", "extend=two"], "extend=two: give a number of extension studies"),
    (["glue/rte_lora", "trainer.lr=1e-3,abc"], "trainer.lr"),
    (["glue/rte_lora", "select_only=trainer.batch_size"], "select_only=trainer.batch_size: not a fixed override"),
    (["glue/rte_lora", "trainer.learning_rate=1e-3,1e-2"], "unknown"),
])
def test_bad_sweeps_fail_in_one_line_and_write_nothing(data_env, tmp_path, args, message):
    done = run_cli(*args, f"study={tmp_path / 'study'}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "study").exists() and list(tmp_path.iterdir()) == []


def test_a_real_sweep_end_to_end(data_env, tmp_path):
    """Two candidates on a tiny random model: each trains on the carved split, dev is never scored, the table."""
    done = run_cli("glue/rte_lora", "model=tiny_random", "validation=16", "trainer.batch_size=16",
                   "trainer.lr=1e-3,1e-2", "trainer.epochs=2", f"study={tmp_path / 's'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 candidates done" in done.stdout
    for lr in ("1e-3", "1e-2"):
        results = json.loads((tmp_path / "s" / "runs" / f"lr{lr}" / "results.json").read_text())
        assert results["selection"] == "best" and results["selected_on"] == "val"
        assert set(results["metrics"]) == {"val"} and results["steps"] == 4
        assert not math.isnan(results["metrics"]["val"]["accuracy"])
    again = run_cli("study=" + str(tmp_path / "s"), "table=true", cwd=tmp_path)
    assert again.returncode == 0 and "**chosen**" in again.stdout
    shutil.rmtree(tmp_path / "s")


@pytest.mark.parametrize(("recipe", "extra", "selection", "long_schedule"), [
    ("glue/rte_lora", ["model=tiny_random"], ["task.validation=0.1", "task.score_dev=false"], True),
    ("causal/sst2_lora", ["model=tiny_llama_random"], ["task.validation=0.1", "task.score_dev=false"], False),
    ("vtab/dtd10_lora", ["model=vit_micro_random"], ["task.protocol=select"], False),
])
def test_each_family_chooses_on_a_held_out_split_and_never_loads_the_reported_one(
        recipe, extra, selection, long_schedule, data_env, tmp_path):
    from test_vtab import write_vtab

    from selectune.commands import RunSpec
    from selectune.tasks import load_task

    write_vtab(tmp_path, name="dtd10", classes=3, per_split=(12, 6, 6))
    plan = sweep.parse([recipe, *extra, "trainer.lr=1e-3,1e-2", f"study={tmp_path / 's'}"])
    overrides = sweep.candidate_overrides(plan, plan.points()[0], tmp_path / "run")
    assert [o for o in overrides if o.startswith("task.")] == selection
    # text gets one long schedule to choose its epoch from; images and decoders keep their recipe's
    assert any(o.startswith("trainer.epochs=") for o in plan.fixed) == long_schedule
    data = [] if plan.family != "vtab" else [f"task.data_root={tmp_path}"]
    spec = RunSpec.from_config(compose("train", [*overrides, *data]))
    assert set(load_task(spec.task).splits) == {"train", "val"}


def test_a_real_sweep_of_a_decoder_recipe(data_env, tmp_path):
    done = run_cli("causal/sst2_lora", "model=tiny_llama_random", "validation=16", "trainer.batch_size=8",
                   "trainer.eval_batch_size=16", "trainer.max_steps=4", "trainer.eval_every=2",
                   "task.max_train_examples=32", "trainer.lr=1e-3,1e-2", f"study={tmp_path / 's'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 candidates done" in done.stdout and "chosen on validation 16 of train" in done.stdout
    results = json.loads((tmp_path / "s" / "runs" / "lr1e-3" / "results.json").read_text())
    assert set(results["metrics"]) == {"val"} and results["family"] == "causal" and results["steps"] == 4
    # the chosen candidate is then scored on dev, which the sweep never looked at
    scored = commands.evaluate_delta(str(tmp_path / "s" / "runs" / "lr1e-3"), None, 16, "cpu", max_examples=16)
    assert set(scored["metrics"]) == {"val", "dev"} and scored["metrics"]["val"] == results["metrics"]["val"]


def test_plan_counts_each_candidates_steps_and_writes_nothing(data_env, tmp_path):
    done = run_cli("glue/rte_lora", "model=tiny_random", "trainer.batch_size=8", "trainer.lr=1e-3,1e-2",
                   "trainer.epochs=3", "validation=8", "plan=true", f"study={tmp_path / 's'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = sweep.parse(["glue/rte_lora", "model=tiny_random", "trainer.batch_size=8", "trainer.lr=1e-3,1e-2",
                        "trainer.epochs=3", "validation=8", f"study={tmp_path / 's'}"])
    steps = sweep.planned_steps(plan)
    from selectune.commands import RunSpec
    from selectune.tasks import load_task

    spec = RunSpec.from_config(compose("train", sweep.candidate_overrides(plan, plan.points()[0], tmp_path / "r")))
    per_epoch = -(-len(load_task(spec.task).splits["train"]) // 8)
    assert steps == {"lr1e-3": 3 * per_epoch, "lr1e-2": 3 * per_epoch}
    assert f"2 candidates, {6 * per_epoch:,} training steps at most" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_real_sweep_of_an_image_recipe_chooses_on_val200(data_env, tmp_path):
    from test_vtab import write_vtab

    write_vtab(tmp_path / "data", name="dtd10", classes=3, per_split=(12, 6, 6))
    done = run_cli("vtab/dtd10_lora", "model=vit_micro_random", "model.image_size=32", "trainer.batch_size=6",
                   "trainer.eval_batch_size=6", "trainer.epochs=2", "trainer.eval_every=null", "trainer.lr=1e-3,1e-2",
                   f"task.data_root={tmp_path / 'data'}", f"study={tmp_path / 's'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 candidates done" in done.stdout and "chosen on val200" in done.stdout
    results = json.loads((tmp_path / "s" / "runs" / "lr1e-3" / "results.json").read_text())
    assert set(results["metrics"]) == {"val"} and results["primary"] == "accuracy" and len(results["evals"]) == 2


def test_an_image_study_reopens_from_its_folder_alone(data_env, tmp_path):
    """The saved options of every study hold a validation value; reopening an image study must not take it
    for the user's (the refusal is for a validation= typed on an image recipe)."""
    plan = sweep.parse(["vtab/dtd10_lora", "model=vit_micro_random", "trainer.lr=1e-3,1e-2", f"study={tmp_path / 's'}"])
    sweep.open_study(plan, create=True)
    again = sweep.parse([f"study={tmp_path / 's'}"])
    assert again.family == "vtab" and again.recipe == "vtab/dtd10_lora" and again.selection == ["task.protocol=select"]
    with pytest.raises(SelectuneError, match="validation= is for text tasks"):
        sweep.parse(["vtab/dtd10_lora", "model=vit_micro_random", "validation=0.2", f"study={tmp_path / 't'}"])


def test_reading_a_study_leaves_its_journal_byte_identical(tmp_path, monkeypatch):
    """A committed journal read by `table=true` or a report must not change (a dirty tree after reading)."""
    monkeypatch.setattr(commands, "train", fake_train([]))
    plan = plan_for(tmp_path)
    sweep.run(plan)
    journal = tmp_path / "study" / sweep.JOURNAL
    before = journal.read_bytes()
    again = sweep.parse([f"study={tmp_path / 'study'}"])
    assert "**chosen**" in sweep.table(again, sweep.open_study(again, create=False))
    assert journal.read_bytes() == before
    sweep.run(sweep.parse([f"study={tmp_path / 'study'}"]))  # a finished sweep run again (to write its winner)
    assert journal.read_bytes() == before


def test_a_candidate_killed_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch):
    """Its folder holds a config and a few log lines but no checkpoint: train would refuse it as an unfinished
    run, so the sweep clears it (nobody holds it) and trains the candidate from the start."""
    plan = plan_for(tmp_path)
    stale = tmp_path / "study" / "runs" / "lr1e-2"
    stale.mkdir(parents=True)
    (stale / "config.yaml").write_text("trainer: {}\n")
    (stale / "metrics.jsonl").write_text('{"step": 10}\n')
    calls: list[str] = []
    fake = fake_train(calls)

    def train(cfg, run_dir, **kwargs):
        assert not run_dir.exists() or (run_dir / "checkpoint").exists(), f"{run_dir} left for train to refuse"
        return fake(cfg, run_dir, **kwargs)

    monkeypatch.setattr(commands, "train", train)
    sweep.run(plan)
    assert sorted(calls) == ["0.001", "0.01", "0.1"]


class Killed(Exception):
    """The process dying mid-run, as the sweep's caller sees it."""


def test_a_resumed_candidate_reports_the_evaluations_before_its_kill(data_env, tmp_path, monkeypatch):
    """A candidate killed after two evaluations resumes from its checkpoint in a new trial; that trial gets all four
    evaluations, numbered as the run made them, so the pruner compares its k-th with the other candidates' k-th
    (before, it held only the two after the resume, numbered 1 and 2)."""
    plan = sweep.parse(["glue/rte_lora", "model=tiny_random", "validation=16", "trainer.batch_size=16",
                        "trainer.lr=1e-2", "trainer.epochs=4", "pruner=none", f"study={tmp_path / 's'}"])
    real = commands.train

    def killed_at_the_third_evaluation(cfg, run_dir, on_eval=None, **kwargs):
        seen = []

        def told(step: int, score: float) -> bool:
            seen.append(step)
            if len(seen) == 3:  # after evaluation 2's checkpoint, before evaluation 3's
                raise Killed
            return on_eval(step, score)

        return real(cfg, run_dir, on_eval=told, **kwargs)

    monkeypatch.setattr(commands, "train", killed_at_the_third_evaluation)
    with pytest.raises(Killed):
        sweep.run(plan)
    monkeypatch.setattr(commands, "train", real)
    sweep.run(plan)
    from optuna.trial import TrialState
    trials = sweep.open_study(plan, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    results = json.loads((Path(trials[1].user_attrs["run_dir"]) / "results.json").read_text())
    scores = [e["metrics"]["val"]["accuracy"] for e in results["evals"]]
    assert len(scores) == 4
    told = trials[1].intermediate_values
    assert sorted(told) == [1, 2, 3, 4]
    assert [told[k] for k in (1, 2, 3, 4)] == [max(scores[:k]) for k in (1, 2, 3, 4)]


def test_the_schedule_ranking_takes_the_choice_a_cut_schedule_would_make():
    """scripts/analysis/schedule_ranking.py: at evaluation k only candidates that reached k compete, each by its
    best score up to k; the regret is read on the whole schedule, and a tie there loses nothing."""
    sys.path.insert(0, str(REPO / "scripts" / "analysis"))
    from schedule_ranking import early_choice, study_line

    found = {"a": {"scores": [50.0, 60.0, 70.0], "best": 70.0}, "b": {"scores": [65.0, 66.0, 67.0], "best": 67.0},
             "c": {"scores": [66.0], "best": 66.0}}  # c: pruned after its first evaluation
    assert [early_choice(found, k) for k in (1, 2, 3)] == ["c", "b", "a"]
    line, stable = study_line("s", found, "a")
    cells = [c.strip() for c in line.strip("|").split("|")][4:]
    assert cells[:3] == ["c (−4.00)"] * 3 and cells[3:6] == ["b (−3.00)"] * 3 and cells[6:] == ["="] * 4
    assert stable == 1.0
    found["b"] = {"scores": [65.0, 66.0, 70.0], "best": 70.0}  # b ties a on the whole schedule
    line, stable = study_line("s", found, "a")
    assert "b (tie)" in line and stable == 2 / 3  # from evaluation 2: c (evaluation 1) loses 4
    assert early_choice({"a": found["a"]}, 1) is None  # one candidate: no choice to compare


def test_the_short_schedule_comparison_reads_each_choice_on_the_long_schedule():
    """schedule_ranking.py --short: each schedule chooses by the sweep's rule (a pruned candidate is not chosen),
    the short choice is scored by what it got on the long schedule, and rho covers only values both finished."""
    sys.path.insert(0, str(REPO / "scripts" / "analysis"))
    from schedule_ranking import compare_line

    def row(score, state="complete", steps=50):
        return {"score": score, "state": state, "steps": steps, "selected_step": steps}

    short = {1e-3: row(60.0), 3e-3: row(70.0), 1e-2: row(65.0), 3e-2: row(40.0)}
    long = {1e-3: row(66.0, steps=100), 3e-3: row(72.0, steps=100), 1e-2: row(80.0, "pruned", 20),
            3e-2: row(30.0, steps=100)}
    line, same = compare_line("s", short, long)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "1e-03: 60.00 / 66.00, 3e-03: 70.00 / 72.00, 1e-02: 65.00 / 80.00p, 3e-02: 40.00 / 30.00"
    assert cells[2:5] == ["3e-03", "3e-03", "0"] and same is True  # the pruned 1e-2 is not the long choice
    assert cells[5] == "+1.00 (3)" and cells[6] == "200 / 320"
    long[3e-3] = row(64.0, steps=100)  # now the long schedule chooses 1e-3; the short choice loses 2 there
    line, same = compare_line("s", short, long)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:5] == ["3e-03", "1e-03", "−2.00"] and same is False and cells[5] == "+0.50 (3)"
    del long[3e-3]  # the short choice never ran on the long schedule
    assert "not run long" in compare_line("s", short, long)[0]


def test_cpu_time_sums_the_studies_and_the_runs_apart(tmp_path, monkeypatch):
    """scripts/analysis/cpu_time.py: each study's finished and pruned candidates, and the runs outside a study,
    with training and evaluation seconds apart; a run without eval_time_s is counted as not recorded."""
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "analysis"))
    from cpu_time import run_part, study_parts, table

    monkeypatch.setattr(commands, "train", fake_train([]))
    sweep.run(plan_for(tmp_path / "sweeps", "prune_after=2"))  # 1e-1 pruned after 2 of 4 evaluations
    candidate = tmp_path / "sweeps" / "study" / "runs" / "lr1e-3"
    candidate.mkdir(parents=True)
    (candidate / "results.json").write_text(json.dumps({"steps": 40, "train_time_s": 1.0}))  # counted in the study
    for name, record in (("a_s42", {"steps": 100, "train_time_s": 3600.0, "eval_time_s": 1800.0}),
                         ("b_s42", {"steps": 50, "train_time_s": 1800.0})):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(record))
    [study] = study_parts(tmp_path / "sweeps", "")
    assert (study.items, study.steps, study.train_s, study.eval_s, study.eval_missing) == (3, 100, 3.0, 1.5, 0)
    assert run_part(tmp_path / "sweeps", "") is None
    runs = run_part(tmp_path / "runs", "")
    assert (runs.items, runs.steps, runs.train_s, runs.eval_s, runs.eval_missing) == (2, 150, 5400.0, 1800.0, 1)
    assert run_part(tmp_path / "runs", "a_").items == 1 and study_parts(tmp_path / "sweeps", "other") == []
    text = table([study, runs], planned_hours=4)
    assert "**2.0 CPU-hours**" in text and "5 candidates and runs, 250 steps" in text
    assert "1 of them ran before evaluation time was recorded" in text and "(50% of it spent)" in text


@pytest.mark.parametrize("grid, note", [
    ("1e-3,1e-2", "the chosen trainer.lr=1e-2 is the top of the values tried; the best may lie above it: "
                  "selectune sweep glue/rte_lora model=tiny_random trainer.epochs=4 trainer.lr=0.1 pruner=none "
                  "study={study}_hi  (or extend=1)"),
    ("1e-2,1e-1", "the chosen trainer.lr=1e-2 is the bottom of the values tried; the best may lie below it: "
                  "selectune sweep glue/rte_lora model=tiny_random trainer.epochs=4 trainer.lr=0.001 pruner=none "
                  "study={study}_lo  (or extend=1)"),
    ("1e-3,1e-2,1e-1", None)])
def test_a_winner_at_an_end_of_its_grid_says_what_to_try_next(tmp_path, monkeypatch, grid, note):
    """Once every candidate is in, a winner at the top (bottom) of a numeric grid gets a note and the sweep of
    one more value a grid step beyond it, with the same fixed overrides, in its own study."""
    monkeypatch.setattr(commands, "train", fake_train([]))
    plan = sweep.parse(["glue/rte_lora", "model=tiny_random", f"trainer.lr={grid}", "trainer.epochs=4",
                        f"study={tmp_path / 'study'}", "pruner=none"])
    sweep.run(plan)
    text = sweep.table(plan, sweep.open_study(plan, create=False))
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert notes == ([] if note is None else ["note: " + note.format(study=tmp_path / "study")])
    assert sweep.edge_note(plan, "trainer.lr", {"trainer.lr": "x"}, ["x", "1e-2"], set()) == ""  # not a number


def test_the_edge_note_on_zero_integer_and_two_key_grids(tmp_path):
    """No note where a ratio means nothing (a zero, a non-finite value); an integer grid steps to an integer; two
    keys at their ends get two studies, not one name twice."""
    plan = sweep.parse(["glue/rte_lora", "model=tiny_random", "trainer.lr=1e-3,1e-2", "method.r=4,8",
                        f"study={tmp_path / 's'}"])
    note = sweep.edge_note
    assert note(plan, "trainer.lr", {"trainer.lr": "0.1"}, ["0", "0.1"], set()) == ""
    assert note(plan, "trainer.lr", {"trainer.lr": "1e-2"}, ["nan", "1e-2"], set()) == ""
    taken: set = set()
    r = note(plan, "method.r", {"trainer.lr": "1e-2", "method.r": "8"}, ["4", "8"], taken)
    lr = note(plan, "trainer.lr", {"trainer.lr": "1e-2", "method.r": "8"}, ["1e-3", "1e-2"], taken)
    assert r.endswith(f"trainer.lr=1e-2 method.r=16 study={tmp_path / 's_hi'}  (or extend=1)")
    assert lr.endswith(f"method.r=8 trainer.lr=0.1 study={tmp_path / 's_hi2'}  (or extend=1)")
    assert note(plan, "method.r", {"trainer.lr": "1e-2", "method.r": "2"}, ["2", "3"], set()).endswith(
        f"method.r=1 study={tmp_path / 's_lo'}  (or extend=1)")
    assert note(plan, "method.r", {"trainer.lr": "1e-2", "method.r": "1"}, ["1", "2"], set()) == ""  # not r=0


def test_write_takes_the_best_of_the_study_and_the_studies_that_extend_its_grid(tmp_path, monkeypatch, capsys):
    """A grid extended beside its study (`<study>_hi`, as the edge note says) is one search for write=true: the
    winner over both, every candidate in the comment; a study so named with other settings is left out."""
    monkeypatch.setattr(commands, "train", fake_train([]))
    monkeypatch.setitem(CURVES, "0.03", [63.0, 68.0, 72.0, 73.0])
    searchpath, made = own_conf(tmp_path, "glue/wnli_lora")
    assert not made.exists()
    base = ["glue/wnli_lora", "model=tiny_random", "trainer.epochs=4", "pruner=none", searchpath]
    sweep.run(sweep.parse([*base, "trainer.lr=1e-3,1e-2", f"study={tmp_path / 's'}"]))
    sweep.run(sweep.parse([*base, "trainer.lr=3e-2", f"study={tmp_path / 's_hi'}"]))
    sweep.run(sweep.parse([*base, "trainer.lr=1e-1", "trainer.warmup_ratio=0.2", f"study={tmp_path / 's_hi2'}"]))
    sweep.run(sweep.parse([f"study={tmp_path / 's'}", "write=true"]))
    assert f"{tmp_path / 's_hi2'} is not an extension of {tmp_path / 's'}" in capsys.readouterr().out
    assert compose("train", ["recipe=glue/wnli_lora", searchpath]).trainer.lr == 0.03
    [comment] = [line for line in made.read_text().splitlines() if "chosen by" in line]
    assert f"({tmp_path / 's'}, {tmp_path / 's_hi'}): lr1e-3 67.00, lr1e-2 71.00, lr3e-2 73.00" in comment
    # the winner over both sits at the top again: the next value, in the next free name (s_hi2 is taken)
    plan = sweep.parse([f"study={tmp_path / 's'}"])
    [note] = [line for line in sweep.table(plan, sweep.open_study(plan, create=False)).splitlines()
              if line.startswith("note:")]
    assert note.endswith(f"trainer.lr=0.09 pruner=none study={tmp_path / 's_hi3'}  (or extend=1)")
    assert "trainer.lr=3e-2 is the top" in note
    base_table = sweep.table(plan, sweep.open_study(plan, create=False))
    assert "**chosen**" not in base_table  # the choice is the extension's candidate, named below the rows
    assert f"chosen over this study and its extensions: lr3e-2 in {tmp_path / 's_hi'} (73.00)" in base_table
    hi = sweep.parse([f"study={tmp_path / 's_hi'}"])  # an extension's own table leaves the choice to its base
    text = sweep.table(hi, sweep.open_study(hi, create=False))
    assert f"(extends {tmp_path / 's'}: its table chooses over both)" in text and "note:" not in text
    made.unlink()
    sweep.run(sweep.parse([f"study={tmp_path / 's_hi'}", "write=true"]))  # through the extension: the same
    assert compose("train", ["recipe=glue/wnli_lora", searchpath]).trainer.lr == 0.03
    assert f"({tmp_path / 's'}, {tmp_path / 's_hi'}): lr1e-3" in made.read_text()


def test_the_notes_command_carves_the_same_split_and_pastes_into_a_shell(tmp_path, monkeypatch):
    """The note's command is run as printed: it keeps the study's own validation= (else its study is not an
    extension: another split) and pruner, and quotes what a shell would glob (zsh refuses an unmatched [...])."""
    import shlex

    monkeypatch.setattr(commands, "train", fake_train([]))
    searchpath, _ = own_conf(tmp_path, "glue/wnli_lora")
    base = ["glue/wnli_lora", "model=tiny_random", "trainer.epochs=4", searchpath]
    sweep.run(sweep.parse([*base, "trainer.lr=1e-3,1e-2", "validation=0.2", "pruner=none", f"study={tmp_path / 's'}"]))
    plan = sweep.parse([f"study={tmp_path / 's'}"])
    [note] = [line for line in sweep.table(plan, sweep.open_study(plan, create=False)).splitlines()
              if line.startswith("note:")]
    command = note.split(": ", 2)[2].removesuffix("  (or extend=1)")
    assert f"'{searchpath}'" in command and "validation=0.2 pruner=none" in command
    words = shlex.split(command)
    assert words[:2] == ["selectune", "sweep"] and searchpath in words
    sweep.run(sweep.parse(words[2:]))
    assert [e.study for e in sweep.extensions(plan)] == [tmp_path / "s_hi"]


def test_write_keeps_every_grid_key_and_a_lo_extension_that_sets_them(tmp_path, monkeypatch):
    """write=true writes each grid key of the winner, whatever its section (task.max_train_examples here), as it
    did before extensions; a `_lo` study that sets every grid key extends the study, one that leaves a grid key
    to the recipe's default does not (its winner would leave a stale value in the recipe)."""
    monkeypatch.setattr(commands, "train", fake_train([]))
    searchpath, made = own_conf(tmp_path, "glue/wnli_lora")
    assert not made.exists()
    base = ["glue/wnli_lora", "model=tiny_random", "trainer.epochs=4", "pruner=none", searchpath]
    sweep.run(sweep.parse([*base, "trainer.lr=1e-2,1e-1", "task.max_train_examples=40,48",
                           f"study={tmp_path / 's'}"]))
    sweep.run(sweep.parse([*base, "trainer.lr=1e-3", "task.max_train_examples=48", f"study={tmp_path / 's_lo'}"]))
    sweep.run(sweep.parse([*base, "trainer.lr=1e-3", f"study={tmp_path / 's_lo2'}"]))  # leaves one key out
    plan = sweep.parse([f"study={tmp_path / 's'}"])
    assert [e.study for e in sweep.extensions(plan, quiet=True)] == [tmp_path / "s_lo"]
    sweep.run(sweep.parse([f"study={tmp_path / 's'}", "write=true"]))
    cfg = compose("train", ["recipe=glue/wnli_lora", searchpath])
    assert cfg.trainer.lr == 0.01 and cfg.task.max_train_examples == 40  # the tie: the fewer steps, then first


def test_extend_runs_the_extensions_while_the_choice_sits_at_an_end(tmp_path, monkeypatch):
    """extend=N: after the grid, one value beyond the winner in its own study, again while the winner (over all)
    sits at an end, N times at most; the base's table then chooses over all of them."""
    calls: list[str] = []
    monkeypatch.setattr(commands, "train", fake_train(calls))
    monkeypatch.setitem(CURVES, "1", [70.0, 72.0, 74.0, 75.0])  # better again above 1e-1
    monkeypatch.setitem(CURVES, "0.1", [64.0, 70.0, 72.0, 72.5])  # better than 1e-2's 71
    monkeypatch.setitem(CURVES, "10", [50.0, 50.0, 50.0, 50.0])  # too far
    plan = sweep.parse(["glue/rte_lora", "model=tiny_random", "trainer.lr=1e-3,1e-2", "trainer.epochs=4",
                        "pruner=none", "extend=1", f"study={tmp_path / 's'}"])
    sweep.run(plan)
    assert calls == ["0.001", "0.01", "0.1"]  # one extension: 1e-1 won it, so the next would be 1
    sweep.run(sweep.parse([f"study={tmp_path / 's'}", "extend=3"]))  # the same study again, more steps allowed
    assert calls == ["0.001", "0.01", "0.1", "1", "10"]  # 1 won, so 10; 10 lost: 1 is inside, it stops
    assert [e.study.name for e in sweep.extensions(plan, quiet=True)] == ["s_hi", "s_hi2", "s_hi3"]
    text = sweep.table(plan, sweep.open_study(plan, create=False))
    assert f"chosen over this study and its extensions: lr1 in {tmp_path / 's_hi2'} (75.00)" in text
    assert "note:" not in text


def test_an_extension_left_unfinished_is_finished_by_extend_and_blocks_write(tmp_path, monkeypatch):
    """A killed extend= call leaves its extension with a value tried and not scored: write=true refuses until it is
    scored (it may be the winner), and extend=N finishes it before anything else (it used to stop there, and
    write=true then chose without it)."""
    calls: list[str] = []
    train = fake_train(calls)

    def killed_once(cfg, run_dir: Path, on_eval=None, **kw):
        if f"{cfg.trainer.lr:g}" == "0.1" and "0.1 killed" not in calls:
            calls.append("0.1 killed")
            raise KeyboardInterrupt
        return train(cfg, run_dir, on_eval=on_eval, **kw)

    monkeypatch.setattr(commands, "train", killed_once)
    monkeypatch.setitem(CURVES, "0.1", [64.0, 70.0, 72.0, 72.5])  # the extension wins once it is scored
    monkeypatch.setitem(CURVES, "1", [50.0, 50.0, 50.0, 50.0])
    searchpath, made = own_conf(tmp_path, "glue/wnli_lora")
    assert not made.exists()
    study = tmp_path / "s"
    base = ["glue/wnli_lora", "model=tiny_random", "trainer.epochs=4", "pruner=none", searchpath]
    with pytest.raises(KeyboardInterrupt):
        sweep.run(sweep.parse([*base, "trainer.lr=1e-3,1e-2", "extend=1", f"study={study}"]))
    assert calls == ["0.001", "0.01", "0.1 killed"] and (tmp_path / "s_hi" / "study.journal").is_file()
    with pytest.raises(SelectuneError, match=rf"{tmp_path / 's_hi'} extends {study} and has candidates not "
                                             r"finished: finish them first"):
        sweep.run(sweep.parse([f"study={study}", "write=true"]))
    assert not made.exists()
    sweep.run(sweep.parse([f"study={study}", "extend=1", "write=true"]))
    assert calls[3:] == ["0.1", "1"]  # the extension first; 1e-1 won it, so extend=1 then tries 1, which loses
    assert compose("train", ["recipe=glue/wnli_lora", searchpath]).trainer.lr == 0.1
    assert f"({study}, {tmp_path / 's_hi'}" in made.read_text()


def test_patience_check_stops_as_the_trainer_does():
    """scripts/analysis/patience_check.py: a run stops once `patience` evaluations in a row beat no best (a tie is
    no new best), as trainer.patience does."""
    sys.path.insert(0, str(REPO / "scripts" / "analysis"))
    from patience_check import stop_after

    assert stop_after([1.0, 2.0, 2.0, 1.0, 3.0], 2) == 4  # 2.0 ties, 1.0 below: two without a new best
    assert stop_after([1.0, 2.0, 3.0], 2) == 3 and stop_after([5.0, 1.0, 1.0, 9.0], 3) == 4


def test_extensions_are_found_from_a_relative_study_path(tmp_path, monkeypatch):
    """The note's study name, the extension search and the base of an extension hold for `study=s` typed from the
    folder it lives in, as for an absolute path."""
    calls: list[str] = []
    monkeypatch.setattr(commands, "train", fake_train(calls))
    monkeypatch.chdir(tmp_path)
    plan = sweep.parse(["glue/rte_lora", "model=tiny_random", "trainer.lr=1e-3,1e-2", "trainer.epochs=4",
                        "pruner=none", "extend=1", "study=s"])
    sweep.run(plan)
    assert calls == ["0.001", "0.01", "0.1"] and (tmp_path / "s_hi" / "study.journal").is_file()
    assert [e.study for e in sweep.extensions(plan, quiet=True)] == [Path("s_hi")]
    assert sweep.extended(sweep.parse(["study=s_hi"])) == Path("s")
