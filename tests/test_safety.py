"""A hostile user against the real CLI: no run lost, no write outside the named folders, one line per error.

Every refusal must exit 2 with exactly one line `selectune: error: ...` and no traceback, leave an earlier
run's files byte-identical, and leave nothing new behind (no `runs/`, no `.hydra/`, no `<out>.tmp/`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import kill_after_first_checkpoint, run_cli

T = ["recipe=glue/rte_bitfit", "model=tiny_random", "task.max_train_examples=64", "task.max_eval_examples=64",
     "trainer.max_steps=4", "trainer.batch_size=8", "trainer.progress=false"]
LONG = [*T[:4], "trainer.max_steps=400", "trainer.batch_size=8", "trainer.progress=false",
        "trainer.checkpoint_every=2", "trainer.eval_every=2",  # long enough to be killed after a checkpoint
        "task.validation=null", "trainer.select=last"]  # no delta before the end, whatever the recipe chose


# --------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (hidden ones too): file bytes, or a link's target."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = path.read_bytes()
        else:
            out[key] = "dir"
    return out


def one_line_error(result: subprocess.CompletedProcess, *patterns: str, code: int = 2) -> str:
    """The exact exit code, one line on stderr starting `selectune: error:`, no traceback anywhere."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("selectune: error: "), lines[0]
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


