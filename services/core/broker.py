"""The Celery broker, as every part of cbmir connects to it: the task name and the app settings.

The listener, the watcher and ``cbmir reindex`` send :data:`EMBED_TASK` by name (``services/``
never imports ``workers/``); the workers register a task under the same name. Both build their
Celery app with :func:`celery_app`, so both reach the broker the same way.
"""

from __future__ import annotations

from json import loads
from queue import Empty
from typing import Any

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sql
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import text

from services.core.config import BrokerSettings

EMBED_TASK = "cbmir.embed_instance"
EMBEDDED_SCHEME = "sqla+"


class PruningChannel(kombu_sql.Channel):
    """kombu's SQL channel, deleting a message when it is taken instead of keeping it forever.

    kombu marks a taken message invisible and never removes it, so the embedded broker's SQLite
    file grows with every instance ever ingested. It also never hands an invisible message out
    again (no redelivery on this transport: the listener's resend sweep covers lost tasks), so
    deleting it loses nothing. Rows left invisible by earlier versions are removed on first use.
    """

    _pruned: set[str]

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
