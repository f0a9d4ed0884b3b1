"""Structured logging: one JSON object per line (or plain text), extra fields kept."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; ``extra={...}`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        }
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq/aio-pika log every reconnect attempt with a traceback; our own line says it better.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aio_pika.robust_connection").setLevel(logging.CRITICAL)


class Tally:
    """Counts repeated events and logs them as one line per kind per interval, never one line
    per event: the first event after a quiet interval at once, the rest summed up at the end
    of each interval (with ``count``). Runs on an event loop's thread."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        interval_s: float = 10.0,
        level: int = logging.WARNING,
    ) -> None:
        self.logger = logger
        self.message = message
        self.interval_s = interval_s
        self.level = level
        self._counts: dict[tuple[tuple[str, str], ...], int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, n: int = 1, **fields: str) -> None:
        key = tuple(sorted(fields.items()))
        if self._timer is None:
            self._emit(key, n)
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._flush)
            return
        self._counts[key] = self._counts.get(key, 0) + n

    def _flush(self) -> None:
        counts, self._counts = self._counts, {}
        for key, n in counts.items():
            self._emit(key, n)
        self._timer = (
            asyncio.get_running_loop().call_later(self.interval_s, self._flush) if counts else None
        )

    def _emit(self, key: tuple[tuple[str, str], ...], n: int) -> None:
        self.logger.log(
            self.level, self.message, extra={**dict(key), "count": n, "interval_s": self.interval_s}
        )

    def close(self) -> None:
        """Log what was counted and not yet logged (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        for key, n in counts.items():
            self._emit(key, n)
