"""`python -m selectune ...` for the tests, without paying torch's and transformers' imports on every call.

About 270 calls of the suite start the CLI, and each spent 2.5-4.5 s of its 3-10 s importing torch,
transformers and a model class: well over half the suite's CPU time on 2 cores. Each pytest worker starts one
server process that has imported them once; each call is a fork of it that sets its cwd, environment, argv
and standard streams as a fresh `python -m selectune` would have them, runs `selectune/__main__.py` with runpy,
and exits through the interpreter's normal shutdown (exit status, atexit, flushed streams). What a forked child
cannot reproduce is what a module reads from the environment when it is imported (HF_HUB_OFFLINE in
huggingface_hub, OMP_NUM_THREADS in the OpenMP runtime, ...): a call whose environment differs from the server's
in any other key than FORK_SAFE_ENV, a call with online=true, one made while another is under way, or
SELECTUNE_TEST_FRESH=1 starts a fresh interpreter instead, as before; SELECTUNE_TEST_CLI_LOG=<file> lists those
calls and the keys that made them.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# keys a call may change and still fork:
# - what the CLI reads only when a command runs, never at import;
# - two offline switches main() sets itself before anything reads them (config.set_network; a test that runs it
#   in-process leaves them set in its worker); HF_HUB_OFFLINE is not one of them: a call that changes it gets a
#   fresh interpreter, so the test of a user's HF_HUB_OFFLINE=0 runs as from the user's shell;
# - TORCHINDUCTOR_CACHE_DIR, which torch sets in a worker that compiled something, and reads only to compile;
# - the Intel OpenMP settings sklearn and joblib set when imported (in a worker, or by the CLI when it scores F1),
#   which this torch (GNU OpenMP) never reads;
# - TMPDIR, which `tempfile` reads once and caches: the child clears that cache, so it reads the call's own (the
#   refusal tests put it inside the folder they watch).
FORK_SAFE_ENV = frozenset({"SELECTUNE_DATA", "SELECTUNE_DEBUG", "PYTEST_CURRENT_TEST", "COMP_LINE",
                           "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCHINDUCTOR_CACHE_DIR",
                           "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TMPDIR"})

SERVER = r"""
import json, os, runpy, sys, tempfile
from selectune.config import set_network
set_network(False)  # as main() does before huggingface_hub is imported
import hydra, selectune.cli, selectune.commands, selectune.sweep  # noqa: F401  what every call imports
from transformers import BertForSequenceClassification, LlamaForCausalLM  # noqa: F401  the tests' two families
requests, replies = sys.stdin, sys.stdout
print(json.dumps({"ready": os.getpid()}), file=replies, flush=True)
for line in requests:
    call = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the call: as `python -m selectune <args>` started in call["cwd"] with call["env"]
        os.chdir(call["cwd"])
        os.environ.clear()
        os.environ.update(call["env"])
        tempfile.tempdir = None  # read again from this call's TMPDIR, as a fresh interpreter would
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, call["stdout"], os.O_WRONLY),
                                (2, call["stderr"], os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.path[0] = os.getcwd()
        sys.argv = ["-m", *call["args"]]
        runpy.run_module("selectune", run_name="__main__", alter_sys=True)
        sys.exit(0)
    print(json.dumps({"pid": pid}), file=replies, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)
"""


class CliServer:
    """One pre-imported interpreter that forks a child per CLI call; `run` returns what subprocess.run would."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        log, self.log = tempfile.mkstemp(prefix="selectune-cli-server-", suffix=".log")  # the server's own errors
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, env=self.env, cwd=tempfile.gettempdir(), bufsize=0)
        os.close(log)
        self.pending = b""  # read from the server, not yet a whole line
        self.busy = threading.Lock()
        self.ready = False
        self.served = 0  # calls forked so far

    def reply(self, timeout: float) -> dict:
        """The server's next line; TimeoutError when none comes within `timeout` seconds."""
        assert self.proc.stdout is not None
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the CLI test server ended; see {self.log}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def unsafe_changes(self, env: dict[str, str]) -> set[str]:
        """The keys in which this environment differs from the server's and a fork could not honour."""
        return {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)} - FORK_SAFE_ENV

    def forks(self, env: dict[str, str]) -> bool:
        """Whether a call with this environment behaves in a fork as in a fresh interpreter."""
        return self.proc.poll() is None and not self.unsafe_changes(env)

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        assert self.proc.stdin is not None
        command = [sys.executable, "-m", "selectune", *args]
        if not self.ready:
            self.reply(600)  # the imports, once per worker
            self.ready = True
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            out.touch()
            err.touch()
            call = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(call).encode() + b"\n")
            pid = self.reply(60)["pid"]
            try:
                returncode = self.reply(timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, 9)
                self.reply(60)
                raise subprocess.TimeoutExpired(command, timeout) from None
            self.served += 1
            return subprocess.CompletedProcess(command, returncode, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        os.unlink(self.log)


_server: CliServer | None = None
BASE_ENV = dict(os.environ)  # as conftest set it, before any test's monkeypatch: what the server imports under


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m selectune ...` as a user would, in `cwd`: a fork of the worker's pre-imported server where
    that behaves the same (module docstring), else (or with `fresh`) a fresh interpreter."""
    global _server
    full_env = {**os.environ, **(env or {})}
    if not fresh and os.environ.get("SELECTUNE_TEST_FRESH") != "1":
        if _server is None:
            _server = CliServer({k: v for k, v in BASE_ENV.items() if k not in FORK_SAFE_ENV})
            atexit.register(_server.close)
        if _server.forks(full_env) and "online=true" not in args and _server.busy.acquire(blocking=False):
            try:
                return _server.run(list(args), Path(cwd).resolve(), full_env, timeout)
            finally:
                _server.busy.release()
        if os.environ.get("SELECTUNE_TEST_CLI_LOG"):  # why this call was not forked
            with open(os.environ["SELECTUNE_TEST_CLI_LOG"], "a") as log:
                log.write(f"fresh: {' '.join(args[:2])}: {sorted(_server.unsafe_changes(full_env))}\n")
    return subprocess.run([sys.executable, "-m", "selectune", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
