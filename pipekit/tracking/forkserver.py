"""A long-lived process with MLflow imported that forks one tracking writer per run.

Importing MLflow 3 and its SQL stores costs about 3 s of CPU, more than a small pipeline's
whole untracked run, and a writer process started per run pays it every time. The fork
server pays it once: the first tracked `pipekit run` starts it (detached, in a session
of its own); later runs connect to its Unix socket and get a fork of it (~25 ms), which
runs their MLflow calls exactly as a per-run writer process would (`writer.py`).

- One server per Python environment: the socket's name hashes the interpreter, where
  pipekit lives, the user and the environment variables read at import (`PYTHON*`,
  `MLFLOW_*`). Each run sends its fork its own working directory, `sys.path` and
  environment (`writer._context`).
- Never stale: before each fork the server checks that the code it imported is
  unchanged (the mtimes of pipekit's files and of the site-packages directories, which
  `pip install` changes); if not, it answers `stale`, retires, and the run starts a
  fresh server.
- Warm: while no run's writer runs, the server does once what makes forks faster (a
  successor warms up and then takes over, `_Server`) and opens ahead the stores forks
  `remember`ed.
- Nothing to lose: the server holds no MLflow run and no open store. A fork lives in a
  session of its own, so killing the server never cuts a run's tracking short.
- Private: the socket lives in a directory only its user can enter (`runtime_dir`);
  a directory that is not ours and private is not used (the run then starts a
  per-run writer process, as with `PIPEKIT_TRACKING_WRITER=process`).
- Temporary: idle for `PIPEKIT_FORKSERVER_IDLE` seconds (default 900) it exits.
  Its log (what it and its forks printed to stderr) is `writer-<key>.log` beside the socket.

Protocol, one line each way before the writer's own frames: the client sends
`session`, `retire` or `exit <pid>`; the fork answers `ready <pid>`, or the server
`stale`, `retired`, or for `exit` how that fork ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

#: pipekit's own directory (its files' mtimes tell a stale server).
PACKAGE = Path(__file__).resolve().parent.parent

#: Where the sockets live (else `$XDG_RUNTIME_DIR/pipekit`, else `<tmp>/pipekit-<uid>`).
DIR_ENV = "PIPEKIT_RUNTIME_DIR"
#: Seconds without a new run after which the server exits.
IDLE_ENV = "PIPEKIT_FORKSERVER_IDLE"
IDLE_DEFAULT = 900.0
#: How long a client waits for a server it started to listen, and for a warm one to fork.
START_WAIT = 10.0
ANSWER_WAIT = 10.0
#: How many ended forks the server remembers (for `exit <pid>`).
REMEMBERED = 64
#: Unix sockets' longest path on Linux (bytes, with the final NUL).
MAX_ADDRESS = 108
#: The size at which a new server empties the log.
LOG_LIMIT = 1 << 20
#: `Session.poll()` of a fork whose end nobody knows (not an exit code or a signal).
UNKNOWN = -1000
#: How many of the stores forks opened a server keeps open ahead (the newest).
STORES_AHEAD = 8
#: How a fork's crash starts in the server's log (then its pid and the error).
CRASH = "pipekit tracking writer"


def available() -> bool:
    """Fork servers need `fork` and Unix sockets that behave: Linux."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def runtime_dir() -> Path | None:
    """The private directory of the sockets, created if missing; None when it exists but
    another user owns it or others may enter it (nothing is then started or trusted)."""
    configured = os.environ.get(DIR_ENV)
    if configured:
        path = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "pipekit"
    else:
        path = Path(tempfile.gettempdir()) / f"pipekit-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        log.debug("pipekit tracking: no fork server directory %s (%s)", path, exc)
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not path.is_dir():
        log.debug("pipekit tracking: %s is not private to this user; no fork server", path)
        return None
    return path


