"""The run folder's log file (Hydra's job log) that survives a full or unwritable disk.

``logging.FileHandler`` prints a traceback to stderr for every record it cannot write, so a full run
folder buried the run's one-line error under ~120 lines of them. :class:`RunLogHandler` says once, on
stdout beside the other log lines, that the log file cannot be written and why, then writes the
records to the console only; the run goes on, and fails with its own one-line error only if its
outputs cannot be written either.
"""
from __future__ import annotations

import logging
import sys


class RunLogHandler(logging.FileHandler):
    """A FileHandler that stops writing after its first failed write and reports that failure once."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = False) -> None:
        self.failed: BaseException | None = None
        try:
            super().__init__(filename, mode, encoding, delay)
        except OSError as e:  # the folder is full or read-only already: no log file at all
            logging.Handler.__init__(self)
            self.baseFilename, self.mode, self.encoding, self.stream = filename, mode, encoding, None
            self._fail(e)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self._fail(sys.exc_info()[1])

    def _fail(self, error: BaseException | None) -> None:
        if self.failed is not None:
            return
        self.failed = error or OSError("unknown error")
        reason = getattr(error, "strerror", None) or error
        print(f"warning: cannot write the run log {self.baseFilename} ({reason}) — its lines go to the console only; "
              "free space in the run folder or choose another with hydra.run.dir=", file=sys.stdout, flush=True)
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.failed is None:
            super().close()
        else:
            logging.Handler.close(self)
