"""Why a request could not be answered, in the model pipeline's own terms (no gRPC here).

The transport maps each to its status code in one table (server/service.py); the message is
written for the client and sent as the status details.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service cannot answer; `str(error)` says why, for the client."""


class InvalidInput(ServiceError):
    """The request itself is wrong (bad image, empty batch, ...); `index` names the bad image of a batch."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class Overloaded(ServiceError):
    """The server cannot take the images now; retry later (`retry_after` seconds: a hint, when known)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(ServiceError):
    """The model is still loading or warming up."""


class ShuttingDown(ServiceError):
    """The server is draining and takes no new work."""


class DeadlineExpired(ServiceError):
    """The caller's deadline passed before the answer was ready."""


class Cancelled(ServiceError):
    """The caller went away."""
