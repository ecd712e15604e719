"""Sibling jobs for a timing: threads training copies of the timed job beside it, as ``train.fold_jobs``
processes train beside each other."""

from __future__ import annotations

from collections.abc import Callable


class _Siblings:
    """``n`` threads training copies of the measured job while it is timed, so the measurement sees the
    contention (shared caches, memory bandwidth, SMT siblings) of ``train.fold_jobs`` processes side by
    side: timed alone, lite0 at 75 px measured ~10% faster than its folds then trained beside each other.
    Threads, not processes: no interpreter to start; they train without augmentation (below), so their
    Python holds the interpreter lock only to dispatch torch's kernels, which run outside it."""

    def __init__(self, *, n: int, make_steps: Callable[[], Callable[[int], float]]):
        import threading

        self.stop, self.ready, self.errors = threading.Event(), threading.Barrier(n + 1), []
        self.threads = [
            threading.Thread(target=self._work, args=(make_steps,), name="plan-sibling", daemon=True) for _ in range(n)
        ]

    def _work(self, make_steps) -> None:
        try:
            steps = make_steps()
            steps(1)  # warm, then in step with the timed job
        except BaseException as e:  # raised in the timed thread, by __enter__
            self.errors.append(e)
            return
        finally:
            self.ready.wait()
        while not self.stop.is_set():
            steps(1)

    def __enter__(self):
        for t in self.threads:
            t.start()
        self.ready.wait()
        if self.errors:
            self.__exit__()
            raise self.errors[0]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()
