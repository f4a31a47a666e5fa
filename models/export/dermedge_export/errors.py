"""The package's one user-facing error type."""


class ExportError(Exception):
    """A clear, user-facing reason the export cannot proceed."""
