"""What goes wrong with preference data, said so a user can find it: file, row, field, reason."""

from __future__ import annotations

from dataclasses import dataclass, field

# A DataError message lists at most this many problems; the exception carries all of them.
MAX_LISTED_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    """One reason a row (or a whole file, when `row` is None) cannot be used."""

    file: str
    row: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}:{self.row}"
        return f"{where}: {self.field}: {self.reason}"


class DataError(ValueError):
    """Preference data that cannot be loaded as it is; `problems` lists every reason found."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        listed = [str(problem) for problem in self.problems[:MAX_LISTED_PROBLEMS]]
        hidden = len(self.problems) - len(listed)
        if hidden > 0:
            listed.append(f"... and {hidden} more")
        super().__init__(
            f"{len(self.problems)} problem(s) in the preference data:\n" + "\n".join(listed)
        )


@dataclass
class ValidationReport:
    """What reading a path found: the format of each file, how many rows, and what is wrong."""

    path: str
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format
    rows_read: int = 0
    rows_valid: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is data and every row of it is valid."""
        return self.rows_read > 0 and self.rows_valid == self.rows_read and not self.problems

    @property
    def rows_rejected(self) -> int:
        return self.rows_read - self.rows_valid

    @property
    def format(self) -> str:
        """The detected format, or each distinct one when the files differ."""
        return "; ".join(dict.fromkeys(self.formats.values())) or "unknown"
