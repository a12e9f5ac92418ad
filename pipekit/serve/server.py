"""`pipekit serve`: MLflow's scoring protocol on uvicorn, following an alias of
`<pipeline>.serving` and swapping to each new version without a restart.

The endpoints are MLflow's (`mlflow models serve`): `POST /invocations` takes the same
payloads (`dataframe_split`, `dataframe_records`, `instances`, `inputs`; CSV; Parquet)
and is parsed by MLflow's own scoring code against the model's signature; `/ping` and
`/health` answer 200 once a model is loaded; `/version` says which serving version and
stage versions answer (MLflow's answers the MLflow version only: it is in the JSON too).

Hot reload: a `Follower` thread asks the registry every `poll_interval` seconds where
the alias points. A new version is downloaded, loaded and warmed on its input example
*before* one reference is swapped; a request reads that reference once, so requests in
flight finish on the model they started with and none fails. A version that fails to
load is logged and skipped; the old one keeps answering.

Bad requests never get a 5xx: an oversized body is refused by its Content-Length (or
as it streams in) with 413, a missing or unknown content type gets 415, and anything
MLflow's parsing, schema enforcement or the model rejects gets 400 with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.spec import PipelineSpec
from ..errors import ServeConfigError, ServingError
from .model import reason

log = logging.getLogger(__name__)

#: The environment variable that hands a multi-worker server its settings.
SETTINGS_ENV = "PIPEKIT_SERVE_SETTINGS"
#: Response header naming the serving version that answered.
VERSION_HEADER = "X-Pipekit-Serving-Version"
#: How long a version that failed to load is left alone before it is tried again.
RETRY_FAILED = 60.0


@dataclass(frozen=True)
class Settings:
    """Where the model comes from and how the server answers (plain data: it travels to
    worker processes as JSON). Built by `settings_for` from a checked `ServeSpec`, whose
    defaults are the only ones."""

    uri: str
    name: str
    alias: str | None
    host: str
    port: int
    workers: int
    poll_interval: float
    max_body: int
    timeout: float
    version: str | None = None  # a fixed version: nothing is followed
    access_log: bool = False

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))

    @property
    def following(self) -> str:
        if self.version:
            return f"version {self.version}"
        return f"@{self.alias}" if self.alias else "the latest version"


@dataclass(frozen=True)
class Loaded:
    """A loaded serving version: the pyfunc, its input schema and what it applies."""

    model: Any
    version: str
    chosen: str
    schema: Any
    stages: Mapping[str, str] = field(default_factory=dict)
    loaded_at: float = 0.0
    path: str = ""


class Follower:
    """Holds the model that answers (`current`) and swaps it when the alias moves."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.current: Loaded | None = None
        self.swaps = 0
        self.last_error: str | None = None
        self._failed: dict[str, float] = {}
        self._client: Any = None
        self._workdir = tempfile.mkdtemp(prefix="pipekit-serve-")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- registry --------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            from .registry import open_client

            self._client = open_client(self.settings.uri)
        return self._client

    def target(self) -> tuple[str, str]:
        """The version that should answer now, and why (`@champion`, `latest`, ...)."""
        from .registry import serving_version

        if self.settings.version:
            return self.settings.version, f"version {self.settings.version}"
        return serving_version(self.client, self.settings.name, self.settings.alias)

    def refresh(self) -> bool:
        """Load and swap in the version the alias points to, if it moved; True if swapped."""
        with self._lock:  # one refresh at a time (the poller, or a first load)
            version, chosen = self.target()
            current = self.current
            if current is not None and current.version == version:
                if current.chosen != chosen:
                    self.current = dataclasses.replace(current, chosen=chosen)
                self.last_error = None  # checked, and nothing is wrong now
                return False
            failed_at = self._failed.get(version)
            if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED:
                return False
            try:
                loaded = self._load(version, chosen)
            except Exception as exc:
                self._failed[version] = time.monotonic()
                self.last_error = f"v{version}: {type(exc).__name__}: {exc}"
                if current is None:
                    raise ServingError(
                        f"{self.settings.name} v{version} cannot be loaded: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                log.error(
                    "pipekit serve: %s v%s failed to load, v%s keeps answering: %s",
                    self.settings.name,
                    version,
                    current.version,
                    self.last_error,
                )
                return False
            self.current = loaded  # the swap: one reference; requests read it once
            self.last_error = None
            if current is not None:
                self.swaps += 1
                log.warning(
                    "pipekit serve: now answering with %s v%s (%s), was v%s",
                    self.settings.name,
                    version,
                    chosen,
                    current.version,
                )
                shutil.rmtree(current.path, ignore_errors=True)  # loaded: files not needed
            return True

    def _load(self, version: str, chosen: str) -> Loaded:
        import mlflow.pyfunc

        from .export import METADATA_KEY
        from .registry import download

        where_to = tempfile.mkdtemp(prefix=f"v{version}-", dir=self._workdir)
        try:
            path = download(self.client, self.settings.uri, self.settings.name, version, where_to)
            model = mlflow.pyfunc.load_model(path)
            example = _input_example(model)
            if example is not None:  # warm up, and prove it answers, before it is swapped in
                model.predict(example)
        except BaseException:
            shutil.rmtree(where_to, ignore_errors=True)
            raise
        record = (model.metadata.metadata or {}).get(METADATA_KEY) or {}
        return Loaded(
            model=model,
            version=version,
            chosen=chosen,
            schema=model.metadata.get_input_schema(),
            stages=dict(record.get("stages") or {}),
            loaded_at=time.time(),
            path=where_to,
        )

    # --- the poller ------------------------------------------------------------------

    def start(self) -> None:
        """Poll the registry in a daemon thread (nothing to follow for a fixed version)."""
        if self.settings.version or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="pipekit-serve-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                self.refresh()
            except Exception as exc:  # the registry away for a moment: keep answering
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("pipekit serve: cannot check %s: %s", self.settings.name, exc)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.settings.poll_interval + 30)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """What `/version` answers."""
        from mlflow.version import VERSION

        from .. import __version__

        loaded = self.current
        return {
            "model": self.settings.name,
            "version": loaded.version if loaded else None,
            "chosen": loaded.chosen if loaded else None,
            "following": self.settings.following,
            "stages": dict(loaded.stages) if loaded else {},
            "loaded_at": _iso(loaded.loaded_at) if loaded else None,
            "swaps": self.swaps,
            "last_error": self.last_error,
            "mlflow_version": VERSION,
            "pipekit_version": __version__,
        }


