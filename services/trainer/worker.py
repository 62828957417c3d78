"""A Celery app that consumes only the ``train`` queue, for a trainer deployed without the search service:

    CPL_TRAINER_CHECKPOINT_ROOT=... celery -A services.trainer.worker:app worker --queues train --concurrency 1

With the search service, its app carries the same task (:func:`services.trainer.tasks.register_train_tasks`) and
``cpl worker --queues train`` runs it.
"""

from __future__ import annotations

from celery import Celery

from services.trainer.settings import TrainerSettings
from services.trainer.tasks import TRAIN_QUEUE, register_train_tasks


def create_train_celery(settings: TrainerSettings) -> Celery:
    app = Celery("cpl-train", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": f"{settings.key_prefix}celery:",
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        },
        task_default_queue=TRAIN_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_concurrency=1,
    )
    register_train_tasks(app, settings)
    return app


def __getattr__(name: str) -> Celery:
    # ``celery -A services.trainer.worker:app``: built from the environment when asked for, not at import
    if name == "app":
        return create_train_celery(TrainerSettings())  # type: ignore[call-arg]
    raise AttributeError(name)
