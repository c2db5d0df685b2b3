"""Interrupt requests (Ctrl-C, SIGTERM) that survive being swallowed.

A KeyboardInterrupt raised inside a finalizer (``__del__``) or a C callback is dropped by Python with an
"Exception ignored" message, and the run would go on to publish a complete-looking artifact. The CLI's
signal handler therefore also records the request here, and long operations check it before anything
becomes visible (``api.quantize`` before the artifact folder is moved into place).
"""

from __future__ import annotations

from llmopt.errors import InterruptedRunError

_requested = False


def request() -> None:
    global _requested
    _requested = True


def requested() -> bool:
    return _requested


def reset() -> None:
    global _requested
    _requested = False


def check() -> None:
    """Raise if an interrupt was requested since the last reset."""
    if _requested:
        raise InterruptedRunError(
            "interrupted: nothing was written (partial output removed).", "Run the command again to redo the work."
        )
