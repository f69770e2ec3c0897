"""A tqdm-shaped progress bar drawn with rich, for huggingface_hub's `tqdm_class` hook.

huggingface_hub builds the bar with tqdm's keyword arguments, then calls update / close (or uses it as a
context manager); anything else it may call is accepted and ignored.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)


class RichTqdm:
    def __init__(self, iterable=None, desc: str | None = None, total: float | None = None, initial: float = 0,
                 disable: bool = False, unit: str = "B", **_):
        self.iterable, self.total, self.n, self.disable = iterable, total, initial, bool(disable)
        self._progress = None
        if self.disable:
            return
        byte_columns = [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else []
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), *byte_columns,
                                  TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self._task = self._progress.add_task(desc or "download", total=total, completed=initial)
        self._progress.start()

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: float = 1):
        self.n += n or 0
        if self._progress is not None:
            self._progress.update(self._task, completed=self.n, total=self.total)

    def reset(self, total: float | None = None):
        self.n, self.total = 0, total if total is not None else self.total
        self.update(0)

    def set_description(self, desc: str | None = None, refresh: bool = True):
        if self._progress is not None and desc:
            self._progress.update(self._task, description=desc)

    def close(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __getattr__(self, name):  # refresh, set_postfix, clear, ...: nothing to do for a rich bar
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
