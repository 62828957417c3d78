"""The Celery app of the search service (Redis broker), configured from :class:`SearchSettings`.

Delivery is at-least-once and every task is idempotent (it resumes the stored snapshot under a lease):
``task_acks_late`` (a task is acknowledged when it returns, so a lost worker's task comes back),
``task_reject_on_worker_lost``, prefetch 1, and one ``visibility_timeout`` (the broker redelivers a task not
acknowledged within it) that :class:`SearchSettings` checks is longer than two slices. No result backend: the
Redis store's records are the source of truth for a search's status.
"""

from __future__ import annotations

from celery import Celery

from services.common.celery import at_least_once_celery
from services.search.keys import Keys
from services.search.settings import SearchSettings

TASK_RUN = "cpl.search.run"


def create_celery(settings: SearchSettings) -> Celery:
    return at_least_once_celery(
        "cpl-search",
        settings.redis_url,
        visibility_timeout_s=settings.visibility_timeout_s,
        broker_key_prefix=f"{settings.key_prefix}:celery:",
        default_queue=Keys(settings.key_prefix).queue,
        transport_options={"unacked_restore_throttle": 1},
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
