"""Logging set-up shared by every cbmir process. Never log PHI: UIDs yes, names and IDs no."""

from __future__ import annotations

import logging
import os

from services.core.errors import ConfigError

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def configure_logging(level: str | None = None) -> None:
    """Root logging at ``level`` (default ``CBMIR_LOG_LEVEL``, INFO), once, at a process's start.

    Python warnings (pydicom reports many file defects as warnings) are routed into logging
    (logger ``py.warnings``), so they get the same format and handlers as every other message.
    """
    name = (level or os.environ.get("CBMIR_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(f"CBMIR_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {name!r}")
    logging.basicConfig(level=name, format=FORMAT)
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO; its association summaries are enough at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
