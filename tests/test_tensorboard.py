"""trainer.tensorboard=true: the event file holds every numeric value metrics.jsonl logged, at its step."""

from __future__ import annotations

import json
import sys

import pytest

from selectune.tb import scalars

from conftest import compose_run

ADALORA = ("trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=4", "method.t_init=2",
           "method.t_final=4", "method.delta_t=2", "method.target_total=8")


def test_event_file_has_every_logged_scalar(data_env, tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selectune.commands import train

    train(compose_run("glue/rte_adalora", *ADALORA, "trainer.tensorboard=true"), tmp_path / "run")
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = {(tag, r["step"]): value for r in records for tag, value in scalars(r)}
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    tags = {tag for tag, _ in got}
    assert {"loss", "lr", "eval/dev/accuracy", "adalora_budget", "adalora_kept"} <= tags
    assert any(tag.startswith("kept_rank/") for tag in tags)  # the method's per-matrix extras too


def test_resume_purges_the_events_of_the_killed_run(tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from selectune.tb import TensorBoardSink

    killed = TensorBoardSink(tmp_path, SummaryWriter)
    for step in (1, 2, 3, 4):  # checkpoint at 2, killed after logging 4
        killed.write({"step": step, "loss": float(step)})
    killed.close()
    resumed = TensorBoardSink(tmp_path, SummaryWriter)
    resumed.resume_at(2)
    resumed.write({"step": 3, "loss": 30.0})
    resumed.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_scalars_flatten_records_and_skip_what_is_not_a_number():
    record = {"step": 3, "loss": 0.5, "eval": {"dev": {"f1": 80.0, "mcc": None}}, "note": "x", "ranks": {"q": 2}}
    assert dict(scalars(record)) == {"loss": 0.5, "eval/dev/f1": 80.0, "ranks/q": 2.0}


def test_without_the_extra_one_line_and_nothing_else(data_env, tmp_path, monkeypatch, capsys):
    from selectune.commands import train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    results = train(compose_run("glue/rte_lora", "trainer.max_steps=2", "trainer.tensorboard=true"), tmp_path / "run")
    err = capsys.readouterr().err
    assert err.count("tensorboard package is not installed (pip install 'selectune[tensorboard]')") == 1
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "metrics.jsonl").exists() and results["steps"] == 2
