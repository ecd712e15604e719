"""``pipeline submit`` and ``pipeline lb --fetch``: a submission file to Kaggle and its score back, through the
official ``kaggle`` package's API (the HTTP calls its CLI makes).

Only a file the pipeline wrote, unchanged since (``check_own``: its sidecar records the CSV's sha256, and the
writer validated it), is sent. The reply (Kaggle's message and the submission's ref) goes into the sidecar,
so ``pipeline experiments`` shows what was submitted; ``lb --fetch`` looks the ref up among the competition's
submissions and records the public score as ``pipeline lb FILE SCORE`` would. Each way it can fail (no
package, no credentials, no network, an HTTP error, a refused upload, a score still pending) is one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.predict.submission import check_own, utc_stamp

log = logging.getLogger(__name__)

_CREDENTIALS = (
    "no Kaggle credentials: set KAGGLE_API_TOKEN, or save the token from https://www.kaggle.com/settings/api "
    "to ~/.kaggle/access_token (or the legacy ~/.kaggle/kaggle.json)"
)


def _api():
    """An authenticated ``KaggleApi``; one line when the package or the credentials are missing."""
    out = io.StringIO()
    try:  # the package authenticates (and prints) when imported
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise PipelineError("the kaggle package is not installed: `pip install kaggle` (>= 1.7)") from None
    import requests

    api = KaggleApi()
    try:  # the package asks Kaggle whether the token is live: the network's failures show here first
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            api.authenticate()
    except requests.exceptions.RequestException as e:
        raise PipelineError(
            f"cannot reach the Kaggle API to check the credentials (no network? {type(e).__name__})"
        ) from None
    except (Exception, SystemExit):
        raise PipelineError(_CREDENTIALS) from None
    return api


def _call(what: str, fn, *args, **kwargs):
    """``fn(*args)`` with the network's failures as one line (no network, an HTTP error)."""
    import requests

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return fn(*args, **kwargs)
    except requests.exceptions.ConnectionError as e:
        raise PipelineError(f"{what}: cannot reach the Kaggle API (no network? {type(e).__name__})") from None
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else "?"
        hint = {401: "; the credentials were refused", 403: "; accept the competition's rules on its page first"}
        raise PipelineError(f"{what}: the Kaggle API answered HTTP {code}{hint.get(code, '')}") from None
    except requests.exceptions.RequestException as e:
        raise PipelineError(f"{what}: the Kaggle API request failed ({type(e).__name__}: {str(e)[:120]})") from None


def submit(path: str | Path, message: str, competition: str | None = None) -> dict:
    """Send a pipeline-written submission file; returns (and records in its sidecar) Kaggle's reply."""
    path = Path(path)
    if not message.strip():
        raise PipelineError("submit: -m MESSAGE is empty; expected a description of the submission")
    meta = check_own(path)  # the file the pipeline wrote and validated, unchanged since
    slug = competition or meta["competition"]
    api = _api()
    reply = _call(f"submit {path.name} to {slug}", api.competition_submit, str(path), message, slug, quiet=True)
    if getattr(reply, "message", "") == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise PipelineError(f"submit {path.name} to {slug}: the upload failed; nothing was submitted")
    record = {
        "competition": slug,
        "message": message,
        "reply": getattr(reply, "message", ""),
        "ref": getattr(reply, "ref", None),
        "submitted_utc": utc_stamp(),
    }
    atomic_write_json(path.with_suffix(".json"), meta | {"kaggle": record})
    log.info(f"submitted {path.name} to {slug}: {record['reply'] or 'no message'} (ref {record['ref']})")
    return record


def fetch_score(path: str | Path, competition: str | None = None) -> float:
    """The public score Kaggle gave a file submitted with ``submit``, recorded with ``record_lb``."""
    from pipeline.evaluate.experiments import record_lb

    path = Path(path)
    meta = check_own(path)
    sent = meta.get("kaggle")
    if not isinstance(sent, dict) or sent.get("ref") in (None, ""):
        raise PipelineError(f"{path}: not submitted by `pipeline submit` (no Kaggle ref in its JSON); submit it first")
    slug = competition or sent.get("competition") or meta["competition"]
    api = _api()
    subs = _call(f"lb --fetch {path.name} from {slug}", api.competition_submissions, slug) or []
    mine = [s for s in subs if s is not None and str(s.ref) == str(sent["ref"])]
    if not mine:
        raise PipelineError(
            f"lb --fetch: submission {sent['ref']} of {path.name} is not among {slug}'s {len(subs)} latest submissions"
        )
    status = str(getattr(mine[0], "status", "")).rsplit(".", 1)[-1].lower()
    score = _number(getattr(mine[0], "public_score", None))
    if score is None:
        what = getattr(mine[0], "error_description", "") or status or "no score yet"
        raise PipelineError(f"lb --fetch: {path.name} on {slug} has no public score yet ({what}); try again later")
    record_lb(path, score)
    return score


def _number(text) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def lb_command(submission: str | Path, score: float | None, *, fetch: bool, competition: str | None = None) -> None:
    """``pipeline lb FILE SCORE`` records a score; ``pipeline lb FILE --fetch`` reads it from Kaggle first."""
    from pipeline.evaluate.experiments import record_lb

    if fetch and score is not None:
        raise PipelineError("lb: give a SCORE or --fetch, not both")
    if fetch:
        fetch_score(submission, competition)
    elif score is None:
        raise PipelineError("lb: missing SCORE; give the leaderboard score, or --fetch it from Kaggle")
    else:
        record_lb(submission, score)
