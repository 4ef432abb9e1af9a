"""`sera-ray data validate PATH`: read preference data as training would, and say what is wrong."""

from __future__ import annotations

import logging
import os

from sera_ray.data.formats import read_pairs
from sera_ray.data.problems import ValidationReport

logger = logging.getLogger(__name__)


def validate_path(path: str | os.PathLike, *, split: str | None = None) -> ValidationReport:
    """Check every row under `path` the way `load_pairs` reads it; `report.ok` is the verdict."""
    report = read_pairs(path, split=split).report
    logger.info(
        "validated %s: %d rows read, %d valid, %d problem(s)",
        path,
        report.rows_read,
        report.rows_valid,
        len(report.problems),
    )
    return report


def format_report(report: ValidationReport, *, max_problems: int | None = 100) -> str:
    """The report as text for a terminal: format, counts, then one line per problem."""
    lines = [
        f"path: {report.path}",
        f"format: {report.format}",
        f"rows read: {report.rows_read}",
        f"rows valid: {report.rows_valid}",
        f"problems: {len(report.problems)}",
    ]
    shown = report.problems if max_problems is None else report.problems[:max_problems]
    lines.extend(f"  {problem}" for problem in shown)
    if len(shown) < len(report.problems):
        lines.append(f"  ... and {len(report.problems) - len(shown)} more")
    lines.append("ok" if report.ok else "not ok")
    return "\n".join(lines)
