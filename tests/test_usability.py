"""What a new user trips on (issue 37), each through the real CLI: finding the run just made, eval that says
what it scored, recipes to copy and filter, a positional recipe for train."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import TINY, run_cli

QUICK = [*TINY, "trainer.max_steps=2"]


def one_error(result, *patterns: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selectune: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def two_runs(glue_root, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Two finished runs of one recipe in its default timestamped folders, made as a user makes them: the
    folder each printed as its last stdout line."""
    cwd = tmp_path_factory.mktemp("user")
    made = []
    for seed, stamp in ((1, "20260101-000000"), (2, "20260101-000100")):
        result = run_cli("train", "glue/rte_bitfit", *QUICK, f"trainer.seed={seed}", f"out_dir=runs/rte_bitfit/{stamp}",
                         cwd=cwd, env={"SELECTUNE_DATA": str(glue_root)})
        assert result.returncode == 0, result.stderr
        made.append(Path(result.stdout.strip().splitlines()[-1]))  # train's last line: its run folder
    return cwd, made


def test_train_takes_a_positional_recipe_and_prints_its_folder_last(two_runs):
    cwd, made = two_runs
    assert made == [Path("runs/rte_bitfit/20260101-000000"), Path("runs/rte_bitfit/20260101-000100")]
    assert all((cwd / run / "results.json").is_file() for run in made)


