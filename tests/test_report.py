"""`selectune report` on hand-made runs: the numbers in the table are the right ones."""

from __future__ import annotations

import json

from conftest import run_cli


def fake_run(folder, task, method, seed, metrics, stored, delta_bytes=1000, config=None, split="dev", family=None,
             predictions=None, precision=None, asked=None, machine=None):
    folder.mkdir(parents=True)
    if config is not None:  # as a real run writes it: the resolved config, seed and out_dir included
        trainer = {**config.get("trainer", {}), "seed": seed}
        (folder / "config.yaml").write_text(json.dumps({**config, "trainer": trainer, "out_dir": str(folder)}))
    result = {"task": task, "method": method, "seed": seed, "metrics": {split: metrics}, "selection": "last",
              "selected_step": 10, "budget": {"stored": stored, "backbone": 1_000_000, "head": 10, "asked": asked},
              "delta_bytes": delta_bytes, "step_time_s": 0.5, "peak_memory_mb": 2048.0, "steps": 10,
              **({"family": family} if family else {}),
              **({"predictions": {split: predictions}} if predictions else {}),
              **({"precision": precision} if precision else {}),
              **({"machine": machine} if machine else {})}
    (folder / "results.json").write_text(json.dumps(result))
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_of_two_fake_runs_has_the_right_numbers(tmp_path):
    fake_run(tmp_path / "runs" / "a", "mrpc", "sara", 1, {"f1": 80.0, "accuracy": 70.0}, 5000)
    fake_run(tmp_path / "runs" / "b", "mrpc", "sara", 2, {"f1": 84.0, "accuracy": 74.0}, 5000, 3000)
    fake_run(tmp_path / "runs" / "c", "mrpc", "lora", 1, {"f1": 83.0, "accuracy": 75.0}, 74498)
    result = run_cli("report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    sara = next(line for line in text.splitlines() if "| sara |" in line)
    # mean of 80 and 84 is 82; sample std is sqrt(((80-82)^2 + (84-82)^2) / 1) = 2.83
    assert "f1 82.00 ± 2.83" in sara and "accuracy 72.00 ± 2.83" in sara and "| 1,2 |" in sara
    assert "| 5,000 | 0.500% | 0.00 MiB |" in sara  # mean delta bytes 2000 -> 0.00 MiB
    lora = next(line for line in text.splitlines() if "| lora |" in line)
    assert "f1 83.00 |" in lora and "±" not in lora and "7.450%" in lora  # one seed: no spread to print
    assert (tmp_path / "rep" / "metric_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rep" / "training_curves.png").exists()


def test_runs_that_differ_in_a_setting_are_separate_rows_named_by_it(tmp_path):
    paper = {"method": {"name": "sdiff", "group_penalty": "paper", "alpha_lr": 0.1}, "trainer": {"lr": 5e-5}}
    reference = {**paper, "method": {**paper["method"], "group_penalty": "reference"}}
    fake_run(tmp_path / "runs" / "a", "mrpc", "sdiff", 1, {"f1": 80.0, "accuracy": 70.0}, 5000, config=paper)
    fake_run(tmp_path / "runs" / "b", "mrpc", "sdiff", 2, {"f1": 82.0, "accuracy": 72.0}, 5000, config=paper)
    fake_run(tmp_path / "runs" / "c", "mrpc", "sdiff", 1, {"f1": 90.0, "accuracy": 80.0}, 5000, config=reference)
    older = {**paper, "method": {k: v for k, v in paper["method"].items() if k != "group_penalty"}}
    fake_run(tmp_path / "runs" / "d", "mrpc", "sdiff", 3, {"f1": 70.0, "accuracy": 60.0}, 5000, config=older)
    result = run_cli("report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert "f1 81.00 ± 1.41" in next(line for line in lines if "| sdiff (group_penalty=paper) |" in line)
    assert "f1 90.00 |" in next(line for line in lines if "| sdiff (group_penalty=reference) |" in line)
    assert "f1 70.00 |" in next(line for line in lines if "| sdiff (group_penalty=unset) |" in line)  # older run


def test_report_without_runs_is_a_clear_error(tmp_path):
    result = run_cli("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0 and "no results.json" in result.stderr and "Traceback" not in result.stderr


def test_glue_matrix_names_a_variant_alike_on_every_task_and_averages_only_complete_rows(tmp_path):
    runs = tmp_path / "runs"
    old = {"method": {"name": "sara"}, "trainer": {"lr": 5e-4}}
    new = {"method": {"name": "sara"}, "trainer": {"lr": 2e-3}}
    fake_run(runs / "m1", "mrpc", "sara", 1, {"f1": 81.0, "accuracy": 68.0}, 5000, config=old)
    fake_run(runs / "m2", "mrpc", "sara", 1, {"f1": 84.0, "accuracy": 76.0}, 5000, config=new)
    fake_run(runs / "m3", "mrpc", "sara", 2, {"f1": 86.0, "accuracy": 78.0}, 5000, config=new)
    fake_run(runs / "r1", "rte", "sara", 1, {"accuracy": 60.0}, 5000, config=new)  # only the new lr on RTE
    fake_run(runs / "f1", "mrpc", "full", 1, {"f1": 85.0, "accuracy": 77.0}, 10**6)  # no RTE run: no average
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert "| method | mrpc (f1) | rte (accuracy) | average |" in lines
    # MRPC (84 + 86) / 2 = 85, std sqrt(2) = 1.41; RTE 60; average (85 + 60) / 2 = 72.5
    assert "| sara (trainer.lr=0.002) | 85.00 ± 1.41 (2) | 60.00 (1) | 72.50 |" in lines
    assert "| sara (trainer.lr=0.0005) | 81.00 (1) | — | — |" in lines
    assert "| full | 85.00 (1) | — | — |" in lines


def test_a_recipe_run_is_named_by_what_it_changes_in_its_recipe_so_per_task_values_share_a_row(tmp_path):
    from omegaconf import OmegaConf

    from selectune.config import compose

    def recipe(name, *overrides):
        return OmegaConf.to_container(compose("train", [f"recipe={name}", *overrides]), resolve=True)

    runs = tmp_path / "runs"
    mrpc, rte = recipe("glue/mrpc_adalora"), recipe("glue/rte_adalora")
    assert (mrpc["method"]["orth_weight"], rte["method"]["orth_weight"]) == (0.1, 0.3)  # the recipes' own γ
    fake_run(runs / "m1", "mrpc", "adalora", 1, {"f1": 82.0, "accuracy": 72.0}, 5000, config=mrpc)
    fake_run(runs / "m2", "mrpc", "adalora", 2, {"f1": 84.0, "accuracy": 74.0}, 5000, config=mrpc)
    del rte["budget"]["count"]  # a run older than a setting the recipe leaves null: not a variant
    fake_run(runs / "r1", "rte", "adalora", 1, {"accuracy": 55.0}, 5000, config=rte)
    no_orth = recipe("glue/mrpc_adalora", "method.orth_weight=0", "trainer.log_every=1")  # bookkeeping: no name
    fake_run(runs / "m3", "mrpc", "adalora", 1, {"f1": 86.0, "accuracy": 77.0}, 5000, config=no_orth)
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert "| adalora | 83.00 ± 1.41 (2) | 55.00 (1) | 69.00 |" in lines  # γ 0.1 and 0.3: one row
    assert "| adalora (orth_weight=0) | 86.00 (1) | — | — |" in lines
    assert any(line.startswith("| rte | adalora | accuracy 55.00") for line in lines)


def test_a_run_of_the_recipes_budget_written_another_way_is_no_variant(tmp_path):
    """The recipe asks 73,728 beyond the head; a run that asked the same count as `budget.count` (older
    recipes did, on its 10-value head: 73,738) is the recipe's row; a run that asked another count is not."""
    from omegaconf import OmegaConf

    from selectune.config import compose

    recipe = OmegaConf.to_container(compose("train", ["recipe=glue/rte_spt_lora"]), resolve=True)
    assert recipe["budget"] == {"fraction": None, "count": None, "beyond_head": 73728}
    runs = tmp_path / "runs"
    same = {**recipe, "budget": {"fraction": None, "count": 73738, "beyond_head": None}}
    other = {**recipe, "budget": {"fraction": None, "count": 80000, "beyond_head": None}}
    fake_run(runs / "a", "rte", "spt_lora", 1, {"accuracy": 55.0}, 73738, config=same, asked=73738)
    fake_run(runs / "b", "rte", "spt_lora", 1, {"accuracy": 51.0}, 80000, config=other, asked=80000)
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert any(line.startswith("| rte | spt_lora | accuracy 55.00") for line in lines)
    assert any(line.startswith("| rte | spt_lora (budget.beyond_head=None, budget.count=80000) | accuracy 51.00")
               for line in lines), lines


def test_seeds_of_one_budget_that_stored_different_counts_are_one_row_with_the_range(tmp_path):
    """AdaLoRA's trimmed delta: b(T) fixes triplets, not numbers, so its seeds store different counts under the one
    budget asked (RTE: 218,945, 215,489, 218,945 for 222,338). They are one row of 3 seeds, the count shown as
    mean and range; runs not asked a count still part by what they stored."""
    runs = tmp_path / "runs"
    for seed, stored, score in ((42, 218945, 51.0), (43, 215489, 52.0), (44, 218945, 54.0)):
        fake_run(runs / f"ada{seed}", "rte", "adalora", seed, {"accuracy": score}, stored, asked=222338)
    fake_run(runs / "l1", "rte", "lora", 42, {"accuracy": 55.0}, 222338)
    fake_run(runs / "l2", "rte", "lora", 43, {"accuracy": 57.0}, 100000)
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    ada = [line for line in lines if line.startswith("| rte | adalora |")]
    assert len(ada) == 1 and "accuracy 52.33 ± 1.53" in ada[0] and "| 42,43,44 |" in ada[0], ada
    assert "| 217,793 (215,489-218,945) | 21.779% |" in ada[0]  # (218,945 x 2 + 215,489) / 3, of 1,000,000
    assert len([line for line in lines if line.startswith("| rte | lora |")]) == 2


def test_pair_compares_two_methods_on_the_seeds_both_have_and_a_wrong_label_fails_before_writing(tmp_path):
    runs = tmp_path / "runs"
    for seed, s, f in ((1, 84.0, 85.0), (2, 86.0, 85.0), (3, 90.0, 85.0)):
        fake_run(runs / f"s{seed}", "mrpc", "sdiff", seed, {"f1": s, "accuracy": 70.0}, 5000)
        if seed < 3:  # full FT has no seed 3: the sdiff run of seed 3 must not enter the difference
            fake_run(runs / f"f{seed}", "mrpc", "full", seed, {"f1": f, "accuracy": 70.0}, 10**6)
    fake_run(runs / "r1", "rte", "sdiff", 1, {"accuracy": 60.0}, 5000)
    fake_run(runs / "r2", "rte", "full", 2, {"accuracy": 58.0}, 10**6)  # no common seed on RTE
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", "pair=sdiff:full", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    # MRPC differences -1 and +1 (seed 3 unpaired): mean 0, std sqrt(2) = 1.41; no average without RTE
    assert "| sdiff − full | +0.00 ± 1.41 (seeds 1,2; A ≥ B on 1/2) | — | — |" in lines

    fake_run(runs / "r3", "rte", "full", 1, {"accuracy": 57.5}, 10**6)  # now RTE pairs on seed 1: +2.5
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", "pair=sdiff:full", cwd=tmp_path)
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert "| sdiff − full | +0.00 ± 1.41 (seeds 1,2; A ≥ B on 1/2) | +2.50 (seeds 1; A ≥ B on 1/1) | +1.25 |" \
        in lines

    result = run_cli("report", str(runs), f"out={tmp_path / 'bad'}", "pair=sdiff:lora", cwd=tmp_path)
    assert result.returncode != 0 and "no run is labelled 'lora'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()
    result = run_cli("report", str(runs), "pair=sdiff", cwd=tmp_path)
    assert result.returncode != 0 and "pair= takes two method labels" in result.stderr


def test_a_kept_runs_compressed_curve_reads_as_the_plain_one(tmp_path):
    """results/ keeps metrics.jsonl gzip-compressed (scripts/reproduction/keep_runs.sh): the report reads both alike."""
    import gzip

    from selectune.report import metrics_file, read_losses

    lines = [json.dumps({"step": 1, "loss": 0.7}), "not json", json.dumps({"step": 2, "eval": {}}),
             json.dumps({"step": 3, "loss": 0.5})]
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    plain.mkdir()
    kept.mkdir()
    (plain / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(kept / "metrics.jsonl.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    assert metrics_file(kept).name == "metrics.jsonl.gz" and metrics_file(tmp_path) is None
    assert read_losses(metrics_file(plain)) == read_losses(metrics_file(kept)) == [(1, 0.7), (3, 0.5)]


def test_pair_compares_image_methods_on_their_test_split(tmp_path):
    """Images pair like GLUE: accuracy on the run's split (the final protocol's test), per task, common seeds."""
    runs = tmp_path / "runs"
    for seed, (a, b) in ((42, (75.0, 74.0)), (43, (76.0, 77.0)), (44, (78.0, 75.0))):
        fake_run(runs / f"a{seed}", "dtd10", "spt_lora", seed, {"accuracy": a}, 5000, split="test", family="vtab")
        fake_run(runs / f"b{seed}", "dtd10", "lora", seed, {"accuracy": b}, 5000, split="test", family="vtab")
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", "pair=spt_lora:lora", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    # differences +1, -1, +3: mean 1, sample std 2
    assert "| spt_lora − lora | +1.00 ± 2.00 (seeds 42,43,44; A ≥ B on 2/3) | +1.00 |" in lines
    assert "| A − B | dtd10 (test) | average |" in lines


def test_the_top_label_share_shows_a_collapse(tmp_path):
    """The share of rows predicted as the most-predicted label, averaged over the runs that recorded it: 100% is a
    head that answers one class; runs from before `predictions` was kept count as not recorded."""
    runs = tmp_path / "runs"
    fake_run(runs / "a", "rte", "lora", 1, {"accuracy": 52.7}, 5000, predictions={"entailment": 277, "not": 0})
    fake_run(runs / "b", "rte", "lora", 2, {"accuracy": 55.0}, 5000, predictions={"entailment": 150, "not": 127})
    fake_run(runs / "c", "rte", "lora", 3, {"accuracy": 54.0}, 5000)  # before predictions were kept
    fake_run(runs / "d", "stsb", "lora", 1, {"pearson": 85.0, "spearman": 84.0}, 5000)  # regression: none
    result = run_cli("report", str(runs), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    rte = next(line for line in lines if line.startswith("| rte | lora |"))
    assert rte.endswith("| 77% (2 of 3 runs) |")  # (277/277 + 150/277) / 2 = 0.77
    assert next(line for line in lines if line.startswith("| stsb | lora |")).endswith("| — |")


def test_a_row_whose_seeds_trained_in_different_precisions_names_them(tmp_path):
    # trainer.precision=auto is bf16 on a CPU with AVX512-BF16/AMX and fp32 on one without: seeds run on two
    # machines share a row (same recipe), and the seeds cell says which ran in which
    fake_run(tmp_path / "runs" / "a", "rte", "lora", 42, {"accuracy": 54.0}, 5000, precision="bf16")
    fake_run(tmp_path / "runs" / "b", "rte", "lora", 43, {"accuracy": 56.0}, 5000, precision="fp32")
    fake_run(tmp_path / "runs" / "c", "rte", "lora", 44, {"accuracy": 52.0}, 5000, precision="fp32")
    fake_run(tmp_path / "runs" / "d", "rte", "bitfit", 42, {"accuracy": 53.0}, 4000, precision="fp32")
    fake_run(tmp_path / "runs" / "e", "rte", "bitfit", 43, {"accuracy": 55.0}, 4000, precision="fp32")
    fake_run(tmp_path / "runs" / "f", "rte", "ia3", 42, {"accuracy": 58.0}, 3000, precision="bf16")
    fake_run(tmp_path / "runs" / "g", "rte", "ia3", 43, {"accuracy": 57.0}, 3000)  # before results.json kept it
    result = run_cli("report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert "| 42,43,44 (bf16: 42; fp32: 43,44) |" in next(line for line in lines if "| lora |" in line)
    assert "| 42,43 (fp32) |" in next(line for line in lines if "| bitfit |" in line)  # the table mixes them
    assert "| 42,43 (bf16: 42; unrecorded: 43) |" in next(line for line in lines if "| ia3 |" in line)


def test_s_step_from_different_machines_says_which_seeds_ran_where(tmp_path):
    # a table whose s/step means come from two CPUs (and a run from before results.json kept the machine)
    amx, avx2 = "Xeon (native bf16), 1 thread", "AMD EPYC (no native bf16), 1 thread"
    fake_run(tmp_path / "runs" / "a", "rte", "lora", 42, {"accuracy": 54.0}, 5000, machine=amx)
    fake_run(tmp_path / "runs" / "b", "rte", "lora", 43, {"accuracy": 56.0}, 5000, machine=avx2)
    fake_run(tmp_path / "runs" / "c", "rte", "lora", 44, {"accuracy": 52.0}, 5000, machine=avx2)
    fake_run(tmp_path / "runs" / "d", "rte", "bitfit", 42, {"accuracy": 53.0}, 4000, machine=avx2)
    fake_run(tmp_path / "runs" / "e", "rte", "ia3", 42, {"accuracy": 58.0}, 3000)
    result = run_cli("report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    row = {m: next(line for line in lines if f"| {m} |" in line) for m in ("lora", "bitfit", "ia3")}
    # labels in the order the rows name the machines (rows sorted by method: bitfit, ia3, lora)
    assert "| 0.50 [m1] |" in row["bitfit"] and "| 0.50 [m2] |" in row["ia3"]
    assert "| 0.50 [m1: 43,44; m3: 42] |" in row["lora"]
    assert (f"s/step timed on different machines (a row's seeds by machine in brackets): m1 = {avx2}; "
            f"m2 = unrecorded (runs from before results.json kept the machine); m3 = {amx}.") in lines


def test_s_step_from_one_machine_names_it_once(tmp_path):
    fake_run(tmp_path / "runs" / "a", "rte", "lora", 42, {"accuracy": 54.0}, 5000, machine="EPYC, 1 thread")
    fake_run(tmp_path / "runs" / "b", "rte", "bitfit", 42, {"accuracy": 53.0}, 4000, machine="EPYC, 1 thread")
    result = run_cli("report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "s/step timed on EPYC, 1 thread." in text and "[m1]" not in text and "| 0.50 |" in text


def test_a_table_of_one_precision_does_not_name_it(tmp_path):
    fake_run(tmp_path / "runs" / "a", "rte", "lora", 42, {"accuracy": 54.0}, 5000, precision="bf16")
    fake_run(tmp_path / "runs" / "b", "rte", "bitfit", 42, {"accuracy": 53.0}, 4000, precision="bf16")
    result = run_cli("report", str(tmp_path / "runs"), f"out={tmp_path / 'rep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert all("| 42 |" in next(line for line in lines if f"| {m} |" in line) for m in ("lora", "bitfit"))
