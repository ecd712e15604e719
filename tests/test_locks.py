"""Job locks (pipeline.core.io.exclusive): one holder at a time, named in the refusal; a dead holder frees it."""

import os
import signal
import socket
import threading

import pytest
from conftest import lock_held_elsewhere

from pipeline.core.errors import LockHeld, PipelineError
from pipeline.core.io import exclusive


def test_a_live_holder_in_another_process_is_named(tmp_path):
    lock = tmp_path / "fold_1" / "lock"
    lock.parent.mkdir()
    with lock_held_elsewhere(lock, "fold 1") as holder:
        with pytest.raises(LockHeld) as e:
            with exclusive(lock, "fold 1"):
                pytest.fail("took a lock another process holds")
        assert isinstance(e.value, PipelineError)
        assert str(e.value).startswith(
            f"{lock}: fold 1 is being worked on by {socket.gethostname()} {holder.pid} (host pid)"
        )
        assert "\n" not in str(e.value)
        assert lock.read_text() == f"{socket.gethostname()} {holder.pid}"  # the refused attempt did not touch it


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    lock = tmp_path / "lock"
    with lock_held_elsewhere(lock, "fold 0") as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # The file survives the crash, owner and all: it must not read as held.
        assert lock.read_text() == f"{socket.gethostname()} {holder.pid}"
        with exclusive(lock, "fold 0"):
            assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
        assert not lock.exists()


def test_one_holder_per_process_and_thread_and_release_on_error(tmp_path):
    lock = tmp_path / "lock"
    with exclusive(lock, "refit"):
        with pytest.raises(LockHeld, match=f"refit is being worked on by {socket.gethostname()} {os.getpid()} "):
            with exclusive(lock, "refit"):
                pass
        seen = []

        def other_thread():
            try:
                with exclusive(lock, "refit"):
                    seen.append("taken")
            except LockHeld:
                seen.append("refused")

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen == ["refused"]
    assert not lock.exists()
    with pytest.raises(KeyboardInterrupt):
        with exclusive(lock, "refit"):
            raise KeyboardInterrupt
    assert not lock.exists()
    with exclusive(lock, "refit"):  # free again
        pass
