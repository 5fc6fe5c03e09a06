"""Logging set-up shared by every cbmir process. Never log PHI: UIDs yes, names and IDs no.

Our own messages carry identifiers and codes only. What other code writes can echo DICOM values
(pydicom's validation warnings quote element values; an exception's text may hold raw bytes), so
every record passes :class:`PhiMask` on its way out: in records of other libraries, and in the
exceptions our records carry, every quoted value and bytes literal becomes ``'…'``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import traceback
from typing import Any

from services.core.errors import ConfigError

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
OUR_LOGGERS = ("services", "workers", "models", "cbmir", "__main__")

# quoted strings (with escapes) and bytes literals: where library messages put element values
_VALUES = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*"|b'[^']*|b"[^"]*""")


def mask_values(text: str) -> str:
    """``text`` with every quoted value and bytes literal replaced by ``'…'``."""
    return _VALUES.sub("'…'", text)


# cbmir's own file names: a UID or "x" and a hash (spool), with a quarantine prefix or a suffix
_OWN_FILE_NAME = re.compile(r"^(?:q-)?(?:\d+-)?(?:\d+(?:\.\d+)*|x[0-9a-f]{40})(?:\.[a-z]{1,8})?(?:\.\d+)?$")


def file_ref(name: str | os.PathLike[str]) -> str:
    """A file for a message: cbmir's own names (UIDs) as they are; any other name, which someone
    chose and which may carry a patient's name, as ``file #<10 hex digits of its SHA-256><suffix>``
    (``printf %s 'xray/name.png' | sha256sum`` finds it again)."""
    text = os.fspath(name)
    base = os.path.basename(text)
    if _OWN_FILE_NAME.match(base):
        return base
    suffix = os.path.splitext(base)[1].lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
    return f"file #{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}{suffix}"


def describe(exc: BaseException, limit: int = 160) -> str:
    """An exception as a short, PHI-free text for a message: its type and its masked message."""
    text = " ".join(mask_values(str(exc)).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PhiMask(logging.Filter):
    """Masks values in records of other libraries, and in the exceptions any record carries."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops one."""
        ours = record.name.startswith(OUR_LOGGERS)
        if not ours:
            record.msg, record.args = mask_values(record.getMessage()), None
        elif record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            if any(isinstance(arg, BaseException) for arg in args):
                record.args = tuple(describe(a) if isinstance(a, BaseException) else a for a in args)
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = masked_traceback(record.exc_info)
        return True


def masked_traceback(
    exc_info: tuple[type[BaseException], BaseException, Any] | tuple[None, None, None],
) -> str:
    """A formatted traceback whose exception messages are masked; the frames (file, line, code)
    stay readable."""
    lines = "".join(traceback.format_exception(*exc_info)).rstrip().splitlines()
    return "\n".join(line if line.startswith("  ") else mask_values(line) for line in lines)


def configure_logging(level: str | None = None) -> None:
    """Root logging at ``level`` (default ``CBMIR_LOG_LEVEL``, INFO), once, at a process's start.

    Python warnings (pydicom reports many file defects as warnings) are routed into logging
    (logger ``py.warnings``), so they get the same format, handlers and masking as every other
    message.
    """
    name = (level or os.environ.get("CBMIR_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(f"CBMIR_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {name!r}")
    logging.basicConfig(level=name, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PhiMask) for f in handler.filters):
            handler.addFilter(PhiMask())
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO; its association summaries are enough at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def append_audit(path: os.PathLike[str] | str, who: str, action: str, **details: Any) -> None:
    """One line of the administrative audit trail (``<data>/audit/admin.jsonl``), fsynced, and the
    same on the ``cbmir.audit`` log: who, when, what, how many. Callers pass no patient data."""
    import json
    import time
    from pathlib import Path

    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": who, "action": action}
    entry.update(details)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    logging.getLogger("cbmir.audit").info("%s by %s: %s", action, who, json.dumps(details, sort_keys=True))
