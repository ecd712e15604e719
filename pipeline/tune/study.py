"""Where a study lives: the Optuna RDB storage (default SQLite under the tune folder, or any SQLAlchemy URL,
with heartbeats and retries of dead workers' trials), opening or resuming a study, and counting its trials.
Every database problem is one line naming the flag and the URL."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.runs.layout import tune_dir

# ---- storage --------------------------------------------------------------------------


def default_storage(cfg: Config) -> str:
    path = (tune_dir(cfg) / "optuna.db").resolve()
    return f"sqlite:///{path}"


def open_storage(url: str, tc, flag: str = "--storage"):
    """An RDBStorage with heartbeat and retry of dead workers' trials; one-line errors."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:
        raise PipelineError(
            f"{flag} {url!r}: not a database URL; expected e.g. sqlite:///runs/tune.db "
            "or postgresql://user@host:5432/dbname"
        ) from None
    if u.drivername in ("postgresql", "postgres"):  # psycopg 3 is the driver the project installs
        u = u.set(drivername="postgresql+psycopg")
    shown = u.render_as_string(hide_password=True)
    backend = u.get_backend_name()
    kw: dict = {}
    if backend == "postgresql":
        kw = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif backend == "mysql":
        kw = {"connect_args": {"connect_timeout": 10}}
    elif backend == "sqlite":
        kw = {"connect_args": {"timeout": 60}}  # concurrent workers wait for the write lock
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    def connect():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat and retry are "experimental" in optuna
            retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            if retry_cls is not None:  # optuna >= 4.9
                cb = {"heartbeat_stale_trial_callback": retry_cls(max_retry=tc.max_retry)}
            else:
                cb = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=tc.max_retry)}
            return optuna.storages.RDBStorage(
                u.render_as_string(hide_password=False),
                engine_kwargs=kw,
                heartbeat_interval=tc.heartbeat_s,
                grace_period=tc.grace_s,
                **cb,
            )

    try:
        for attempt in range(6):
            try:
                return connect()
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # workers starting together on an empty database race to create optuna's tables
                # (PostgreSQL: duplicate key in pg_type); the loser retries and finds them made
                if attempt == 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except sqlalchemy.exc.NoSuchModuleError:
        raise PipelineError(
            f"{flag} {shown}: unknown database kind {u.drivername!r}; expected sqlite:// or postgresql:// "
            "(any SQLAlchemy URL whose driver is installed)"
        ) from None
    except ImportError as e:
        raise PipelineError(f"{flag} {shown}: the database driver is not installed ({e.name or e})") from None
    except sqlalchemy.exc.OperationalError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise PipelineError(
            f"{flag} {shown}: cannot connect ({reason[0] if reason else type(e).__name__}); "
            "is the server running and the URL right?"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise PipelineError(f"{flag} {shown}: database error ({reason[0] if reason else type(e).__name__})") from None
    except RuntimeError as e:  # optuna's schema version check
        raise PipelineError(
            f"{flag} {shown}: {str(e).splitlines()[0]} (`optuna storage upgrade --storage URL`)"
        ) from None


# ---- study ----------------------------------------------------------------------------


def open_study(cfg: Config, storage, study_name: str, direction: str, sampler, pruner, shown_url: str):
    import optuna

    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as e:  # e.g. the DB refused a write
        raise PipelineError(
            f"--storage {shown_url}: cannot open study {study_name!r} ({str(e).splitlines()[0]})"
        ) from None
    if len(study.directions) != 1:
        raise PipelineError(
            f"--study {study_name}: exists in {shown_url} as a multi-objective study; use another --study name"
        )
    have = study.direction.name.lower()
    if have != direction:
        raise PipelineError(
            f"--study {study_name}: exists in {shown_url} and {have}s, but metric {cfg.metric} is "
            f"{direction}d; use another --study name"
        )
    attrs = study.user_attrs
    if "metric" in attrs and attrs["metric"] != cfg.metric:
        raise PipelineError(
            f"--study {study_name}: exists in {shown_url} for metric {attrs['metric']}, this config's "
            f"metric is {cfg.metric}; use another --study name"
        )
    if "metric" not in attrs:
        study.set_user_attr("metric", cfg.metric)
        study.set_user_attr("competition", cfg.competition)
    return study


def _counted(study, before: int | None = None) -> int:
    from optuna.trial import TrialState

    ts = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    )
    return sum(1 for t in ts if before is None or t.number < before)