def server_key() -> str:
    """What a server must share with its clients: interpreter, pipekit, user, and the
    environment variables read while importing (a different value: another server)."""
    shared = sorted((k, v) for k, v in os.environ.items() if k.startswith(("PYTHON", "MLFLOW_")))
    ident = repr((sys.executable, sys.prefix, str(PACKAGE), os.getuid(), shared))
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def address(directory: Path) -> Path:
    return directory / f"writer-{server_key()}.sock"


def log_path(sock: Path) -> Path:
    return sock.with_suffix(".log")


# --- the client's side ----------------------------------------------------------------------


class Session:
    """A connection to a fork of the server: the writer's streams, and what a
    `subprocess.Popen` tells of the process behind them (it is not our child)."""

    stderr: IO[bytes] | None = None

    def __init__(self, conn: socket.socket, sock: Path, pid: int | None):
        self.conn = conn
        self.sock = sock
        self.pid = pid
        self.unready = False  # no `ready` came: no fork to ask about
        self.stdin = conn.makefile("wb")
        self.stdout = conn.makefile("rb")

    def wait_ready(self) -> bool:
        """Read the fork's `ready <pid>` line (a server started for this run answers only
        once MLflow is imported); False when none came: the server died first."""
        if self.pid is not None:
            return True
        try:
            line = self.stdout.readline()
        except (OSError, ValueError):
            line = b""
        self.pid = _ready_pid(line)
        self.unready = self.pid is None
        return not self.unready

    def poll(self) -> int | None:
        """None while the fork lives, else how it ended: -signal, the exit code, or
        UNKNOWN (the server that forked it is gone, or it never forked)."""
        if self.pid is None:
            return UNKNOWN if self.unready else None
        try:
            os.kill(self.pid, 0)
            if not _zombie(self.pid):
                return None
        except ProcessLookupError:
            pass
        except PermissionError:  # the pid was reused by another user's process
            return UNKNOWN
        code = _ask(self.sock, f"exit {self.pid}")
        return int(code) if code and code.lstrip("-").isdigit() else UNKNOWN

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pipekit tracking writer {self.pid}", timeout)
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self.unready = self.pid is None
        self.close()

    def close(self) -> None:
        for stream in (self.stdin, self.stdout, self.conn):
            with contextlib.suppress(OSError):
                stream.close()

    def last_words(self) -> str:
        """What the fork said last when it crashed (printed to the server's log), or ""."""
        mark = f"{CRASH} {self.pid}: "
        with contextlib.suppress(OSError):
            lines = log_path(self.sock).read_text(errors="replace").splitlines()
            return next(
                (line[len(mark) :] for line in reversed(lines) if line.startswith(mark)), ""
            )
        return ""


def connect(program: Sequence[str]) -> Session | None:
    """A fork of this environment's server, starting the server (`program`) if none
    listens or it is stale. None when no server can be used (the caller then starts a
    writer process of its own)."""
    if not available():
        return None
    directory = runtime_dir()
    if directory is None:
        return None
    sock = address(directory)
    try:
        session = _warm(sock)
    except OSError as exc:
        log.debug("pipekit tracking: fork server %s: %s", sock, exc)
        session = None
    if session is not None:
        return session
    if _start(program, sock):  # it listens now; it imports MLflow next
        try:
            conn = _dial(sock)
            conn.sendall(b"session\n")
            return Session(conn, sock, None)  # `ready` comes once MLflow is imported
        except OSError as exc:
            log.debug("pipekit tracking: fork server %s: %s", sock, exc)
    log.debug("pipekit tracking: no fork server at %s; see %s", sock, log_path(sock))
    return None


