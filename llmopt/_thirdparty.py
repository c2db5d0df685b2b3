"""Keeping third-party libraries' own console output out of llmopt's.

GPTQModel prints a banner and INFO lines, and draws live progress bars; where output is not a terminal
(a CI log) those bars become one line per update: ~15,600 lines for the CPU main job's two GPTQ
variants. llmopt reports progress itself, so before GPTQModel is first imported its logger is set to
warnings and above, and its live bars are replaced by the few per-layer lines it writes in
non-interactive test runs. ``LLMOPT_THIRD_PARTY_LOGS=1`` (or ``LLMOPT_DEBUG=1``) keeps everything.
"""

from __future__ import annotations

import os

_done = False


def quiet_gptqmodel() -> bool:
    """Quiet GPTQModel's console output (see the module docstring); returns whether it did.

    Call it before the first ``import gptqmodel``: the banner is printed at import. Later calls do nothing.
    """
    global _done
    if _done:
        return True
    if os.environ.get("LLMOPT_THIRD_PARTY_LOGS") or os.environ.get("LLMOPT_DEBUG"):
        return False
    try:
        from logbar import LogBar

        LogBar.shared().setLevel("WARN")
        from gptqmodel.utils import logger
    except Exception:  # not installed, or another version's layout: leave it as it is
        return False
    if callable(getattr(logger, "_suppress_live_renderables", None)):
        # GPTQModel's own switch for non-interactive runs: progress bars become occasional log lines.
        logger._suppress_live_renderables = lambda: True
    _done = True
    return True
