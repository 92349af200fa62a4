"""Interrupts: Ctrl-C, SIGTERM (a batch scheduler's or `kill`'s) and SIGHUP (a closed terminal) all end a command
the same way: an exception that unwinds through the launch (which stops its ranks), then exit code 130 with one
line and no traceback, every finished record kept."""
from __future__ import annotations

import signal
from contextlib import contextmanager

INTERRUPTED_EXIT_CODE = 130
"""The shell's code for a command stopped by an interrupt (128 + SIGINT)."""
SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals turned into `Interrupted`; SIGINT already raises KeyboardInterrupt."""


class Interrupted(KeyboardInterrupt):
    """A signal asked the command to stop. A KeyboardInterrupt, so no `except Exception` swallows it and every
    handler of Ctrl-C handles it too."""


@contextmanager
def signals_interrupt(signals=SIGNALS):
    """Within the block, the `signals` raise Interrupted (in the main thread) instead of killing the process."""
    def handler(signum, frame):
        raise Interrupted(f"signal {signum}")
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def signals_ignored(signals=(signal.SIGINT, *SIGNALS)):
    """Within the block, the `signals` are ignored: for the short clean-up after an interrupt, which a second
    Ctrl-C must not cut in half."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
