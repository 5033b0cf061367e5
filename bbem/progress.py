"""The one progress bar look for long work (training, inference, conversion, evaluation)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(
    *extra: ProgressColumn | str,
    counted: bool = True,
    enabled: bool = True,
    transient: bool = False,
) -> Progress:
    """A rich ``Progress``: the task's description, then (``counted``) a bar with done/total,
    then ``extra`` columns (a string is a ``TextColumn`` template such as
    ``"{task.fields[info]}"``), elapsed and (``counted``) remaining time. Work of unknown
    length (``counted=False``) shows a spinner instead of the bar. ``enabled=False`` gives a
    bar that draws nothing, so callers need no second code path."""
    cols: list[ProgressColumn] = [TextColumn("[bold]{task.description}")]
    cols += [BarColumn(), MofNCompleteColumn()] if counted else [SpinnerColumn()]
    cols += [TextColumn(c) if isinstance(c, str) else c for c in extra]
    cols.append(TimeElapsedColumn())
    if counted:
        cols.append(TimeRemainingColumn())
    return Progress(*cols, disable=not enabled, transient=transient)