def final_error(stderr: str) -> str:
    """A run that printed progress before failing: exactly one error line, and it ends the output."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("selectune: error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def cli(*args: str, cwd: Path, data: Path, **env: str) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, env={"SELECTUNE_DATA": str(data), **env})


@pytest.fixture(scope="module")
def finished_run(glue_root, tmp_path_factory) -> Path:
    """A finished tiny run (trained once per module; tests work on copies)."""
    cwd = tmp_path_factory.mktemp("finished")
    result = cli("train", *T, "out_dir=run", cwd=cwd, data=glue_root)
    assert result.returncode == 0, result.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def unfinished_run(glue_root, tmp_path_factory) -> Path:
    """A run SIGKILLed right after its first checkpoint: checkpoint/, no results.json."""
    cwd = tmp_path_factory.mktemp("unfinished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELECTUNE_DATA", str(glue_root))
        kill_after_first_checkpoint(["train", *LONG], cwd / "run", cwd)
    return cwd / "run"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


# --------------------------------------------------------------------------- 1. one owner per run folder
def test_a_run_folder_in_use_is_refused_with_the_holders_pid(glue_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from selectune.runfs import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); sys.stdin.read()", str(run)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("train", *T, f"out_dir={run}", cwd=tmp_path, data=glue_root)
        one_line_error(result, f"is in use by pid {holder.pid}")
        assert snapshot(run) == {}
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder releases the lock
        holder.wait()
    result = cli("train", *T, f"out_dir={run}", cwd=tmp_path, data=glue_root)
    assert result.returncode == 0, result.stderr
    assert (run / "results.json").is_file()


def test_two_trainings_at_once_into_one_folder(glue_root, finished_run, tmp_path):
    """Started together: one trains, the other is refused (in use, or already finished); one run's files."""
    procs = [subprocess.Popen([sys.executable, "-m", "selectune", "train", *T, "trainer.seed=" + seed,
                               "out_dir=run"], cwd=tmp_path, env={**os.environ, "SELECTUNE_DATA": str(glue_root)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in ("1", "2")]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert "is in use by pid" in loser or "already holds a finished run" in loser, loser
    winner_seed = 1 + [p.returncode for p in procs].index(0)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["seed"] == winner_seed
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((finished_run / "metrics.jsonl").read_text().splitlines())  # not interleaved


# --------------------------------------------------------------------------- 2./3. refusals change nothing
def test_an_unfinished_run_is_refused_without_resume(glue_root, unfinished_run, tmp_path):
    run = copy_run(unfinished_run, tmp_path / "run")
    before = snapshot(run)
    import torch

    step = torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"]
    result = cli("train", *LONG, f"out_dir={run}", cwd=tmp_path, data=glue_root)
    one_line_error(result, f"holds an unfinished run at step {step}: add trainer.resume=true, or choose another "
                           "out_dir")
    assert snapshot(run) == before


@pytest.mark.parametrize("case", ["finished", "finished-resume", "unfinished-changed-config",
                                  "unfinished-missing-data", "unfinished-symlink"])
def test_a_refused_training_changes_nothing_in_the_run_folder(glue_root, finished_run, unfinished_run, tmp_path,
                                                              case):
    source, args, data, expected = {
        "finished": (finished_run, T, glue_root, "already holds a finished run"),
        "finished-resume": (finished_run, [*T, "trainer.resume=true"], glue_root, "already holds a finished run"),
        "unfinished-changed-config": (unfinished_run, [*LONG, "trainer.resume=true", "trainer.lr=0.5"], glue_root,
                                      "config differs"),
        "unfinished-missing-data": (unfinished_run, [*LONG, "trainer.resume=true"], tmp_path / "no_data", "no_data"),
        "unfinished-symlink": (unfinished_run, [*LONG, "trainer.resume=true"], glue_root, "symbolic link"),
    }[case]
    run = copy_run(source, tmp_path / "run")
    if case == "unfinished-symlink":
        (tmp_path / "outside").write_text("not yours")
        (run / "delta.safetensors").symlink_to(tmp_path / "outside")
    before = snapshot(run)
    result = cli("train", *args, f"out_dir={run}", cwd=tmp_path, data=data)
    one_line_error(result, expected)
    assert snapshot(run) == before
    assert not (tmp_path / "runs").exists()
    if case == "unfinished-symlink":
        assert (tmp_path / "outside").read_text() == "not yours"


# --------------------------------------------------------------------------- 4. temporary folders and partial files
def test_export_keeps_a_users_tmp_folder(glue_root, finished_run, tmp_path):
    users = tmp_path / "d" / "myexp.tmp"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    result = cli("export", f"run={finished_run}", "out=d/myexp", cwd=tmp_path, data=glue_root)
    assert result.returncode == 0, result.stderr
    assert (users / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["myexp", "myexp.tmp"]
    assert (tmp_path / "d" / "myexp" / "config.json").is_file()


def test_export_never_writes_through_a_symlinked_tmp(glue_root, finished_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "myexp.tmp").symlink_to(elsewhere)
    result = cli("export", f"run={finished_run}", "out=d/myexp", cwd=tmp_path, data=glue_root)
    assert result.returncode == 0, result.stderr
    assert list(elsewhere.iterdir()) == []
    assert (tmp_path / "d" / "myexp.tmp").is_symlink()


def test_a_sweep_with_a_typo_writes_nothing(glue_root, tmp_path):
    result = cli("train", "-m", *T, "trainer.seed=1,2", "trainer.lrr=0.1", "hydra.sweep.dir=sweep", cwd=tmp_path,
                 data=glue_root)
    one_line_error(result, "trainer.lrr")
    result = cli("train", "-m", *T, "trainer.lr=0.1,abc", "hydra.sweep.dir=sweep", cwd=tmp_path, data=glue_root)
    one_line_error(result, "trainer.lr", "abc")
    assert snapshot(tmp_path) == {}


def test_a_sweep_runs_every_job_and_lists_the_failed_ones(glue_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(glue_root, data)
    shutil.rmtree(data / "glue" / "CoLA")  # job 0 fails on a user error, job 1 must still run
    result = cli("train", "-m", *T, "task=glue/cola,glue/rte", "hydra.sweep.dir=sweep", cwd=tmp_path, data=data)
    assert result.returncode == 2
    error = final_error(result.stderr)  # the summary ends the sweep
    assert "job 0" in error and "task=glue/cola" in error and "CoLA data not found" in error
    done = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [json.loads(p.read_text())["task"] for p in done] == ["rte"]
    assert not list((tmp_path / "sweep").glob("0_*"))  # the failed job left no half-written folder


def test_a_failed_probe_never_removes_a_users_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = cli("probe", *T, f"out_dir={folder}", cwd=tmp_path, data=tmp_path / "no_data")
    one_line_error(result, "no_data")
    assert (folder / "notes.txt").read_text() == "mine"


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_during_training_leaves_nothing(data_env, tmp_path, monkeypatch, capsys, existing):
    """Fails after the run proceeded: what it wrote goes; a user's folder and its files stay as they were."""
    from selectune import cli, runfs

    if existing:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "notes.txt").write_text("mine")

    real = runfs.write_text

    def full_at_results(path, text, root):  # the delta is written; results.json is not
        if path.name == "results.json":
            _disk_full()
        real(path, text, root)

    monkeypatch.setattr(runfs, "write_text", full_at_results)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selectune"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *T, "out_dir=run"])
    assert exit_.value.code == 2
    assert "No space left on device" in final_error(capsys.readouterr().err)
    # no .hydra/, train.log or delta.safetensors without results.json
    assert snapshot(tmp_path) == ({"run": "dir", "run/notes.txt": b"mine"} if existing else {})


def test_disk_full_during_export_leaves_nothing(data_env, finished_run, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    from selectune import cli

    def partial_then_full(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)
        _disk_full()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", partial_then_full)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selectune"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", f"run={finished_run}", "out=d/myexp"])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_staging_folders_a_killed_run_left_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """SIGKILL leaves Hydra's staging folder behind; the next run removes those whose process is gone."""
    import tempfile

    from selectune.runfs import new_staging

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"selectune-stage-{gone.pid}-abc"
    live = tmp_path / f"selectune-stage-{os.getppid()}-def"  # pytest's parent: alive
    other = tmp_path / "selectune-stage-xyz"  # not a name this code writes: left alone
    for folder in (dead, live, other):
        (folder / ".hydra").mkdir(parents=True)
    stage = new_staging()
    assert not dead.exists() and live.exists() and other.exists()
    assert stage.parent == tmp_path and stage.name.startswith(f"selectune-stage-{os.getpid()}-")


# --------------------------------------------------------------------------- 5. offline means offline
@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection."""
    attempts: list[object] = []

    def connect(self, address, *args):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "network used by a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    return attempts


def _pretend_online_environment(monkeypatch):
    """HF_HUB_OFFLINE=0 as a user's shell might set it, with huggingface_hub imported under it."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_a_missing_model_fails_at_once_even_with_HF_HUB_OFFLINE_0(data_env, tmp_path, monkeypatch, capsys,
                                                                  no_network):
    from selectune import cli

    _pretend_online_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selectune"])
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *T, "model.name_or_path=someone/no-such-model", "model.random_init=false"])
    elapsed = time.perf_counter() - start
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'someone/no-such-model'" in lines[0], lines
    assert no_network == []
    assert elapsed < 5, elapsed
    assert list(tmp_path.iterdir()) == []


def test_the_subprocess_cli_stays_offline_with_HF_HUB_OFFLINE_0(glue_root, tmp_path):
    start = time.perf_counter()
    result = cli("train", *T, "model.name_or_path=someone/no-such-model", "model.random_init=false",
                 cwd=tmp_path, data=glue_root, HF_HUB_OFFLINE="0")
    one_line_error(result, "unknown model 'someone/no-such-model'")
    assert time.perf_counter() - start < 60  # the Hub's retries took 28 s on their own; startup is the rest
    assert list(tmp_path.iterdir()) == []


def test_a_deltas_metadata_never_takes_eval_online(data_env, finished_run, tmp_path, monkeypatch, capsys,
                                                   no_network):
    from selectune import cli
    from selectune.delta.taskdelta import TaskDelta

    delta = TaskDelta.load(finished_run / "delta.safetensors")
    delta.meta["config"]["online"] = True
    delta.meta["config"]["model"]["name_or_path"] = "someone/no-such-model"
    delta.meta["config"]["model"]["random_init"] = False
    delta.meta["config"]["task"]["source"] = "hub"
    delta.save(tmp_path / "delta.safetensors")
    _pretend_online_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selectune"])
    before = snapshot(tmp_path)
    for command in (["eval", "run=delta.safetensors"], ["export", "run=delta.safetensors", "out=merged"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(command)
        assert exit_.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("selectune: error: "), lines
    assert no_network == []
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 6. never through a symlink
def test_eval_does_not_follow_a_symlink_planted_in_the_run(glue_root, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "eval_rte.json").symlink_to(victim)
    before = snapshot(tmp_path)
    result = cli("eval", f"run={run}", cwd=tmp_path, data=glue_root)
    one_line_error(result, "symbolic link", "eval_rte.json")
    assert victim.read_text() == "precious"
    assert snapshot(tmp_path) == before


def test_export_refuses_a_symlinked_out(glue_root, finished_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "merged").symlink_to(elsewhere)
    result = cli("export", f"run={finished_run}", "out=merged", cwd=tmp_path, data=glue_root)
    one_line_error(result, "symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_report_does_not_follow_a_symlink_in_out(glue_root, finished_run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").symlink_to(victim)
    result = cli("report", str(finished_run), "out=rep", cwd=tmp_path, data=glue_root)
    one_line_error(result, "symbolic link")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.md"]


# --------------------------------------------------------------------------- 8. bad values: one line, nothing left
@pytest.mark.parametrize(("args", "expected"), [
    (["trainer.max_steps=0"], "trainer.max_steps must be a positive"),
    (["trainer.max_steps=-1"], "trainer.max_steps must be a positive"),
    (["trainer.lr=-1"], "trainer.lr must be positive"),
    (["task.max_train_examples=0"], "task.max_train_examples must be positive"),
    (["out_dir="], "out_dir is empty"),
    (["out_dir=afile"], "out_dir=afile is a file"),
    (["out_dir=afile/run"], "under afile, which is a file"),
    (["out_dir=/proc/selectune/run"], "cannot create out_dir=/proc/selectune/run"),
])
def test_a_bad_training_value_is_one_line_and_writes_nothing(glue_root, tmp_path, args, expected):
    (tmp_path / "afile").write_text("x")
    result = cli("train", *T, *args, cwd=tmp_path, data=glue_root)
    one_line_error(result, expected)
    assert snapshot(tmp_path) == {"afile": b"x"}


@pytest.mark.parametrize(("args", "expected"), [
    (["export", "run=RUN", "out=afile"], "out=afile is a file"),
    (["export", "run=RUN"], "export needs out="),
    (["export", "out=merged"], "export needs run="),
    (["eval"], "eval needs run="),
    (["report", "RUN", "out=afile"], "out=afile is a file"),
    (["report", "RUN", "out=afile/rep"], "under afile, which is a file"),
    (["report", "RUN", "out=/proc/selectune/rep"], "cannot create out=/proc/selectune/rep"),
])
def test_a_bad_command_line_is_one_line_and_writes_nothing(glue_root, finished_run, tmp_path, args, expected):
    (tmp_path / "afile").write_text("x")
    before = snapshot(finished_run)
    args = [a.replace("RUN", str(finished_run)) for a in args]
    one_line_error(cli(*args, cwd=tmp_path, data=glue_root), expected)
    assert snapshot(tmp_path) == {"afile": b"x"}
    assert snapshot(finished_run) == before


# --------------------------------------------------------------------------- help and version
@pytest.mark.parametrize("command", ["train", "probe", "eval", "export", "report", "ls", "cat", "validate"])
@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_every_command_has_help(tmp_path, monkeypatch, capsys, command, flag):
    from selectune import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["selectune"])
    try:
        cli.main([command, flag])
    except SystemExit as exit_:  # Hydra's own help ends with exit(0)
        assert exit_.code in (0, None)
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: selectune {command}"), out[:200]
    assert err == ""
    assert list(tmp_path.iterdir()) == []


def test_version(tmp_path):
    from selectune import __version__

    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"selectune {__version__}\n"
