"""Shared fixtures: tiny GLUE data in the real file layouts, a tiny random model, CLI helpers.

Everything here runs offline: HF_HUB_OFFLINE=1 makes any accidental Hub access fail at once.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one pytest-xdist worker per core (`-n auto`): each worker's torch, and every CLI call it makes, computes on its
# share of the cores. Left to torch, two workers ran two threads each on 2 cores, and test_train + test_flat_gates
# took 62 s instead of 45 (one 2-core AMD EPYC, the same two files, `-n 2 --dist loadfile`). Set before torch is
# imported; an OMP_NUM_THREADS already set is kept.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# below the environment above, which the CLI server imports under; the tests import run_cli from here
from cli_runner import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_DATA = Path(os.environ.get("SELECTUNE_DATA", SHARED_DATA)).resolve()  # tests run commands in other folders

# fp32 pinned: the default `auto` is bf16 on a CPU with AMX and fp32 on one without, and the tests must not depend
# on which CPU runs them (bf16 itself is tested by name: test_device.py, test_cheaper_steps.py)
# A recipe's values chosen by `selectune sweep` (a carved val, the best epoch kept, length-grouped batches) set aside
# too: these runs test how the code behaves, on dev, whatever a sweep wrote into the shipped recipe; a test of val,
# best or grouping adds its own.
TINY = ["model=tiny_random", "trainer.progress=false", "trainer.batch_size=8", "trainer.eval_batch_size=16",
        "trainer.precision=fp32", "task.validation=null", "trainer.select=last", "trainer.group_by_length=false"]

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "house", "quickly", "slowly", "big",
         "small", "red", "blue", "was", "is", "not", "very"]


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + " ."


def write_glue(root: Path, rows: int = 48, seed: int = 0) -> Path:
    """Write every GLUE task in the GLUE distribution's TSV layout (headers, BOM, CoLA headerless...)."""
    rng = random.Random(seed)
    glue = root / "glue"

    def write(task: str, name: str, header: str | None, make_row, bom: bool = False) -> None:
        folder = glue / task
        folder.mkdir(parents=True, exist_ok=True)
        lines = ([header] if header else []) + [make_row(i) for i in range(rows)]
        text = "\n".join(lines) + "\n"
        (folder / f"{name}.tsv").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")

    for split in ("train", "dev"):
        write("CoLA", split, None, lambda i: f"gj04\t{i % 2}\t\t{_sentence(rng)}")
        write("SST-2", split, "sentence\tlabel", lambda i: f"{_sentence(rng)} \t{i % 2}")
        write("MRPC", split, "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
              lambda i: f"{i % 2}\t{1000 + i}\t{2000 + i}\t{_sentence(rng)}\t{_sentence(rng)}", bom=True)
        write("STS-B", split, "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
              lambda i: f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{_sentence(rng)}\t"
                        f"{_sentence(rng)}\t{(i * 0.37) % 5:.3f}")
        write("QQP", split, "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
              lambda i: f"{i}\t{2 * i}\t{2 * i + 1}\t{_sentence(rng)}?\t{_sentence(rng)}?\t{i % 2}")
        write("QNLI", split, "index\tquestion\tsentence\tlabel",
              lambda i: f"{i}\t{_sentence(rng)}?\t{_sentence(rng)}\t{('entailment', 'not_entailment')[i % 2]}")
        write("RTE", split, "index\tsentence1\tsentence2\tlabel",
              lambda i: f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{('entailment', 'not_entailment')[i % 2]}")
        write("WNLI", split, "index\tsentence1\tsentence2\tlabel",
              lambda i: f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{i % 2}")
    mnli_header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
    labels = ("entailment", "neutral", "contradiction")
    for split in ("train", "dev_matched", "dev_mismatched"):
        write("MNLI", split, mnli_header,
              lambda i: f"{i}\t{i}\t{i}e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{_sentence(rng)}\t"
                        f"{_sentence(rng)}\t{labels[i % 3]}\t{labels[i % 3]}")
    return root


@pytest.fixture(scope="session")
def glue_root(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("data"))


@pytest.fixture
def data_env(glue_root, monkeypatch) -> Path:
    monkeypatch.setenv("SELECTUNE_DATA", str(glue_root))
    return glue_root


def kill_after_first_checkpoint(args: list[str], run_dir: Path, cwd: Path) -> None:
    """Start `selectune <args> out_dir=<run_dir>` and SIGKILL it as soon as its first checkpoint exists."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "selectune", *args, f"out_dir={run_dir}"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "checkpoint" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "results.json").exists()


def whole_and_resumed(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """`selectune <args>` run through once (tmp_path/whole) and once SIGKILLed after its first checkpoint and
    resumed (tmp_path/killed): both runs' results.json, for a test to say what must be equal."""
    whole = run_cli(*args, f"out_dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    kill_after_first_checkpoint(args, tmp_path / "killed", tmp_path)
    resumed = run_cli(*args, f"out_dir={tmp_path / 'killed'}", "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr
    return tuple(json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "killed"))


def compose_run(recipe: str, *overrides: str):
    from selectune.config import compose

    return compose("train", [f"recipe={recipe}", *TINY, *overrides])
