"""The Celery broker, as every part of cbmir connects to it: the task name and the app settings.

The listener, the watcher and ``cbmir reindex`` send :data:`EMBED_TASK` by name (``services/``
never imports ``workers/``); the workers register a task under the same name. Both build their
Celery app with :func:`celery_app`, so both reach the broker the same way.
"""

from __future__ import annotations

import logging
import sqlite3
from json import loads
from queue import Empty
from typing import Any

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sql
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from services.core.config import BrokerSettings

logger = logging.getLogger(__name__)

EMBED_TASK = "cbmir.embed_instance"  # one spool name (what earlier versions sent; still served)
EMBED_BATCH_TASK = "cbmir.embed_instances"  # a list of spool names: what every sender sends now
EMBEDDED_SCHEME = "sqla+"


class PruningChannel(kombu_sql.Channel):
    """kombu's SQL channel, deleting a message when it is taken instead of keeping it forever.

    kombu marks a taken message invisible and never removes it, so the embedded broker's SQLite
    file grows with every instance ever ingested. It also never hands an invisible message out
    again (no redelivery on this transport: the listener's resend sweep covers lost tasks), so
    deleting it loses nothing. Rows left invisible by earlier versions are removed on first use.
    """

    _pruned: set[str]

    def _engine_from_config(self) -> Engine:
        """kombu's engine; on SQLite in WAL mode with ``synchronous=NORMAL``: a commit appends to
        the log without an fsync, and the listener's writes no longer wait for the workers' reads.
        A power cut may lose the last tasks, never a spooled instance: the spool is the record,
        and the listener sends what is pending again when it starts."""
        engine: Engine = super()._engine_from_config()
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_wal)
        return engine

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        obj = self._get_or_create(queue)
        pruned = self.__dict__.setdefault("_pruned", set())
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            messages = self.session.query(self.message_cls).filter(self.message_cls.queue_id == obj.id)
            if queue not in pruned:
                messages.filter(self.message_cls.visible == False).delete(synchronize_session=False)  # noqa: E712
                pruned.add(queue)
            message = (
                messages.with_for_update()
                .filter(self.message_cls.visible != False)  # noqa: E712 - SQL, not Python
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(1)
                .first()
            )
            if message is None:
                raise Empty()
            payload = message.payload
            self.session.delete(message)
            return loads(bytes_to_str(payload))
        finally:
            self.session.commit()


def _sqlite_wal(connection: Any, _record: Any) -> None:
    """WAL with ``synchronous=NORMAL`` where the filesystem allows it (WAL needs shared memory,
    which a network filesystem may not offer): otherwise SQLite's default journal, as before."""
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=10000")
        try:
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as exc:
            mode = None
            logger.warning("embedded broker: WAL mode refused (%s); keeping SQLite's default journal", exc)
        if mode and str(mode[0]).lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class EmbeddedSQLTransport(kombu_sql.Transport):
    """kombu's SQLAlchemy transport, polling its queue table every 50 ms instead of every second,
    with the :class:`PruningChannel`.

    At kombu's default of one poll a second a worker takes at most (threads) tasks a second.
    kombu reads ``polling_interval`` from the transport options, but its SQL transport hands every
    transport option to ``sqlalchemy.create_engine``, which rejects the keyword. So the interval is
    an attribute of this subclass, which only the Celery apps built by :func:`celery_app` use,
    instead of being set on kombu's own class for the whole process.
    """

    Channel = PruningChannel
    polling_interval = 0.05


def celery_app(broker: BrokerSettings, name: str, **conf: Any) -> Celery:
    """A Celery app on ``broker`` (its queue as the default); ``conf`` adds app settings."""
    url, transport = broker.url, None
    if url.startswith(EMBEDDED_SCHEME):
        url, transport = url[len(EMBEDDED_SCHEME) :], EmbeddedSQLTransport
        # kombu's SQLAlchemy transport wants the folder of its SQLite file to exist.
        if url.startswith("sqlite:///"):
            from pathlib import Path

            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        broker_transport_options=broker.transport_options(),
        broker_connection_retry_on_startup=True,
        task_default_queue=broker.queue,
        **conf,
    )
    return app


def queue_length(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` on ``app``'s broker, not yet taken by a worker (Redis: the
    list lengths over every priority; the embedded broker: its visible rows). Raises what the
    transport raises when the broker cannot be reached."""
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
        declared = connection.default_channel.queue_declare(queue=queue, passive=False)
        return int(declared.message_count)
