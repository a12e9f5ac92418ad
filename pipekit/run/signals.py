"""SIGTERM during a run started from Python: stop the run cleanly, then end as asked.

Ctrl-C already raises KeyboardInterrupt in the main thread. SIGTERM's default action ends
the process at once: worker processes would be orphaned and MLflow runs left RUNNING. While
a run computes (main thread only, and only if SIGTERM still has its default action; the
CLI installs its own handler), SIGTERM raises `Interrupted` instead; once the run has been
cleaned up, `end_as_asked` restores the default and re-sends the signal, so the process
still ends the way its sender meant (exit status -15).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import Interrupted


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def sigterm_interrupts() -> Iterator[bool]:
    """Within the block, SIGTERM raises `Interrupted`; yields whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield False
            return
        signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main interpreter
        yield False
        return
    try:
        yield True
    finally:
        if signal.getsignal(signal.SIGTERM) is _raise_interrupted:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def end_as_asked(error: BaseException) -> None:
    """After cleanup: a SIGTERM turned into `Interrupted` by us ends the process by SIGTERM."""
    if isinstance(error, Interrupted) and error.signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
