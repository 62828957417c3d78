"""The one Celery configuration every queue of the project shares: at-least-once delivery over a Redis broker.

A task is acknowledged when it returns (``task_acks_late``) and requeued when its worker dies
(``task_reject_on_worker_lost``); prefetch 1 so a busy worker holds no queued task; one ``visibility_timeout``
after which the broker redelivers an unacknowledged task; no result backend (each service's own Redis records
are the truth about a job). Tasks must therefore be idempotent, which the search and train tasks are (leases and
resumable state).
"""

from __future__ import annotations

from typing import Any

from celery import Celery


def at_least_once_celery(
    name: str,
    redis_url: str,
    *,
    visibility_timeout_s: int,
    broker_key_prefix: str,
    default_queue: str,
    transport_options: dict[str, Any] | None = None,
    **conf: Any,
) -> Celery:
    """A Celery app on ``redis_url`` whose broker keys all start with ``broker_key_prefix``.

    ``transport_options`` adds to the broker transport options; ``conf`` adds to (or overrides) the app's conf.
    """
    app = Celery(name, broker=redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            # Every broker key under our prefix: deployments (and test sessions) sharing a Redis never meet.
            "global_keyprefix": broker_key_prefix,
            # How often a worker looks for tasks whose worker died (older than the visibility timeout).
            "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 4)),
            **(transport_options or {}),
        },
        task_default_queue=default_queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **conf,
    )
    return app
