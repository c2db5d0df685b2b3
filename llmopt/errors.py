"""Errors llmopt knows how to explain.

Every error carries a message (what is wrong) and a hint (the next step), and an exit code from the
table below. The CLI turns these, and only these, into one line on stderr; any other exception keeps
its traceback because it is a bug.

Exit codes (documented in README.md):

====  =====================================================================
0     success (and, for ``eval``/``run``, every gate passed)
1     unexpected error (a bug: the traceback is printed)
2     bad input: arguments, options, paths, recipe, data
3     a gate failed (the artifact was built and measured, but did not pass)
4     a backend or runtime is not usable here (missing library, no GPU, ...)
5     an artifact is incomplete or its files no longer match its manifest
130   interrupted (Ctrl-C / SIGTERM); nothing half-written was left behind
====  =====================================================================
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_BUG = 1
EXIT_INPUT = 2
EXIT_GATE = 3
EXIT_UNAVAILABLE = 4
EXIT_ARTIFACT = 5
EXIT_INTERRUPTED = 130


class LlmoptError(Exception):
    """Base of every error whose message is meant for the user."""

    exit_code: int = EXIT_INPUT
    # what was measured before the error and is worth showing, never recorded as a whole result (an evaluation
    # whose speed measurement failed or was interrupted: ``api.evaluate``; ``llmopt run`` shows it in its report)
    partial: Any = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  -> {self.hint}"


class InputError(LlmoptError):
    """A path, option or value given by the user cannot be used."""


class ModelError(InputError):
    """The model source is missing, corrupt, or of an architecture the step cannot handle."""


class OptionsError(InputError):
    """Backend options that fail validation before any heavy work starts."""


class DataError(InputError):
    """Calibration or evaluation text that cannot be used."""


class RecipeError(InputError):
    """A recipe file that does not validate."""


class OutputExistsError(InputError):
    """The output folder exists and is not empty."""


class OutputPathError(InputError):
    """An output path that would overwrite or sit among the user's files: an input, an artifact, the current
    folder, a folder that is not writable, or one that another llmopt process is writing."""


class TokenizerMismatchError(InputError):
    """Baseline and artifact tokenize text differently, so their perplexities cannot be compared."""


class BackendUnavailableError(LlmoptError):
    """A backend's library or hardware is missing here."""

    exit_code = EXIT_UNAVAILABLE


class NoSpaceError(LlmoptError):
    """The disk filled up while writing; the partial output was removed."""

    exit_code = EXIT_UNAVAILABLE


class DeviceMemoryError(LlmoptError):
    """The accelerator ran out of memory for a setting the user can lower (the hint names it)."""

    exit_code = EXIT_UNAVAILABLE


class ArtifactError(LlmoptError):
    """An artifact folder is unfinished, or its files do not match the manifest."""

    exit_code = EXIT_ARTIFACT


class NewerArtifactError(ArtifactError):
    """An artifact written by a newer llmopt (manifest or evaluation schema): never re-made or overwritten here."""


class GateFailedError(LlmoptError):
    """Raised by callers that want a failed gate to stop the flow (publish)."""

    exit_code = EXIT_GATE


class InterruptedRunError(LlmoptError):
    """Ctrl-C or SIGTERM during a run; the partial output was removed.

    ``partial``: what was measured before the interrupt and is worth showing, never recorded as a whole result
    (an evaluation whose speed measurement was interrupted: ``api.evaluate``)."""

    exit_code = EXIT_INTERRUPTED
    partial: Any = None