def _input_example(model: Any) -> Any:
    try:
        return model.input_example
    except Exception:  # no example saved, or it cannot be read: nothing to warm up with
        return None


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))


# --- the ASGI app ---------------------------------------------------------------------------


def create_app(follower: Follower) -> Any:
    """The Starlette app of the scoring protocol over `follower`'s current model."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    settings = follower.settings
    limit = settings.max_body
    # MLflow logs a hint for every request that fails schema enforcement: the client gets
    # the reason in the response, so the server's log stays quiet about bad requests.
    logging.getLogger("mlflow.pyfunc.scoring_server").setLevel(logging.ERROR)

    async def ping(request: Any) -> Any:
        ready = follower.current is not None
        return Response("\n", status_code=200 if ready else 503, media_type="application/json")

    async def version(request: Any) -> Any:
        return JSONResponse(follower.status())

    async def invocations(request: Any) -> Any:
        loaded = follower.current  # read once: a swap meanwhile does not touch this request
        if loaded is None:
            return _error(503, "MODEL_NOT_LOADED", "no model is loaded yet; retry shortly")
        content_type = request.headers.get("content-type")
        if not content_type:
            return _error(
                415,
                "BAD_REQUEST",
                "missing Content-Type; send application/json (or text/csv, "
                "application/vnd.apache.parquet)",
            )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error(400, "BAD_REQUEST", f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                return await _too_large(request, int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return await _too_large(request, len(body), limit)
        if not body.strip():
            return _error(
                400,
                "BAD_REQUEST",
                'empty request body; send JSON such as {"dataframe_split": {"columns": [...], '
                '"data": [[...]]}}',
            )
        try:
            answer = await asyncio.wait_for(
                asyncio.to_thread(
                    scoring_server.invocations,
                    bytes(body),
                    content_type,
                    loaded.model,
                    loaded.schema,
                ),
                settings.timeout,
            )
        except TimeoutError:
            return _error(504, "TIMEOUT", f"no answer within {settings.timeout:g} s")
        except MlflowException as exc:
            status = exc.get_http_status_code()
            code = exc.error_code if status < 500 else "BAD_REQUEST"
            return _error(status if status < 500 else 400, code, reason(exc))
        except Exception as exc:  # anything a payload can make MLflow's parsing raise
            return _error(400, "BAD_REQUEST", f"{type(exc).__name__}: {exc}")
        if answer.status >= 400:  # MLflow's plain-text refusals (415), as JSON like the rest
            return _error(answer.status, "UNSUPPORTED_MEDIA_TYPE", str(answer.response))
        return Response(
            answer.response,
            status_code=answer.status,
            media_type=answer.mimetype,
            headers={VERSION_HEADER: loaded.version},
        )

    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/health", ping, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
    ]

    def error_page(request: Any, exc: Any) -> Any:
        status = getattr(exc, "status_code", 400)
        return _error(status, "BAD_REQUEST", str(getattr(exc, "detail", "")) or "bad request")

    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        follower.start()
        try:
            yield
        finally:
            follower.stop()

    from contextlib import asynccontextmanager

    return Starlette(
        routes=routes,
        lifespan=asynccontextmanager(lifespan),
        exception_handlers={404: error_page, 405: error_page},
    )


def _error(status: int, code: str, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error_code": code, "message": message}, status_code=status)


async def _too_large(request: Any, size: int, limit: int) -> Any:
    """413, after reading what the client still sends (up to 4x the limit), so it reads the
    answer instead of a reset connection; beyond that the connection is closed."""
    from ..core.text import human_size

    budget = 4 * limit
    try:
        async for chunk in request.stream():
            budget -= len(chunk)
            if budget < 0:
                break
    except Exception:  # the stream was consumed already, or the client left
        pass
    response = _error(
        413,
        "REQUEST_TOO_LARGE",
        f"request body of {human_size(size)}+ is larger than the limit of {human_size(limit)} "
        f"(serve.max_body); send fewer rows per request",
    )
    if budget < 0:
        response.headers["Connection"] = "close"
    return response


# --- running it -----------------------------------------------------------------------------


def app_from_env() -> Any:
    """uvicorn's factory for worker processes: settings from `PIPEKIT_SERVE_SETTINGS`."""
    settings = Settings.from_json(os.environ[SETTINGS_ENV])
    follower = Follower(settings)
    follower.refresh()
    return create_app(follower)


