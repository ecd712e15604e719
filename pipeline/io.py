"""Atomic file writes (a crash never leaves a half-written artifact under the real name) and job locks."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def _owner() -> str:
    import socket

    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"
  # a temp file's name says who writes it, so a sweep can tell a dead writer's


def sweep_temps(folder: str | Path, *, any_owner: bool = False) -> list[Path]:
    """Remove the temporary files of atomic writes in ``folder`` whose writer is gone: a process of
    this host that no longer runs, or, with ``any_owner`` (the caller holds the folder's lock, so
    no one else writes there), every one. A live writer's, or another host's, are left alone."""
    import re
    import socket

    host = socket.gethostname().replace(".", "_")
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        m = re.match(r"^\..+\.([^.]+)-(\d+)\.[^.]+\.tmp$", p.name)
        dead = m is not None and m.group(1) == host and not _alive(int(m.group(2)))
        if (any_owner or dead) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _naming(e: OSError, path: Path) -> OSError:
    """The same fault, naming the artifact being written rather than its hidden temporary file."""
    return type(e)(e.errno, e.strerror or str(e), str(path)) if e.errno is not None else e


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | Path, df, **kw) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kw)


def cache_dir() -> Path:
    """Per-user cache (converted weights, precision choices, image caches); ``PIPELINE_CACHE`` overrides."""
    return Path(os.environ.get("PIPELINE_CACHE") or Path.home() / ".cache" / "competition-pipeline")


@contextmanager
def exclusive(path: str | Path, what: str):
    """Hold an OS file lock (``filelock``, i.e. ``flock``) at ``path`` while this process works on ``what``.

    A held lock is refused at once with ``LockHeld`` naming the holder (host and pid, which the holder
    writes into the file). The kernel releases the lock when its process ends, however it ends, so a
    killed run leaves at most a stale file, which is free to take; no pid checks, no takeover.
    The holder removes the file on release while still holding it; filelock (>= 3.30) drops a lock it
    won on an unlinked file and retries, so no two processes can end up holding different inodes.

    Shared run folder on NFS: Linux emulates ``flock`` there with POSIX locks that the server
    arbitrates (NFSv4, or NFSv3 with lockd), so holders on different machines exclude each other;
    a lock of a crashed machine is freed when the server's lease (v4, ~90 s) or lockd's recovery
    expires. Mounted with ``nolock`` / ``local_lock=all`` each machine only sees its own locks, and
    two machines can train the same fold. A filesystem without locks is refused with a PipelineError.
    """
    import errno
    import socket

    from filelock import FileLock, Timeout

    from .errors import LockHeld, PipelineError

    path = Path(path)
    me = f"{socket.gethostname()} {os.getpid()}".encode()
    held: list[int] = []

    def claim(fd: int) -> None:  # runs with the lock held, before acquire() returns
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        held.append(fd)

    # on_acquired also makes filelock fail closed (no silent soft lock) where flock is missing.
    lock = FileLock(path, timeout=0, on_acquired=claim)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = path.read_text().strip()
        except OSError:  # released (and removed) meanwhile
            owner = ""
        raise LockHeld(f"{path}: {what} is being worked on by {owner or 'another process'} (host pid); "
                       "wait for it to finish (a process that dies releases its lock)") from None
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise PipelineError(f"{path}: this filesystem does not support file locks ({e.strerror}); "
                                "put the run folder on a local disk or a lock-capable NFS mount") from None
        raise
    try:
        yield
    finally:
        try:
            if held and os.path.samestat(os.stat(path), os.fstat(held[0])):
                path.unlink()
        except OSError:
            pass
        lock.release()


def _alive(pid: int) -> bool:
    """Whether a process of this host runs (a temp file's writer; see ``sweep_temps``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
