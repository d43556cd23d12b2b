"""Where selectune writes, and who may write there.

Three rules keep a user's earlier work safe:
- one process owns a run folder at a time: an advisory `flock` on the folder itself (nothing is written
  into it, and the kernel drops the lock when the process ends, however it ends); a second process is
  refused with the holder's pid, read from /proc/locks;
- a write never follows a symbolic link: the target and every folder between it and the folder the user
  named must be real, so a link planted in a run folder cannot redirect a write elsewhere;
- a staging folder holds what Hydra writes before a run may proceed (`.hydra/`, `train.log`), so a
  refused command leaves an existing run folder byte-identical; `adopt_staging` moves it in once the
  run proceeds.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selectune.errors import SelectuneError

_HELD: dict[str, int] = {}  # resolved run folder -> the descriptor whose flock this process holds


def lock_holder(folder: Path) -> int | None:
    """The pid holding a flock on `folder`, from /proc/locks (Linux); None when it cannot be told."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        major, minor, inode = fields[5].split(":")
        if (int(inode) == st.st_ino and int(major, 16) == os.major(st.st_dev)
                and int(minor, 16) == os.minor(st.st_dev)):
            return int(fields[4])
    return None


def lock_run_dir(folder: Path) -> None:
    """Own `folder` (an existing directory) until `unlock_run_dir` or the end of this process."""
    key = str(folder.resolve())
    if key in _HELD:
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        holder = lock_holder(folder)
        who = f"pid {holder}" if holder else "another process"
        raise SelectuneError(f"{folder} is in use by {who} (a selectune run writes there); wait for it to end "
                             f"or choose another out_dir") from None
    _HELD[key] = fd


