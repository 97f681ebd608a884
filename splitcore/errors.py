"""Errors of the contract: each one says what was expected, what was found and what to do."""


class SplitError(Exception):
    """Base of every error this project raises on purpose."""


class ManifestError(SplitError):
    """A bundle or its manifest is missing, malformed, or does not match its files."""


class WireError(SplitError):
    """A tensor message could not be decoded, or does not have the dtype or shape the manifest demands."""


class ShapeError(SplitError):
    """Inputs to a graph disagree with the manifest or with the cached sequence."""
