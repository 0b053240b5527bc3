"""The errors acctattr raises on purpose; cli.py turns each into exit code 2 (or 1)."""

from __future__ import annotations


class AcctattrError(Exception):
    """A problem the user can fix: bad usage, manifest, checkpoint or data.

    ``message`` names the file, stage and key; ``hint`` says how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def within(self, prefix: str, kind: type[AcctattrError] | None = None) -> AcctattrError:
        """This error said where it was met: ``prefix`` (a stage and key) before its
        message, which names the file; as ``kind`` where given."""
        return (kind or type(self))(f"{prefix} {self.message}", self.hint)


class ManifestError(AcctattrError):
    """One or more problems in a manifest, reported together."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{path}: {n} problem{'s' if n != 1 else ''}\n{lines}")


class CheckpointError(AcctattrError):
    """A checkpoint or optimizer state file that cannot be read or does not match the model."""


class DataError(AcctattrError):
    """Eval or training data that is missing, mistyped or empty."""