def test_eval_and_export_take_the_newest_finished_run_of_a_recipe_folder(two_runs, glue_root):
    cwd, made = two_runs
    (cwd / "runs/rte_bitfit/20260101-000200").mkdir()  # an unfinished (killed) run is never taken
    (cwd / "runs/rte_bitfit/20260101-000200/config.yaml").write_text("{}\n")
    env = {"SELECTUNE_DATA": str(glue_root)}
    result = run_cli("eval", "run=runs/rte_bitfit", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    assert f"eval: using {made[1]} (newest of 2 finished runs)" in result.stderr
    assert (cwd / made[1] / "eval_rte.json").is_file() and not (cwd / made[0] / "eval_rte.json").exists()
    result = run_cli("export", "run=runs/rte_bitfit", "out=merged", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    assert f"export: using {made[1]}" in result.stderr and (cwd / "merged" / "config.json").is_file()
    config = json.loads((cwd / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    card = (cwd / "merged" / "README.md").read_text()
    assert card.startswith("# rte · bitfit on ") and f"run `{made[1]}`" in card
    assert "Labels (id: name): 0: entailment, 1: not_entailment" in card and "| dev | accuracy |" in card
    (cwd / "empty").mkdir()
    one_error(run_cli("eval", "run=empty", cwd=cwd, env=env), "no task delta at empty and no finished run below it")


def test_eval_scores_the_whole_split_and_says_how_many(two_runs, glue_root, tmp_path):
    cwd, made = two_runs
    env = {"SELECTUNE_DATA": str(glue_root)}
    # a quick run scored 8 dev examples; eval scores all 48 unless told
    result = run_cli("train", "glue/rte_bitfit", *QUICK, "task.max_eval_examples=8", "out_dir=quick", cwd=tmp_path,
                     env=env)
    assert result.returncode == 0, result.stderr
    result = run_cli("eval", "run=quick", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rte · bitfit · dev 48 examples (whole split) · dev: accuracy "), result.stdout
    whole = json.loads((tmp_path / "quick" / "eval_rte.json").read_text())
    assert whole["examples"] == {"dev": 48} and whole["max_eval_examples"] is None
    result = run_cli("eval", "run=quick", "max_eval_examples=8", cwd=tmp_path, env=env)
    assert "rte · bitfit · dev 8 examples (first 8 at most) · " in result.stdout, result.stderr
    first = json.loads((tmp_path / "quick" / "eval_rte_first8.json").read_text())
    trained = json.loads((tmp_path / "quick" / "results.json").read_text())
    assert first["metrics"] == trained["metrics"]  # the same 8 examples, the same number
    assert json.loads((tmp_path / "quick" / "eval_rte.json").read_text()) == whole  # never overwritten by a part


def test_eval_refuses_another_task_unless_forced(two_runs, glue_root):
    cwd, made = two_runs
    env = {"SELECTUNE_DATA": str(glue_root)}
    one_error(run_cli("eval", f"run={made[0]}", "task=glue/mrpc", cwd=cwd, env=env),
              "this delta was trained on rte, not mrpc", "force=true")
    result = run_cli("eval", f"run={made[0]}", "task=glue/mrpc", "force=true", cwd=cwd, env=env)
    assert result.returncode == 0 and result.stdout.startswith("mrpc · bitfit · dev 48 examples"), result.stderr


def test_ls_honours_its_filter(tmp_path):
    result = run_cli("ls", "mrpc", "lora", cwd=tmp_path)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("glue/")]
    assert names == ["glue/mrpc_adalora", "glue/mrpc_lora", "glue/mrpc_spt_lora"], result.stdout
    result = run_cli("ls", "glue/*_sdiff", cwd=tmp_path)
    assert "9 recipes" in result.stdout and "glue/rte_sdiff " in result.stdout
    one_error(run_cli("ls", "nothing_like_it", cwd=tmp_path), "no recipe matches nothing_like_it")


def test_cp_writes_a_recipe_usable_at_once(data_env, tmp_path):
    result = run_cli("cp", "glue/rte_lora", "conf/recipe/mine/rte.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "conf/recipe/mine/rte.yaml"
    assert path.read_text().startswith("# @package _global_\n")
    train_line = result.stdout.strip().splitlines()[-1].strip()
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    assert train_line == f"selectune train recipe=mine/rte '{searchpath}'"
    edited, n = re.subn(r"(?m)^  lr: .*$", "  lr: 1.0e-3", path.read_text())  # the user edits trainer.lr
    assert n == 1
    path.write_text(edited)
    result = run_cli("cat", "mine/rte", searchpath, cwd=tmp_path)
    assert "lr: 0.001" in result.stdout and "name: rte" in result.stdout and "name: lora" in result.stdout
    result = run_cli("train", "recipe=mine/rte", searchpath, *QUICK, "out_dir=mine_run", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "mine_run", result.stderr
    one_error(run_cli("cp", "glue/rte_lora", "conf/recipe/mine/rte.yaml", cwd=tmp_path), "already exists")
    one_error(run_cli("cp", "glue/rte_lora", "rte.yaml", cwd=tmp_path), "below a folder named recipe/")
    one_error(run_cli("cp", "glue/rte_lorra", "conf/recipe/x.yaml", cwd=tmp_path), "did you mean glue/rte_lora")
    assert not (tmp_path / "conf/recipe/x.yaml").exists() and not (tmp_path / "rte.yaml").exists()


def test_a_copy_under_a_recipes_own_name(data_env, tmp_path):
    """A composed name (glue/wnli_lora: a preset and a task, no file) can be taken by a user's file, which is then
    what runs; a shipped file's name cannot (the shipped folder is read first: the copy's edits would be ignored),
    whether made by cp or by hand; a searchpath folder that is not there (a typo) is refused, not warned about."""
    result = run_cli("cp", "glue/wnli_lora", "conf/recipe/glue/wnli_lora.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "conf/recipe/glue/wnli_lora.yaml"
    path.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: 1.0e-3", path.read_text()))
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    assert "lr: 0.001" in run_cli("cat", "glue/wnli_lora", searchpath, cwd=tmp_path).stdout
    assert "lr: 0.001" not in run_cli("cat", "glue/wnli_lora", cwd=tmp_path).stdout
    one_error(run_cli("cp", "glue/rte_lora", "conf/recipe/glue/rte_lora.yaml", cwd=tmp_path),
              "glue/rte_lora is a shipped recipe's name, which is read before your folder: name the copy otherwise "
              "(e.g. conf/recipe/mine/rte_lora.yaml)")
    assert not (tmp_path / "conf/recipe/glue/rte_lora.yaml").exists()
    (tmp_path / "conf/recipe/glue/rte_lora.yaml").write_text(path.read_text())  # by hand
    one_error(run_cli("train", "recipe=glue/rte_lora", searchpath, *QUICK, "out_dir=r", cwd=tmp_path),
              f"{tmp_path / 'conf/recipe/glue/rte_lora.yaml'} has the name of a shipped recipe, which is read first: "
              "rename it (e.g. mine/rte_lora)")
    assert not (tmp_path / "r").exists()
    one_error(run_cli("cat", "glue/wnli_lora", "hydra.searchpath=[file://cnof]", cwd=tmp_path),  # a typo
              "hydra.searchpath names cnof, which is not a folder here")


def test_validate_prints_the_expected_wall_time_per_phase(data_env, tmp_path):
    result = run_cli("validate", "glue/rte_sdiff", *TINY, "trainer.max_steps=10", "method.phase1_share=0.4",
                     cwd=tmp_path, fresh=True)  # a cold process, whose first steps pay their one-offs, as a user's
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"expected wall time: (.+) on cpu \(setup (.+) \+ phase 1 4 steps × ([\d.]+) s \+ "
                         r"phase 2 6 steps × ([\d.]+) s \+ first steps and projection (.+) \+ 2 evaluations × (.+)\)",
                         line)
    assert match and float(match[3]) > 0 and float(match[4]) > 0, line
    result = run_cli("validate", "glue/rte_lora", *TINY, "trainer.epochs=3", cwd=tmp_path)  # 3 × 6 steps
    assert re.search(r"\(setup .+ \+ train 18 steps × [\d.]+ s( \+ first steps .+)? \+ 3 evaluations × .+\)$",
                     result.stdout.strip()), result.stdout
    assert not (tmp_path / "runs").exists()


def test_log_lines_outside_a_terminal_say_phase_elapsed_and_eta(data_env, tmp_path):
    result = run_cli("train", "glue/rte_sdiff", *TINY, "trainer.progress=true", "trainer.max_steps=8",
                     "method.phase1_share=0.5", "trainer.log_every=2", "out_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = [line for line in result.stderr.splitlines() if line.startswith("step ") and "/8" in line]
    assert len(logged) == 4, result.stderr
    assert re.fullmatch(r"step 2/8 · phase 1 · loss [\d.]+ · lr \S+ · [\d.]+ ex/s · elapsed [\d.]+ s · ETA [\d.]+ s",
                        logged[0]), logged[0]
    assert " · phase 2 · " in logged[-1] and logged[-1].endswith("ETA 0.0 s")
    assert "nan" not in result.stderr  # the bar shows no loss before it has one
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["step_time_s_by_phase"]) == {"1", "2"} and all(
        v > 0 for v in results["step_time_s_by_phase"].values())


def test_a_checkpoint_minutes_value_must_be_positive(data_env, tmp_path):
    one_error(run_cli("validate", "glue/rte_lora", *TINY, "trainer.checkpoint_minutes=0", cwd=tmp_path),
              "trainer.checkpoint_minutes must be positive")


def test_grad_accum_takes_the_same_steps_in_smaller_passes(data_env, tmp_path):
    """The same batches and schedule: the delta matches the one-pass run's to float rounding (dropout off, so
    both see the same function)."""
    from selectune.delta.taskdelta import TaskDelta

    no_dropout = ["+model.config_overrides.hidden_dropout_prob=0.0",
                  "+model.config_overrides.attention_probs_dropout_prob=0.0"]
    for name, accum in (("one", 1), ("four", 4)):
        result = run_cli("train", "glue/rte_bitfit", *QUICK, *no_dropout, f"trainer.grad_accum={accum}",
                         f"out_dir={name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    one, four = (TaskDelta.load(tmp_path / name).tensors for name in ("one", "four"))
    assert one.keys() == four.keys()
    assert all((one[k].float() - four[k].float()).abs().max() < 1e-5 for k in one)
    one_error(run_cli("validate", "glue/rte_bitfit", *TINY, "trainer.grad_accum=9", cwd=tmp_path),
              "trainer.grad_accum=9 splits each batch of trainer.batch_size=8 rows")


def test_patience_stops_on_the_validation_split_only(data_env, tmp_path):
    one_error(run_cli("train", "glue/rte_bitfit", *TINY, "trainer.patience=1", cwd=tmp_path),
              "trainer.patience stops on the validation split, and this run has none: add task.validation=0.1")
    assert not (tmp_path / "runs").exists()
    # lr 0: nothing changes, so the second evaluation cannot beat the first
    result = run_cli("train", "glue/rte_bitfit", *TINY, "trainer.patience=1", "task.validation=8", "trainer.epochs=5",
                     "trainer.lr=1e-12", "out_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "early stop at step 10: no better val accuracy in 1 evaluations (trainer.patience)" in result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stopped_early"] == 10 and results["steps"] == 10 and len(results["evals"]) == 2


def test_report_pair_takes_a_method_name_for_its_one_labelled_row(tmp_path):
    from test_report import fake_run

    from selectune.report import _pair_label

    assert _pair_label("lora", {"full", "lora (trainer.lr=0.001)"}) == "lora (trainer.lr=0.001)"
    runs = tmp_path / "runs"
    for seed in (1, 2):
        fake_run(runs / f"f{seed}", "mrpc", "full", seed, {"f1": 85.0 + seed, "accuracy": 70.0}, 10**6)
        for r in (4, 16):
            fake_run(runs / f"l{seed}_{r}", "mrpc", "lora", seed, {"f1": 84.0, "accuracy": 70.0}, 5000,
                     config={"method": {"name": "lora", "r": r}, "trainer": {"lr": 5e-4}})
    one_error(run_cli("report", str(runs), "pair=full:lora", cwd=tmp_path),
              "report: pair label 'lora' fits 2 labels; give one whole: 'lora (r=16)', 'lora (r=4)'")
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", "pair=full:lora (r=16)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| full − lora (r=16) | +2.50 ± 0.71" in (tmp_path / "rep" / "report.md").read_text()


def test_output_a_person_reads(data_env, tmp_path):
    result = run_cli("train", "glue/rte_sara", *QUICK, "out_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = result.stderr.replace("\n", " ")
    assert re.search(r"head 130\) · selected [\d,]+ · max selected abs weight [\d.]+ · mask hashes [0-9a-f]{12} ",
                     header), header  # not raw JSON
    assert '{"' not in header and "['" not in header
    log = (tmp_path / "run" / "train.log").read_text()
    assert "budget: " in log and "step 2: dev: accuracy" in log and "done · last (step 2)" in log
    assert not log.rstrip().endswith("{}")
    one_error(run_cli("validate", "glue/rte_lora", *TINY, "trainer.learning_rate=1e-3", cwd=tmp_path),
              "unknown config key 'trainer.learning_rate': did you mean trainer.lr?")
    one_error(run_cli("validate", "glue/rte_lora", *TINY, "method.rank=4", cwd=tmp_path), "did you mean method.r?")


def test_report_curves_get_a_panel_per_task_and_one_point_runs_show(tmp_path):
    import struct

    from test_report import fake_run

    runs = tmp_path / "runs"
    fake_run(runs / "a", "mrpc", "lora", 1, {"f1": 80.0, "accuracy": 70.0}, 5000)
    fake_run(runs / "b", "stsb", "lora", 1, {"pearson": 80.0, "spearman": 79.0}, 5000)
    (runs / "b" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 4.5}) + "\n")  # one point
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def width(name: str) -> int:
        return struct.unpack(">I", (tmp_path / "rep" / name).read_bytes()[16:20])[0]

    assert width("training_curves.png") > 2 * 4.5 * 120 * 0.8  # two panels of 4.5 inches at 120 dpi


def test_report_gives_seconds_per_step_per_phase(tmp_path):
    from test_report import fake_run

    runs = tmp_path / "runs"
    for seed, (one, two) in ((1, (0.6, 0.2)), (2, (0.8, 0.4))):
        fake_run(runs / f"s{seed}", "mrpc", "sdiff", seed, {"f1": 80.0, "accuracy": 70.0}, 5000)
        results = json.loads((runs / f"s{seed}" / "results.json").read_text())
        (runs / f"s{seed}" / "results.json").write_text(json.dumps({**results, "step_time_s_by_phase": {
            "1": one, "2": two}}))
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| 0.50 (phase 1: 0.70, phase 2: 0.30) |" in (tmp_path / "rep" / "report.md").read_text()


def test_peft_export_leaks_no_warning(data_env, tmp_path):
    result = run_cli("train", "glue/rte_lora", *TINY, "trainer.max_steps=1", "out_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli("export", "run=run", "out=peft", "format=peft", cwd=tmp_path)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert result.stdout.startswith("exported lora delta on ")


def test_probe_log_holds_what_the_probe_printed(data_env, tmp_path):
    result = run_cli("probe", "glue/rte_bitfit", *TINY, "probe.batches=2", "out_dir=probe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "probe" / "probe.log").read_text()
    assert "rte · grad2 · share of the top-" in log and "layer 0 " in log and "wrote sensitivity.safetensors" in log