def unlock_run_dir(folder: Path) -> None:
    fd = _HELD.pop(str(folder.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def check_target(path: Path, root: Path) -> Path:
    """`path` if writing it cannot leave `root`: neither it nor a folder between `root` and it is a
    symbolic link (`root` itself is what the user named, and may be one)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise SelectuneError(f"refusing to write {path}: it is not inside {root}") from None
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise SelectuneError(f"refusing to write through the symbolic link {current} "
                                 f"(-> {os.readlink(current)}); remove it or choose another folder")
    return path


def check_no_links(folder: Path) -> None:
    """Refuse a run folder holding a symbolic link: everything a run writes there must stay there."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        check_target(entry, folder)


def write_text(path: Path, text: str, root: Path) -> None:
    """Write `text` to `path` inside `root`, never through a symbolic link (O_NOFOLLOW on the file), whole or
    not at all: into a temporary file renamed over `path`, so a full disk leaves the previous file as it was."""
    check_target(path, root)
    tmp = check_target(path.with_name(f".{path.name}.tmp"), root)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, whose write failures (a full disk) come as `SafetensorError`, not OSError:
    turned into the OSError they are, with the errno the message names, and no partial file left."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        path.unlink(missing_ok=True)
        code = re.search(r"(?:code: |os error )(\d+)", str(err))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number) if code else safetensors_why(err), str(path)) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def publish_dir(target: Path, write: Callable[[Path], None], what: str = "out") -> None:
    """`write` a folder's files into a fresh folder beside `target`, then rename it into place. A failure (a
    full disk) leaves no partial `target` and none of the parent folders this call created, and no folder but
    those is ever removed; it is one line naming `target`. `target` may exist only as an empty folder."""
    from safetensors import SafetensorError

    made = next((p for p in reversed([target.parent, *target.parent.parents]) if not p.exists()), None)
    make_dir(target.parent, what)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        write(tmp)
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # empty (the caller checked); a file put there meanwhile fails here
        tmp.rename(target)
        tmp = None
    except (OSError, SafetensorError) as err:  # transformers writes model.safetensors with safetensors' own error
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        why = err.strerror if isinstance(err, OSError) and err.strerror else safetensors_why(err)
        raise SelectuneError(f"cannot write {what}={target}: {why}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def safetensors_why(err: BaseException) -> str:
    """A safetensors error in a few words: the OS's own message for the errno it wraps ("... (os error 28)",
    "Os { code: 28, ... }"), else its first line."""
    import re

    code = re.search(r"(?:code: |os error )(\d+)", str(err))
    if code:
        return os.strerror(int(code.group(1)))
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def check_folder(path: Path, what: str = "out_dir") -> None:
    """A folder selectune may create or fill: not empty, not a file, not under a file, writable."""
    if str(path) in ("", "."):
        raise SelectuneError(f"{what} is empty; name the folder to write to ({what}=runs/my_run)")
    check_creatable(path, what)


def check_creatable(path: Path, what: str) -> None:
    """`path` is a folder or can become one: not a file, not under a file, not a dangling link."""
    if path.is_symlink() and not path.is_dir():
        raise SelectuneError(f"{what}={path} is a dangling symbolic link; choose another folder")
    if path.exists() and not path.is_dir():
        raise SelectuneError(f"{what}={path} is a file, not a folder; choose another {what}")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise SelectuneError(f"{what}={path}: {existing} is a dangling symbolic link; choose another folder")
        existing = existing.parent
    if not existing.is_dir():
        raise SelectuneError(f"{what}={path} is under {existing}, which is a file; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SelectuneError(f"{what}={path}: {existing} is not writable; choose another {what}")


def make_dir(path: Path, what: str = "out_dir") -> None:
    """mkdir -p with one-line errors (a read-only file system, a full disk, ...)."""
    check_creatable(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SelectuneError(f"cannot create {what}={path}: {err.strerror or err}") from None


def make_run_dir(path: Path) -> bool:
    """Create a run folder (and its parents); True only when this call made the folder itself, so that a
    process racing for the same new folder never takes it for its own."""
    check_creatable(path, "out_dir")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise SelectuneError(f"cannot create out_dir={path}: {err.strerror or err}") from None


STAGE_PREFIX = "selectune-stage-"


def new_staging() -> Path:
    """A fresh staging folder for Hydra's files, named for this process (`selectune-stage-<pid>-...` in the
    temp folder). Those a killed run left (SIGKILL gives no chance to clean up) are removed first: a folder
    whose process no longer exists. A live process's folder, or one we may not signal, stays."""
    import tempfile

    for old in Path(tempfile.gettempdir()).glob(f"{STAGE_PREFIX}*-*"):
        pid = old.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another user's live process
            continue
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-"))


def adopt_staging(stage: Path, run_dir: Path) -> None:
    """Move what Hydra wrote into `stage` (`.hydra/`, `<job>.log`) into `run_dir` now that the run proceeds:
    `.hydra/` replaces the old one, a log is appended to the old log, and open log handlers follow."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == stage]
    for handler in handlers:
        handler.acquire()
        handler.flush()
        if handler.stream is not None:
            handler.stream.close()
            handler.stream = None  # type: ignore[assignment]
    for entry in sorted(stage.iterdir()):
        target = check_target(run_dir / entry.name, run_dir)
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(entry), str(target))
        else:
            with entry.open("rb") as src, target.open("ab") as dst:
                shutil.copyfileobj(src, dst)
    for handler in handlers:
        handler.baseFilename = str(run_dir / Path(handler.baseFilename).name)
        handler.stream = handler._open()
        handler.release()
    shutil.rmtree(stage, ignore_errors=True)


PROCEEDED: list[Path] = []  # the run folders this process wrote into, every check passed (write_hydra_record)


def write_hydra_record(run_dir: Path, cfg: Any) -> None:
    """Hydra's record of a run (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`), written once the run
    proceeds. Hydra's own `output_subdir` is off (train.yaml, probe.yaml): it writes before selectune has
    checked anything, so a refused run would rewrite an earlier run's record."""
    from omegaconf import OmegaConf

    PROCEEDED.append(run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under hydra.main (the API, tests): no record to write
        return
    folder = check_target(run_dir / ".hydra", run_dir)
    new, old = check_target(run_dir / ".hydra.new", run_dir), check_target(run_dir / ".hydra.old", run_dir)
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    new.mkdir()
    try:
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
        for name, node in (("config.yaml", task_cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                           ("overrides.yaml", hydra_cfg.overrides.task)):
            write_text(new / name, OmegaConf.to_yaml(node), run_dir)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # the earlier record stays as it was
        raise
    if folder.is_dir():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


class SweepRecord:
    """A multirun's folder as it was before Hydra wrote `multirun.yaml` into it (that happens before any job
    is checked). When no job proceeds, `restore` puts it back: the earlier sweep's record byte for byte, or
    no folder at all where Hydra made it for this sweep (only its record and empty job folders inside)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.existed = folder is not None and (folder.exists() or folder.is_symlink())
        record = None if folder is None else folder / "multirun.yaml"
        self.record = record.read_bytes() if record is not None and record.is_file() and not record.is_symlink() \
            else None

    def restore(self, made: Path | None = None) -> bool:
        """Undo Hydra's writes; `made` is the sweep folder the jobs saw (the default one is named by time).
        True when a folder Hydra made was removed."""
        folder = self.folder or made
        if folder is None or not folder.is_dir() or folder.is_symlink():
            return False
        record = folder / "multirun.yaml"
        if not self.existed:  # made for this sweep: removed if it holds only Hydra's record and empty job folders
            if all(e.name == "multirun.yaml" or (e.is_dir() and not e.is_symlink() and not any(e.iterdir()))
                   for e in folder.iterdir()):  # (another process's files there are never removed)
                shutil.rmtree(folder)
                return True
            return False
        if self.record is not None and not record.is_symlink() and record.read_bytes() != self.record:
            write_text(record, self.record.decode(), folder)  # whole: a temp file renamed over it
        elif self.record is None and record.is_file() and not record.is_symlink():
            record.unlink()
        return False


def drop_staging(stage: Path) -> None:
    """Close the log handlers writing into `stage` and remove it: the run never proceeded."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == stage:
            handler.close()
            root.removeHandler(handler)
    shutil.rmtree(stage, ignore_errors=True)
