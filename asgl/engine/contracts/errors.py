"""The exceptions every layer may raise or catch; the server maps each to an HTTP status."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that cannot be served as given (HTTP 400). The message names the problem."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineNotRunning(RuntimeError):
    """The engine was not started, or is shutting down (HTTP 503)."""


class ModelLoadError(ValueError):
    """The model cannot be found or read; the message names the path and what is wrong."""
