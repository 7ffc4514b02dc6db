"""The MLflow tracking store: where it is, how URLs are recorded, and a server that goes away."""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from rlhf_tasks.config import Params
from rlhf_tasks.errors import TrackingServerError

# A tracking server that goes away: each request is retried with exponential backoff for about a
# minute (after 0, 4, 8, 16 and 32 s), so a server restart is waited for and a longer outage
# fails the run in bounded time (``server_errors``). MLflow's own defaults (7 retries, factor 2)
# wait over 4 minutes per request, and a failing run makes several. The entry points set these
# defaults (``rlhf_tasks/environment.py``); set the variables to choose otherwise.
# MLFLOW_HTTP_REQUEST_TIMEOUT (120 s per attempt, for a server that accepts a connection and
# never answers) is left as it is: a large model's upload may need it.
RETRIES, BACKOFF = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
HTTP_DEFAULTS = {RETRIES: "5", BACKOFF: "2"}


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded store: ``mlflow.db`` in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


_SECRET_QUERY = ("pass", "pwd", "token", "secret", "key", "signature", "credential")


def redact_url(url: str) -> str:
    """``url`` as it may be recorded or shown: without the user name and password it may embed
    (``http://user:token@host``, ``postgresql://user:pass@host/db``) and with the values of
    query parameters that hold secrets (``?password=...``, ``?X-Amz-Signature=...``) masked."""
    parts = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    secret = [any(s in k.lower() for s in _SECRET_QUERY) for k, _ in pairs]
    if not parts.scheme or ("@" not in parts.netloc and not any(secret)):
        return url  # unchanged, not rebuilt (urlunsplit would turn sqlite://// into sqlite://)
    masked = [(k, "***" if hide else v) for (k, v), hide in zip(pairs, secret, strict=True)]
    return urllib.parse.urlunsplit(
        parts._replace(
            netloc=parts.netloc.rpartition("@")[2],
            query=urllib.parse.urlencode(masked, safe="*") if any(secret) else parts.query,
        )
    )


def configure(params: Params) -> None:
    """Point MLflow at the store and the experiment of ``params.tracking``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with server_errors(""):
        current_experiment["id"] = mlflow.set_experiment(params.tracking.experiment).experiment_id


current_experiment: dict[str, str] = {}  # the experiment configure() set


# -- a tracking server that does not answer ------------------------------------------------------

_guarded = [0]  # how deep this process is in server_errors blocks


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unanswered(exc: BaseException) -> BaseException | None:
    """The innermost cause if ``exc`` is MLflow's client giving up on a request to the tracking
    server (refused, timed out, or answered with errors, after its retries); else None."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    chain = list(_chain(exc))
    from mlflow.exceptions import MlflowException

    if any(
        isinstance(e, MlflowException) and str(e).startswith(f"API request to {uri.rstrip('/')}")
        for e in chain
    ):
        return chain[-1]
    return None


@contextlib.contextmanager
def server_errors(what: str) -> Iterator[None]:
    """Turn MLflow's client giving up on the tracking server into a TrackingServerError that
    names the server and the cause. From then on this process's requests are not retried (the
    runs it still ends would each wait the whole backoff again, for a run that has failed);
    the outermost block puts the retries back when it ends."""
    retries = os.environ.get(RETRIES)
    _guarded[0] += 1
    try:
        yield
    except Exception as exc:
        first = next((e for e in _chain(exc) if isinstance(e, TrackingServerError)), None)
        if first is not None and first is not exc:
            raise first from None  # the first failure, not that of ending a run after it
        cause = None if first is not None else _unanswered(exc)
        if cause is None:
            raise
        os.environ[RETRIES] = "0"
        raise TrackingServerError(_unanswered_message(what, cause, retries)) from exc
    finally:
        _guarded[0] -= 1
        if _guarded[0] == 0 and os.environ.get(RETRIES) == "0" and retries != "0":
            with contextlib.suppress(Exception):  # what is queued fails now, not at exit
                import mlflow

                mlflow.flush_async_logging()
            if retries is None:
                os.environ.pop(RETRIES, None)
            else:
                os.environ[RETRIES] = retries


def _unanswered_message(what: str, cause: BaseException, retries: str | None) -> str:
    tries = int(retries or 7)  # MLflow's own default
    factor = int(os.environ.get(BACKOFF) or 2)
    waited = factor * max(2**tries - 2, 0)
    reason = str(cause).strip() or type(cause).__name__
    server = redact_url(tracking_uri())
    return (
        f"{what}: " * bool(what) + f"the MLflow tracking server at {server} did not answer "
        f"({reason[:200]}), retried {tries} times over about {waited} s ({RETRIES}, {BACKOFF}). "
        "Once it is back, run again: the stages that completed are reused, and training "
        "resumes from its last checkpoint"
    )
