"""The tests' CLI runner (cli_runner.py): a call forked from the pre-imported server gives what a fresh
`python -m selectune` gives, and a call whose environment a fork could not honour gets a fresh interpreter."""

from __future__ import annotations

import os
import subprocess

import cli_runner
import pytest

from conftest import TINY, run_cli

pytestmark = pytest.mark.skipif(os.environ.get("SELECTUNE_TEST_FRESH") == "1",
                                reason="SELECTUNE_TEST_FRESH=1: no call is forked, so there is no server to test")


def test_a_forked_call_gives_what_a_fresh_interpreter_gives(glue_root, tmp_path):
    calls = [(("train", "glue/rte_bitfit", "trainer.lr=-1"), glue_root),  # refused while composing
             (("train", "glue/rte_bitfit", *TINY), tmp_path / "nowhere"),  # refused by the task, inside Hydra's run
             (("ls", "rte", "lora"), glue_root), (("cat", "glue/rte_lora", "out_dir=x"), glue_root)]
    for args, data in calls:
        env = {"SELECTUNE_DATA": str(data)}
        served = cli_runner._server.served if cli_runner._server else 0
        forked, plain = run_cli(*args, cwd=tmp_path, env=env), run_cli(*args, cwd=tmp_path, env=env, fresh=True)
        assert cli_runner._server is not None and cli_runner._server.served == served + 1  # only the first forked
        assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert [r.returncode for r in (forked, plain)] == [0, 0] and list(tmp_path.iterdir()) == []


def test_a_forked_call_uses_its_own_tmpdir(glue_root, tmp_path):
    """The refusal tests put TMPDIR inside the folder they watch: a forked call stages Hydra's files there, as a
    fresh one does (seen through the staging clean-up: a dead process's leftover in that TMPDIR is removed)."""
    tmp = tmp_path / "tmp"
    stale = tmp / "selectune-stage-4194305-x"  # above Linux's largest pid: no such process
    stale.mkdir(parents=True)
    served = cli_runner._server.served if cli_runner._server else 0
    result = run_cli("train", "glue/rte_bitfit", *TINY, cwd=tmp_path,
                     env={"SELECTUNE_DATA": str(tmp_path / "nowhere"), "TMPDIR": str(tmp)})
    assert result.returncode == 2 and cli_runner._server is not None and cli_runner._server.served == served + 1
    assert not stale.exists() and list(tmp.iterdir()) == []


def test_only_environment_read_at_run_time_may_differ_in_a_fork(tmp_path):
    run_cli("ls", "rte", cwd=tmp_path)
    server = cli_runner._server
    assert server is not None
    base = cli_runner.BASE_ENV
    assert server.forks({**base, "SELECTUNE_DATA": str(tmp_path), "SELECTUNE_DEBUG": "1"})
    assert not server.forks({**base, "HF_HUB_OFFLINE": "0"})  # huggingface_hub reads it when imported
    assert not server.forks({**base, "OMP_NUM_THREADS": "7"})
    assert not server.forks({k: v for k, v in base.items() if k != "HF_HUB_OFFLINE"})


def test_a_call_that_runs_too_long_is_killed_and_the_server_serves_the_next(tmp_path):
    run_cli("ls", "rte", cwd=tmp_path)
    server = cli_runner._server
    assert server is not None
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("cat", "glue/rte_lora", cwd=tmp_path, timeout=0.05)  # composing alone takes longer
    assert server.proc.poll() is None
    served = server.served
    assert run_cli("ls", "rte", cwd=tmp_path).stdout == run_cli("ls", "rte", cwd=tmp_path, fresh=True).stdout
    assert server.served == served + 1