def _warm(sock: Path) -> Session | None:
    """A fork of the server already listening at `sock`, or None (none, or it was stale
    and retires)."""
    try:
        conn = _dial(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    conn.settimeout(ANSWER_WAIT)
    try:
        conn.sendall(b"session\n")
        line = _readline(conn)
    except OSError:
        conn.close()
        raise
    pid = _ready_pid(line)
    if pid is None:
        conn.close()
        if line.strip() != b"stale":
            raise OSError(f"unexpected answer {line[:80]!r}")
        log.debug("pipekit tracking: fork server %s is stale; starting a new one", sock)
        _wait_gone(sock)
        return None
    conn.settimeout(None)
    return Session(conn, sock, pid)


def _dial(sock: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _addressable(sock) as where:
            conn.connect(where)
    except OSError:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _addressable(sock: Path) -> Iterator[str]:
    """`sock` as a Unix socket address: a path longer than Linux allows (108 bytes) is
    reached through the directory's file descriptor (`/proc/self/fd/<n>/<name>`)."""
    if len(os.fsencode(sock)) < MAX_ADDRESS:
        yield str(sock)
        return
    fd = os.open(sock.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{sock.name}"
    finally:
        os.close(fd)


def _readline(conn: socket.socket) -> bytes:
    """One line, read a byte at a time so nothing after it is consumed."""
    out = bytearray()
    while not out.endswith(b"\n") and len(out) < 200:
        byte = conn.recv(1)
        if not byte:
            break
        out += byte
    return bytes(out)


def _ready_pid(line: bytes) -> int | None:
    word, _, pid = line.strip().partition(b" ")
    return int(pid) if word == b"ready" and pid.isdigit() else None


def _wait_gone(sock: Path, seconds: float = 5.0) -> None:
    """Until a retiring server has removed its socket (bounded)."""
    deadline = time.monotonic() + seconds
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _start(program: Sequence[str], sock: Path) -> bool:
    """Start a server; whether one listens at `sock` now. The process started exits
    once its fork, the server (detached: not our child, its own session, no terminal,
    stderr to the log), listens or gave up (another server listens)."""
    try:
        with open(log_path(sock), "ab") as errors:
            launcher = subprocess.Popen(
                [*program, str(sock)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
                close_fds=True,
                cwd="/",
            )
        launcher.wait(START_WAIT + 5)  # bounded: the server's wait for the lock
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("pipekit tracking: cannot start a fork server: %s", exc)
        return False
    return launcher.returncode == 0 or sock.exists()


_notes: Path | None = None  # in a fork: where `remember` writes


def remember(store: str) -> None:
    """In a fork: note the store (its URI) it opened, for the server to open ahead of
    later forks (`serve(open_ahead=...)`). Elsewhere nothing."""
    if _notes is not None:
        with contextlib.suppress(OSError), open(_notes, "a") as notes:
            notes.write(f"{store}\n")


def _listening(sock: Path) -> bool:
    try:
        _dial(sock).close()
    except OSError:
        return False
    return True


def _ask(sock: Path, question: str) -> str | None:
    """The server's one-line answer, or None when it does not answer."""
    try:
        with _dial(sock) as conn:
            conn.settimeout(2.0)
            conn.sendall(question.encode() + b"\n")
            return _readline(conn).decode(errors="replace").strip() or None
    except OSError:
        return None


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] == "Z"
    return False


def retire(sock: Path) -> bool:
    """Ask the server at `sock` to exit (its running forks go on); whether one answered."""
    return _ask(sock, "retire") == "retired"


# --- the server's side ------------------------------------------------------------------------


def watched() -> list[Path]:
    """Where a change means the server's imports are stale: pipekit's files and folders,
    and the site-packages directories (installing or removing a package changes them)."""
    paths = [PACKAGE, *(p for p in PACKAGE.rglob("*") if "__pycache__" not in p.parts)]
    for name in ("purelib", "platlib"):
        paths.append(Path(sysconfig.get_paths()[name]))
    return [p for p in dict.fromkeys(paths) if p.suffix in ("", ".py")]


def fingerprint(paths: Sequence[Path]) -> tuple[tuple[str, int], ...]:
    out = []
    for path in paths:
        try:
            out.append((str(path), path.stat().st_mtime_ns))
        except OSError:
            out.append((str(path), -1))
    return tuple(out)


def serve(
    sock: Path,
    prepare: Callable[[], None],
    handle: Callable[[socket.socket], None],
    warm: Callable[[], None] | None = None,
    watch: Sequence[Path] | None = None,
    open_ahead: Callable[[str], None] | None = None,
) -> None:
    """Run a fork server at `sock`: `prepare()` once (the imports), then `handle(conn)`
    in a fork per `session`. When no run is waiting: `open_ahead(store)` once for each
    store a fork `remember`ed, then `warm()` once (a fork inherits what they set up).
    Returns when it retires (idle, stale or asked to)."""
    import fcntl

    listening, launched = os.pipe()
    if os.fork():  # the launcher: exits when the server listens (0) or gave up (1)
        os.close(launched)
        os._exit(0 if os.read(listening, 1) else 1)
    os.close(listening)
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    os.chdir("/")
    sys.path[:] = [p for p in sys.path if p]  # `python -c` put the working directory first
    lock = os.open(sock.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + START_WAIT
    while True:  # one server per socket; a retiring one is waited for
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline or _listening(sock):
                return  # another server serves this socket
            time.sleep(0.02)
    with contextlib.suppress(OSError):  # the log keeps what the last servers said
        if log_path(sock).stat().st_size > LOG_LIMIT:
            os.truncate(log_path(sock), 0)
    paths = list(watch) if watch is not None else watched()
    started = fingerprint(paths)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # left by a server that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _addressable(sock) as where:
        listener.bind(where)
    listener.listen(64)
    os.write(launched, b"1")
    os.close(launched)
    inode = sock.stat().st_ino
    try:
        idle = float(os.environ.get(IDLE_ENV, IDLE_DEFAULT))
    except ValueError:
        idle = IDLE_DEFAULT
    print(f"pipekit fork server {os.getpid()} at {sock}, idle timeout {idle:g} s", file=sys.stderr)
    prepare()
    server = _Server(listener, lock, handle, paths, started, warm)
    server.notes, server.open_ahead = sock.with_suffix(".stores"), open_ahead
    handed_over = False
    try:
        handed_over = server.loop(idle, stop)
    finally:
        server.drop_successor()
        listener.close()
    if not handed_over:  # else the successor serves on this socket, and holds the lock
        with contextlib.suppress(OSError):
            if sock.stat().st_ino == inode:
                sock.unlink()
    os.close(lock)


class _Server:
    """The accept loop. Warming up (`warm`) takes seconds, during which runs must not
    wait: a successor forked from the server warms up while the server goes on forking
    (cold) writers; once warm it takes over the socket and the server exits."""

    def __init__(
        self,
        listener: socket.socket,
        lock: int,
        handle: Callable[[socket.socket], None],
        paths: Sequence[Path],
        started: tuple[tuple[str, int], ...],
        warm: Callable[[], None] | None,
    ):
        self.listener, self.lock, self.handle = listener, lock, handle
        self.paths, self.started, self.warm = paths, started, warm
        self.ended: dict[int, int] = {}  # pid -> -signal or exit code, the last REMEMBERED
        self.successor: tuple[int, int] | None = None  # (pid, the pipe it says `warm` on)
        self.notes: Path | None = None  # where forks `remember` the stores they opened
        self.open_ahead: Callable[[str], None] | None = None
        self.opened: set[str] = set()
        self.forks: set[int] = set()  # the runs' writers still running

    def loop(self, idle: float, stop: list[int]) -> bool:
        """Serve until idle, stale, asked to retire or stopped (False), or until a warm
        successor took over (True)."""
        self.listener.settimeout(1.0)
        last = time.monotonic()
        while not stop and time.monotonic() - last < idle:
            self._reap()
            if self._successor_ready():
                return True
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, InterruptedError):
                if not self.forks:  # never competing with a run for the CPU
                    self._open_noted()
                    self._warm_up()
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    request = _readline(conn).decode(errors="replace").split()
                except OSError:
                    continue
                if request == ["session"]:
                    last = time.monotonic()
                    if fingerprint(self.paths) != self.started:
                        print("pipekit fork server: code changed; retiring", file=sys.stderr)
                        with contextlib.suppress(OSError):
                            conn.sendall(b"stale\n")
                        return False
                    self._fork(conn)
                elif request == ["retire"]:
                    with contextlib.suppress(OSError):
                        conn.sendall(b"retired\n")
                    return False
                elif len(request) == 2 and request[0] == "exit" and request[1].isdigit():
                    self._reap()
                    code = self.ended.get(int(request[1]))
                    with contextlib.suppress(OSError):
                        conn.sendall(f"{'' if code is None else code}\n".encode())

        return False

    def _open_noted(self) -> None:
        """`open_ahead` the stores forks noted (the newest few), each once."""
        if self.notes is None or self.open_ahead is None:
            return
        try:
            noted = self.notes.read_text().split()
        except OSError:
            return
        if len(noted) > 4 * STORES_AHEAD:
            with contextlib.suppress(OSError):
                self.notes.write_text("".join(f"{n}\n" for n in noted[-STORES_AHEAD:]))
        for store in list(dict.fromkeys(reversed(noted)))[:STORES_AHEAD]:
            if store not in self.opened:
                self.opened.add(store)
                try:
                    self.open_ahead(store)
                except Exception as exc:
                    print(f"pipekit fork server: opening {store} ahead: {exc}", file=sys.stderr)
                else:
                    print(f"pipekit fork server: opened {store} ahead", file=sys.stderr)

    def _warm_up(self) -> None:
        """Fork the successor, which warms up and then serves (it returns into `loop`)."""
        warm, self.warm = self.warm, None
        if warm is None:
            return
        ready, done = os.pipe()
        pid = os.fork()
        if pid:
            os.close(done)
            self.successor = (pid, ready)
            return
        os.close(ready)
        start, parent = time.monotonic(), os.getppid()
        self.ended.clear()  # the server's forks are not this process's children
        self.forks.clear()
        warm()
        os.write(done, b"warm")
        os.close(done)
        took = time.monotonic() - start
        print(
            f"pipekit fork server {os.getpid()}: warmed up in {took:.2f} s; takes over from "
            f"{parent}",
            file=sys.stderr,
        )

    def _successor_ready(self) -> bool:
        """Whether the successor said it is warm; one that died first is forgotten."""
        if self.successor is None:
            return False
        pid, ready = self.successor
        readable, _, _ = select.select([ready], [], [], 0)
        if not readable:
            return False
        said = os.read(ready, 16)
        os.close(ready)
        self.successor = None
        if said:
            return True
        print(f"pipekit fork server: successor {pid} ended before warming up", file=sys.stderr)
        return False

    def drop_successor(self) -> None:
        """The server retires (not handing over): a successor still warming ends too."""
        if self.successor is not None:
            pid, ready = self.successor
            self.successor = None
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(ready)

    def _fork(self, conn: socket.socket) -> None:
        if threading.active_count() > 1:  # a fork would inherit their locks, not them
            names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
            print(f"pipekit fork server: threads running at a fork: {names}", file=sys.stderr)
        pid = os.fork()
        if pid:
            self.forks.add(pid)
            return
        global _notes
        code = 0
        _notes = self.notes
        try:  # the fork: one run's writer, independent of the server from here on
            os.setsid()
            self.listener.close()
            os.close(self.lock)
            for signum in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            conn.settimeout(None)
            conn.sendall(f"ready {os.getpid()}\n".encode())
            self.handle(conn)
        except BaseException as exc:
            import traceback

            traceback.print_exc()
            print(f"{CRASH} {os.getpid()}: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            signaled = os.WIFSIGNALED(status)
            self.ended[pid] = -os.WTERMSIG(status) if signaled else os.WEXITSTATUS(status)
            self.forks.discard(pid)
            while len(self.ended) > REMEMBERED:
                self.ended.pop(next(iter(self.ended)))
