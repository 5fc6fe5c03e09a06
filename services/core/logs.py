"""Logging set-up shared by the long-running processes. Never log PHI: UIDs yes, names/IDs no."""

from __future__ import annotations

import logging
import os


def configure_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("CBMIR_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; its association summaries are enough at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