class Server:
    """A scoring server: `run()` in the foreground (the CLI), or `start()` in a thread
    (a notebook or test: then `url`, `stop()`, or use it as a context manager)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.follower: Follower | None = None
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: Any = None

    @classmethod
    def for_pipeline(cls, spec: PipelineSpec, **overrides: Any) -> Server:
        """The server of a pipeline's `serve` section and tracking store; `overrides`
        (host, port, workers, alias, version, poll_interval, ...) win over the config."""
        from ..core.serving import check_serve
        from .registry import tracking_uri

        serve = check_serve(spec)
        if serve is None:
            raise ServeConfigError(
                f"pipeline '{spec.name}': has no 'serve' section; declare the inference DAG "
                f"under serve.stages (see docs/serving.md)"
            )
        return cls(settings_for(tracking_uri(spec), serve, **overrides))

    def _prepare(self) -> Any:
        import uvicorn

        s = self.settings
        common = {
            "host": s.host,
            "port": s.port,
            "log_level": "warning",
            "access_log": s.access_log,
            "timeout_graceful_shutdown": max(1, int(s.timeout)),
        }
        if s.workers > 1:
            os.environ[SETTINGS_ENV] = s.to_json()
            config = uvicorn.Config(
                "pipekit.serve.server:app_from_env", factory=True, workers=s.workers, **common
            )
        else:
            self.follower = Follower(s)
            self.follower.refresh()  # fail now, clearly, when there is nothing to serve
            config = uvicorn.Config(create_app(self.follower), **common)
        self._socket = config.bind_socket()  # bound now: port 0 becomes a free port
        # uvicorn's socket has protocol 0, so asyncio leaves TCP_NODELAY off on accepted
        # connections, and a response's second segment waits ~40 ms for the client's delayed
        # ACK (Nagle). Accepted sockets inherit the listener's option (Linux, BSD, macOS).
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = self._socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        return config

    def describe(self) -> str:
        follower = self.follower
        loaded = follower.current if follower else None
        what = self.settings.name
        if loaded is not None:
            stages = ", ".join(loaded.stages.values())
            what = f"{what} v{loaded.version} ({loaded.chosen}{'; ' + stages if stages else ''})"
        follows = (
            f"following {self.settings.following} every {self.settings.poll_interval:g} s"
            if not self.settings.version
            else "fixed version"
        )
        workers = f", {self.settings.workers} workers" if self.settings.workers > 1 else ""
        return f"serving {what} at {self.url} ({follows}{workers})"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown)."""
        import uvicorn

        config = self._prepare()
        sys.stderr.write(f"pipekit: {self.describe()}; Ctrl-C stops\n")
        sys.stderr.flush()
        server = uvicorn.Server(config)
        if self.settings.workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, target=server.run, sockets=[self._socket]).run()
        else:
            server.run(sockets=[self._socket])

    def start(self, wait: float = 60.0) -> Server:
        """Serve from a daemon thread of this process (one worker); returns when it answers."""
        import uvicorn

        if self.settings.workers > 1:
            raise ServingError("a server started in a thread has one worker; use run()")
        config = self._prepare()
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="pipekit-serve",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + wait
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServingError(f"the server did not start within {wait:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout + 10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Server:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<pipekit Server {self.describe()}>"


def settings_for(uri: str, serve: Any, **overrides: Any) -> Settings:
    """Server settings from a checked `ServeSpec` plus explicit overrides (CLI flags)."""
    values = {
        "uri": uri,
        "name": serve.model_name,
        "alias": serve.alias,
        "host": serve.host,
        "port": serve.port,
        "workers": serve.workers,
        "poll_interval": serve.poll_interval,
        "max_body": serve.max_body,
        "timeout": serve.timeout,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
