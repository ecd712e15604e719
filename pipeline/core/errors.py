"""What a user sees when a command fails: one line on stderr and a documented exit code.

2  bad input (``PipelineError``) or an operating-system fault (``OSError``: full disk, read-only
   folder, missing permission), the line naming the file and the cause
1  an unexpected error (a bug): ``internal error: ... (traceback saved to <file>)``
130  interrupted (Ctrl-C)
"""


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


def describe_os_error(e: OSError) -> str:
    """``<path>: <cause> (<ERRNO>)``, naming both paths of a failed rename."""
    import errno as _errno

    code = _errno.errorcode.get(e.errno or 0, "")
    cause = e.strerror or str(e) or type(e).__name__
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where or 'operating system'}: {cause}" + (f" ({code})" if code else "")
