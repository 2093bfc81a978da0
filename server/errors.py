"""Why a request could not be answered, in the model pipeline's own terms (no gRPC here).

Each transport maps them to its status codes in one table (server/transport/guards.py for gRPC, server/transport/rest.py
for HTTP); the message is written for the client and sent as the status details.
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


class Unavailable(ServiceError):
    """A part of the server the request needs did not answer in time (another worker); retrying may succeed."""


class ShuttingDown(ServiceError):
    """The server is draining and takes no new work."""


class DeadlineExpired(ServiceError):
    """The caller's deadline passed before the answer was ready."""


class Cancelled(ServiceError):
    """The caller went away."""


class AuthRefused(ServiceError):
    """The caller did not prove it may call (server/security.py); `reason` labels the refusal in metrics."""

    reason = "invalid"


class Unauthenticated(AuthRefused):
    """No credentials, or not in a form the server reads (`authorization: Bearer <token>` is expected)."""

    def __init__(self, message: str, reason: str = "missing") -> None:
        super().__init__(message)
        self.reason = reason  # "missing" (no header) or "malformed" (not "Bearer <token>")


class PermissionDenied(AuthRefused):
    """Credentials were given but are not among those the server accepts."""

    reason = "invalid"


class NotFound(ServiceError):
    """The request names a model or version this server does not serve; the message names those it does."""


class AlreadyExists(ServiceError):
    """What the request would create is already there (a second label for one answer)."""


class Unsupported(ServiceError):
    """A protocol feature this server does not offer (shared-memory tensors, model control, ...)."""
