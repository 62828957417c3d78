"""A Celery app that consumes only the ``train`` queue, for a trainer deployed without the search service:

    CPL_TRAINER_CHECKPOINT_ROOT=... celery -A services.trainer.worker:app worker --queues train --concurrency 1

With the search service, its app carries the same task (:func:`services.trainer.tasks.register_train_tasks`) and
``cpl worker --queues train`` runs it.
"""

from __future__ import annotations

from celery import Celery

from services.common.celery import at_least_once_celery
from services.trainer.settings import TrainerSettings
from services.trainer.tasks import TRAIN_QUEUE, register_train_tasks


def create_train_celery(settings: TrainerSettings) -> Celery:
    app = at_least_once_celery(
        "cpl-train",
        settings.redis_url,
        visibility_timeout_s=settings.visibility_timeout_s,
        broker_key_prefix=f"{settings.key_prefix}celery:",
        default_queue=TRAIN_QUEUE,
        worker_concurrency=1,
    )
    register_train_tasks(app, settings)
    return app


def __getattr__(name: str) -> Celery:
    # ``celery -A services.trainer.worker:app``: built from the environment when asked for, not at import
    if name == "app":
        return create_train_celery(TrainerSettings())  # type: ignore[call-arg]
    raise AttributeError(name)
