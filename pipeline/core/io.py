"""Atomic file writes (a crash never leaves a half-written artifact under the real name) and job locks."""

from __future__ import annotations

import hashlib
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
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if (any_owner or _writer_gone(p.name)) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _writer_gone(name: str) -> bool:
    """Whether the writer a temporary name records (``.<what>.<host>-<pid>.<random>.tmp``) was a
    process of this host that no longer runs."""
    import re
    import socket

    m = re.match(r"^\..+\.([^.]+)-(\d+)\.[^.]+\.tmp$", name)
    return m is not None and m.group(1) == socket.gethostname().replace(".", "_") and not _alive(int(m.group(2)))


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | Path, df, **kw) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kw)


class Staging:
    """The files a stage writes, gathered in a hidden folder inside ``folder`` until they all exist
    (see ``staged``)."""

    def __init__(self, *, folder: Path, dir: Path, last: list[Path]):
        self.folder, self.dir, self.last = folder, dir, [Path(p) for p in last]
        self._moves: dict[Path, Path] = {}  # staged file -> where it goes, in the order staged
        self._removals: list[Path] = []
        self._undo: list = []

    def path(self, dest: str | Path) -> Path:
        """Where to write the file that belongs at ``dest`` (a file directly in the folder)."""
        dest = Path(dest)
        if dest.parent != self.folder:
            raise ValueError(f"{dest}: not a file of {self.folder}")
        tmp = self.dir / dest.name
        self._moves[tmp] = dest
        return tmp

    def remove(self, dest: str | Path) -> None:
        """Delete ``dest`` (a stale file of an earlier run) when the stage commits, not before."""
        self._removals.append(Path(dest))

    def undo(self, fn) -> None:
        """Call ``fn()`` if the stage fails after this point (e.g. remove a file written elsewhere)."""
        self._undo.append(fn)

    def _outside(self, e: BaseException) -> BaseException | None:
        """The same error naming the artifact rather than its staged copy (None: it names neither)."""
        from pipeline.core.errors import PipelineError

        inner = str(self.dir)
        if isinstance(e, OSError) and str(e.filename or "").startswith(inner):
            return _naming(e, Path(str(e.filename).replace(inner, str(self.folder), 1)))
        if isinstance(e, PipelineError) and inner in str(e):
            return type(e)(str(e).replace(inner, str(self.folder)))
        return None

    def _commit(self) -> None:
        never = [d for t, d in self._moves.items() if not t.is_file()]
        if never:  # a bug of the stage: refuse before anything in the folder changes
            raise RuntimeError(f"{never[0]}: staged but never written")
        # The done markers go first (so a commit cut short reads as "not done") and come back last.
        for dest in reversed(self.last):
            dest.unlink(missing_ok=True)
        for dest in self._removals:
            dest.unlink(missing_ok=True)
        rank = {d: i for i, d in enumerate(self.last)}
        for tmp, dest in sorted(self._moves.items(), key=lambda move: rank.get(move[1], -1)):
            try:
                os.replace(tmp, dest)
            except OSError as e:
                raise _naming(e, dest) from None


@contextmanager
def staged(folder: str | Path, *, last: list[str | Path] = ()):
    """A stage's outputs, all or nothing: yield a ``Staging`` whose ``path(dest)`` is where to write
    each output; when the block ends normally every staged file is renamed into ``folder``, the
    ``last`` ones (the stage's done markers) after all others. If the block raises, nothing in
    ``folder`` has changed: the staging folder is removed and ``undo`` callbacks run."""
    import shutil

    folder = Path(folder)
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(".staging.*.tmp"):  # left by a killed process
            if _writer_gone(old.name):
                shutil.rmtree(old, ignore_errors=True)
        stage = Staging(
            folder=folder,
            dir=Path(tempfile.mkdtemp(prefix=f".staging.{_owner()}.", suffix=".tmp", dir=folder)),
            last=[Path(p) for p in last],
        )
    except OSError as e:
        raise _naming(e, folder) from None
    try:
        yield stage
        stage._commit()
    except BaseException as e:
        for fn in reversed(stage._undo):
            try:
                fn()
            except OSError:
                pass  # the original fault is the one to report
        outside = stage._outside(e)
        if outside is not None:
            raise outside from None
        raise
    finally:
        shutil.rmtree(stage.dir, ignore_errors=True)
        if made:
            try:
                folder.rmdir()  # only when empty: a failed first run leaves no folder behind
            except OSError:
                pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object file of the pipeline's own; anything else is one line naming the file and ``fix``
    (what rebuilds it)."""
    raw = Path(path).read_bytes()
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        found = "an empty file" if not raw.strip() else f"invalid JSON: {str(e).splitlines()[0][:80]}"
    else:
        if isinstance(d, dict):
            return d
        found = f"a JSON {type(d).__name__}"
    from pipeline.core.errors import PipelineError

    raise PipelineError(f"{path}: not a JSON object; {fix} (found {found})")


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

    from pipeline.core.errors import LockHeld, PipelineError

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
        raise LockHeld(
            f"{path}: {what} is being worked on by {owner or 'another process'} (host pid); "
            "wait for it to finish (a process that dies releases its lock)"
        ) from None
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise PipelineError(
                f"{path}: this filesystem does not support file locks ({e.strerror}); "
                "put the run folder on a local disk or a lock-capable NFS mount"
            ) from None
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
