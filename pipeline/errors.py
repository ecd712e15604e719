"""The one error type users see: a single line, exit code 2."""


class PipelineError(Exception):
    """Bad input from a user: the CLI prints ``str(err)`` alone and exits 2.

    Messages name the file, the row/id/key, what is wrong and what was expected.
    """

    exit_code = 2


def fail(where, problem: str, expected: str | None = None) -> "PipelineError":
    """Build a uniform one-line message: ``where: problem (expected ...)``."""
    msg = f"{where}: {problem}"
    if expected:
        msg += f"; expected {expected}"
    return PipelineError(msg.replace("\n", " "))


class LockHeld(PipelineError):
    """Another live process holds the lock of a job (e.g. a fold trained on another GPU)."""
