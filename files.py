"""Files written whole or not at all, and one-line errors when they cannot be written."""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

import torch

from errors import UserError

REASONS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is used up"}


def write_error(path: Path, error: OSError, remedy: str = "free space or choose a writable folder") -> UserError:
    """A UserError for a file or folder that could not be written."""
    return UserError(f"cannot write {path}: {REASONS.get(error.errno, error.strerror or str(error))}; {remedy}")


def refuse_to_overwrite(output: Optional[Path], option: str, inputs: Iterable[Path]) -> None:
    """A UserError, before anything is computed, when `option`'s output path is one of the inputs
    (a checkpoint, a run's files) or lies inside an input folder (the data)."""
    if output is None:
        return
    target = Path(output).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source.is_dir() and source in target.parents:
            raise UserError(f"{option} {output} would overwrite {source}; give a path outside the run's files "
                            "and the data folder")


def atomic_write(path: Path, write: Callable[[Path], object],
                 remedy: str = "free space or choose a writable folder") -> None:
    """write(tmp) to a temporary file beside path, then rename it over path, so that path holds
    the old content or the new, never part of it. The temporary is named by the process, so that
    two processes writing one file (torchrun's ranks, two evals) never share it, and created
    anew, so that a file or symlink already at its name is never written through; a failed
    write leaves none behind, and those of killed processes go at the next write. A full disk or
    read-only folder is a UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for left in path.parent.glob(f".{path.name}.*.tmp"):  # by processes killed while they wrote path
        if not alive(left.name.removeprefix(f".{path.name}.").removesuffix(".tmp")):
            discard(left)
    try:
        discard(tmp)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        discard(tmp)
        raise write_error(path, e, remedy) from None
    except BaseException:
        discard(tmp)
        raise


def alive(pid: str) -> bool:
    """Whether the process `pid` runs (a name that is no process id counts as alive: kept)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's
        return True
    return True


def discard(path: Path) -> None:
    """Remove a file if it is there and may be removed (a read-only folder keeps it)."""
    try:
        path.unlink()
    except OSError:
        pass


def torch_save(obj: object, path: Path) -> None:
    """torch.save, with a failed write reported as the OSError it is: torch's file writer turns
    the error of a write that fails half-way (a disk that fills) into a RuntimeError ("unexpected
    pos"), so every write goes through a file that keeps the first error to raise it instead."""
    with open(path, "wb") as f:
        writes = KeptErrors(f)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is None:
                raise
            raise writes.error from None


class KeptErrors:
    """A binary file's write that keeps the first OSError it raises."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def take_lock(path: Path, what: str) -> Callable[[], None]:
    """Hold the lock file `path` (an flock, which the system releases when its process ends, so a
    killed process leaves no stale lock), its text this process's id; or refuse with a UserError
    naming the process that holds it. Returns the function that releases it. `what` names the
    locked thing in messages."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{what} is in use by process {holder} (lock file {path}); wait for it to end, "
                            "or choose another trainer_config.run_name") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its holder released and removed it while this process waited: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())

    def release() -> None:
        path.unlink(missing_ok=True)
        os.close(fd)
    return release
