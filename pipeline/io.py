"""Atomic file writes: a crash never leaves a half-written artifact under the real name."""
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
    """Hold a lock file naming its owner (host and pid) while one process works on ``what``.

    A lock left by a killed process on this host is taken over; one held by a live process, or by
    another host (which cannot be checked from here), is refused with a line saying how to clear it.
    """
    import socket

    from .errors import LockHeld, PipelineError

    path = Path(path)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK)
            break
        except FileExistsError:
            try:
                owner = path.read_text().strip()
            except FileNotFoundError:
                continue  # released meanwhile
            host, _, pid = owner.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # its process is gone (killed): take over
                continue
            raise LockHeld(f"{path}: {what} is being worked on by {owner or 'another process'} (host pid); "
                           f"wait for it to finish, or delete this file if that process is gone") from None
    else:
        raise PipelineError(f"{path}: could not take the lock for {what}")
    try:
        os.write(fd, me.encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
