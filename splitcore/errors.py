"""Errors of the contract: each one says what was expected, what was found and what to do."""


class SplitError(Exception):
    """Base of every error this project raises on purpose."""


class ManifestError(SplitError):
    """A bundle or its manifest is missing, malformed, or does not match its files."""


class WireError(SplitError):
    """A tensor message could not be decoded, or does not have the dtype or shape the manifest demands."""


class ShapeError(SplitError):
    """Inputs to a graph disagree with the manifest or with the cached sequence."""


class SessionNotFound(SplitError):
    """The session id is unknown: never opened, deleted, expired, or evicted to make room."""


class PositionMismatch(SplitError):
    """A step does not continue the positions the tail has cached."""


class ManifestMismatch(SplitError):
    """The client's head was exported for another manifest than the server's tail."""


class RetryLater(SplitError):
    """The service cannot do this now but may soon: a 503 whose Retry-After says when to try again."""

    default_retry_after_s = 1

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = self.default_retry_after_s if retry_after_s is None else retry_after_s


class CapacityExceeded(RetryLater):
    """The server has no room for another session right now; existing sessions are unaffected."""

    default_retry_after_s = 5


class LengthExceeded(SplitError):
    """A step would take a session past its reserved maximum length."""


class PayloadTooLarge(SplitError):
    """A request body is larger than the configured limit."""


class Unauthorized(SplitError):
    """A bearer token is required and was missing or wrong."""


class InvalidRequest(SplitError):
    """A request is well-formed but asks for something this service cannot do (a value out of range)."""


class ServiceUnavailable(RetryLater):
    """The service cannot serve right now (its engine stopped or failed); a client should retry elsewhere or later."""


class RequestTimeout(SplitError):
    """A client took too long to send its request."""
