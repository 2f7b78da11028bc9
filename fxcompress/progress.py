"""A progress bar on stderr (tqdm) that costs nothing when disabled."""

from __future__ import annotations

import contextlib
from typing import Iterator


class _Bar:
    def __init__(self, bar):
        self._bar = bar

    def note(self, label: str) -> None:
        """Show what is being worked on without advancing."""
        if self._bar is not None:
            self._bar.set_postfix_str(label[-40:])

    def step_within(self, label: str, limit: int) -> None:
        """Advance one step, naming ``label``, but not past ``limit`` (the end of the current stage)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label[-40:], refresh=False)
            if self._bar.n < limit:
                self._bar.update(1)

    def advance_to(self, position: int, label: str = "") -> None:
        """Move to ``position`` (the end of a stage whose steps were fewer than counted)."""
        if self._bar is not None:
            if label:
                self._bar.set_postfix_str(label[-40:], refresh=False)
            self._bar.update(max(position - self._bar.n, 0))

    def advance(self, label: str = "") -> None:
        if self._bar is not None:
            if label:
                self._bar.set_postfix_str(label[-40:], refresh=False)
            self._bar.update(1)


@contextlib.contextmanager
def progress_bar(enabled: bool, desc: str, total: int | None = None, unit: str = "pass") -> Iterator[_Bar]:
    """Yield an object with ``.note(label)`` and ``.advance(label)``; a tqdm bar when ``enabled``.

    Example:
        >>> with progress_bar(True, "int8", total=2, unit="layer") as bar:
        ...     bar.advance("fc1")
        ...     bar.advance("fc2")
    """
    if not enabled:
        yield _Bar(None)
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
        yield _Bar(bar)
