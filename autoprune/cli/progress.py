"""Progress on stderr: a tqdm bar for long work on a terminal, plain lines otherwise.

The work reports through the "autoprune" logger in lines (dense training per epoch, the search
per finished trial); on a terminal the lines of a known kind move a bar instead of scrolling,
and every other line is written above the bar. Not a terminal (a log file, CI, a pipe): every
line as it is, so logs stay greppable.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

# (pattern, what the bar is of): a start line gives the total, a step line the count.
DENSE_START = re.compile(r"training the dense baseline of (?P<name>\S+) \((?P<total>\d+) epochs")
DENSE_STEP = re.compile(r"^\s*dense epoch (?P<n>\d+): (?P<rest>.*)$")
# (no total: an open-ended search, which runs until its time limit)
SEARCH_STEP = re.compile(r"^\[(?P<n>\d+)(?:/(?P<total>\d+))? done(?P<rest>.*)$")


class ProgressHandler(logging.Handler):
    """Progress lines to whatever `sys.stderr` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar: Any = None
        self._kind = ""

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._kind = ""

    def _open(self, kind: str, total: int | None, desc: str, stream) -> Any:
        from tqdm import tqdm

        if self._kind != kind or self._bar is None or self._bar.total != total:
            self._close()
            self._bar = tqdm(total=total, desc=desc, file=stream, dynamic_ncols=True,
                             leave=True)
            self._kind = kind
        return self._bar

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        msg = self.format(record)
        if not (getattr(stream, "isatty", lambda: False)() and record.levelno < logging.WARNING):
            self._close()
            print(msg, file=stream, flush=True)
            return
        if m := DENSE_START.search(msg):
            self._close()
            self._open("dense", int(m["total"]), f"dense {m['name']}", stream)
        elif (m := DENSE_STEP.match(msg)) and self._kind == "dense":
            self._step(int(m["n"]), m["rest"])
        elif m := SEARCH_STEP.match(msg):
            self._open("search", int(m["total"]) if m["total"] else None, "trials", stream)
            self._step(int(m["n"]), m["rest"].strip(" ,]"))
        else:
            from tqdm import tqdm

            tqdm.write(msg, file=stream)

    def _step(self, n: int, postfix: str) -> None:
        bar = self._bar
        bar.set_postfix_str(postfix[:80], refresh=False)
        bar.update(max(n - bar.n, 0))
        bar.refresh()  # steps are seconds apart: show each one
        if bar.total is not None and bar.n >= bar.total:
            self._close()
