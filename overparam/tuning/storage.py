"""Optuna storages for ``overparam tune``, all with heartbeats so a killed worker's trial is retried.

``--storage`` takes:

- ``sqlite:///path/study.db`` (the default, in the output folder): one process, or a few workers on
  one host at the cost of lock waits. SQLite serializes writers, and Optuna's documentation
  advises against it for parallel optimization.
- ``journal:///abs/path/study.log`` or ``journal://relative/path.log``: our syntax for Optuna's
  ``JournalStorage`` on a ``JournalFileBackend``, for several processes on one host (or on a shared
  file system whose locks work).
- ``postgresql://user:password@host:port/db`` (or any other SQLAlchemy URL): several machines.

RDB storages (SQLite, PostgreSQL) use Optuna's own heartbeat: each running trial records a
timestamp every ``heartbeat_interval`` seconds. Before a worker starts a new trial, it fails the
trials whose last heartbeat is older than ``grace_period``. Optuna 5.1's ``JournalStorage`` has no
heartbeat, so ``JournalHeartbeatStorage`` adds one: the timestamp is a trial system attribute. In
both cases ``RetryHeartbeatStaleTrialCallback`` re-queues a stale trial as a WAITING copy with the
same parameters and the system attributes ``failed_trial`` and ``retry_history``.
"""

import importlib.util
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal://"
HEARTBEAT_ATTR = "overparam:heartbeat"
# Seconds SQLite waits for another process's write lock before raising "database is locked".
SQLITE_LOCK_TIMEOUT_S = 60


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """``JournalStorage`` with Optuna's heartbeat protocol, so ``study.optimize`` fails stale trials.

    The heartbeat is a wall-clock timestamp (``time.time()``) stored as the trial system attribute
    ``overparam:heartbeat``. A RUNNING trial is stale when the later of that timestamp and its start
    time is more than ``grace_period`` seconds old.

    NOTE: workers on different machines that share the journal file compare their own clocks, so
    their clock offset must stay well below the grace period.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int | None = None,
        stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be a positive number of seconds, got {heartbeat_interval}.")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period if grace_period is not None else 2 * heartbeat_interval
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            # Another worker failed this trial as stale; the owner learns it when it reports the result.
            log.warning("Trial id %d already finished; its heartbeat was not recorded.", trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial inherits the heartbeat of the trial it replaces, so the start time counts too.
            started = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
            last_beat = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last_beat > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback


def default_storage_url(output_dir: Path) -> str:
    """Return the SQLite URL of ``study.db`` in ``output_dir``."""
    return f"sqlite:///{(output_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_interval: int = 60, grace_period: int | None = None, max_retry: int | None = 3) -> BaseStorage:
    """Open the storage at ``url`` with heartbeats and retries of stale trials.

    Args:
        url: ``journal://PATH`` or an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``).
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without a heartbeat after which a running trial is failed; None is
            twice the interval.
        max_retry: How many times one trial is re-queued after its worker died; None retries forever.
    """
    with warnings.catch_warnings():
        # The heartbeat API is marked experimental since Optuna 2.8.
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if url.startswith(JOURNAL_PREFIX):
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalHeartbeatStorage(JournalFileBackend(str(path)), heartbeat_interval, grace_period, retry)

    if "://" not in url:
        raise ValueError(
            f"Storage {url!r} is not a URL; use sqlite:///path/study.db, journal:///path/study.log "
            "or postgresql://user@host:port/database."
        )
    url = with_postgres_driver(url)
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        database = url.split(":///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry,
        )


def with_postgres_driver(url: str) -> str:
    """Return ``url`` with an explicit psycopg2 driver when it names none and only psycopg2 is installed.

    SQLAlchemy 2.1 resolves a bare ``postgresql://`` to the psycopg (version 3) driver, while the
    project's test dependencies install psycopg2-binary.
    """
    scheme, separator, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not separator:
        return url
    if importlib.util.find_spec("psycopg") is not None or importlib.util.find_spec("psycopg2") is None:
        return url
    return f"postgresql+psycopg2://{rest}"


def journal_path(url: str) -> Path:
    """Return the file of a ``journal://`` URL: ``journal:///abs/f.log`` is ``/abs/f.log``."""
    path = url[len(JOURNAL_PREFIX):]
    if not path:
        raise ValueError(f"Storage {url!r} names no file; write journal:///absolute/path.log or journal://relative/path.log.")
    return Path(path)


def display_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and printed commands."""
    if url.startswith(JOURNAL_PREFIX) or url.startswith("sqlite:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part.
        return url.split("@", 1)[-1]


def dashboard_command(url: str) -> str:
    """Return the ``optuna-dashboard`` command line that opens this storage.

    optuna-dashboard opens an existing file path as a journal file and any other string as an RDB URL.
    """
    if url.startswith(JOURNAL_PREFIX):
        return f"optuna-dashboard {journal_path(url)}"
    return f"optuna-dashboard '{display_url(with_postgres_driver(url))}'"
