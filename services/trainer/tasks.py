"""The ``train`` queue's task: run one training record to its end, reporting progress into its record.

Registered on a Celery app by :func:`register_train_tasks` (the search service's app, so ``cpl worker --queues
train`` consumes it; one job at a time: run the train worker with concurrency 1). Delivery is at-least-once
(``acks_late``, ``reject_on_worker_lost``): a worker killed mid-job leaves the task unacknowledged, the broker
gives it to the next worker, and :func:`services.trainer.jobs.run_training` continues from the last saved step.
A task for a record that is already final does nothing. A lease (``{prefix}training-lease:{id}``, renewed at
every progress save) keeps a second delivery of a job that is still running elsewhere from starting it twice:
that delivery is retried later instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import redis
from celery import Celery
from pydantic import ValidationError

from cpl.training.data import TrainingInputError
from cpl.training.resume import TrainState
from services.trainer.checkpoints import CheckpointNameError, CheckpointStore
from services.trainer.jobs import TrainingSpec, run_training
from services.trainer.records import FINAL, TrainingRecord, TrainingStore
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

TASK_TRAIN = "cpl.train.run"
TASK_ROUND = "cpl.rounds.run"
TRAIN_QUEUE = "train"
_CURVE_POINTS = 200
_SAVE_INTERVAL_S = 0.5


class TrainingCancelled(Exception):
    """Raised from the step callback when a cancel was asked for."""


class LeaseHeld(Exception):
    """Another worker runs this training now (its lease is live)."""


class Lease:
    """``SET NX PX`` with a random token; renewed while the job runs, released at its end."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.client, self.key, self.ttl_ms = client, key, int(ttl_s * 1000)
        self.token = uuid.uuid4().hex

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> None:
        # only our own lease (a compare-and-set in one round trip)
        self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)


_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Progress:
    """The step callback: step, epoch, loss, learning rate, ETA and a thinned loss curve into the record."""

    def __init__(self, store: TrainingStore, record: TrainingRecord, lease: Lease) -> None:
        self.store = store
        self.lease = lease
        self.record = record
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.last_save = 0.0

    def __call__(self, entry: dict[str, Any], total: int) -> None:
        r = self.record
        step = int(entry["step"])
        if self.first_step is None:
            self.first_step = step - 1
        r.step, r.total_steps, r.epoch = step, total, int(entry["epoch"])
        r.loss, r.learning_rate = float(entry["loss"]), float(entry["lr"])
        done = step - self.first_step
        elapsed = time.monotonic() - self.started
        r.eta_s = round(elapsed / done * (total - step), 1) if done > 0 else None
        if step % max(1, total // _CURVE_POINTS) == 0 or step == total:
            r.loss_curve.append((step, r.loss))
        now = time.monotonic()
        if now - self.last_save >= _SAVE_INTERVAL_S or step == total:
            self.last_save = now
            self.store.save(r)
            self.lease.renew()
            if self.store.cancel_requested(r.id):
                raise TrainingCancelled


def run_training_record(training_id: str, settings: TrainerSettings) -> TrainingRecord | None:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        store = TrainingStore(client, settings.key_prefix)
        record = store.get(training_id)
        if record is None:
            log.error("training task for an unknown record", extra={"training_id": training_id})
            return None
        if record.status in FINAL:
            return record
        checkpoints = CheckpointStore(settings.checkpoint_root)
        lease = Lease(client, f"{settings.key_prefix}training-lease:{training_id}", settings.training_lease_s)
        if not lease.acquire():
            raise LeaseHeld(training_id)
        try:
            return _run_leased(store, checkpoints, record, settings, lease)
        finally:
            lease.release()
    finally:
        client.close()


def _run_leased(
    store: TrainingStore, checkpoints: CheckpointStore, record: TrainingRecord, settings: TrainerSettings, lease: Lease
) -> TrainingRecord:
    training_id = record.id
    if store.cancel_requested(training_id):
        return _finish(store, checkpoints, record, "cancelled", None)
    record.status = "running"
    record.attempts += 1
    record.resumed_from_step = TrainState(checkpoints.resume_dir(training_id), every=1).saved_step
    store.save(record)
    spec = TrainingSpec(
        id=record.id,
        kind=record.kind,
        model=record.model,
        data=record.data_paths,
        name=record.name,
        overrides=record.overrides,
    )
    try:
        manifest = run_training(spec, settings, Progress(store, record, lease))
    except TrainingCancelled:
        return _finish(store, checkpoints, record, "cancelled", None)
    except (TrainingInputError, CheckpointNameError, ValidationError, OSError) as exc:
        return _finish(store, checkpoints, record, "failed", str(exc))
    except Exception as exc:
        log.exception("training failed", extra={"training_id": training_id})
        return _finish(store, checkpoints, record, "failed", f"{exc.__class__.__name__}: {exc}")
    record.checkpoint = record.name
    record.manifest = manifest.model_dump(mode="json")
    record.metrics = manifest.metrics
    record.step = record.total_steps = int(manifest.metrics.get("steps", record.step))
    record.eta_s = 0.0
    if record.deploy:
        record.deployment_id = _deploy(settings, record)
    return _finish(store, checkpoints, record, "succeeded", None)


def _deploy(settings: TrainerSettings, record: TrainingRecord) -> str | None:
    import redis.asyncio as aioredis

    from services.trainer.deploy import Deployer, DeploymentError, DeploymentRequest, DeploymentTarget

    service = "value" if record.kind == "value" else "policy"

    async def run() -> str | None:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            request = DeploymentRequest(targets=[DeploymentTarget(service=service, checkpoint=record.name)])
            deployment = await Deployer(settings, client).deploy(request)
        except DeploymentError as exc:
            record.error = f"deployment refused: {exc.message}"
            return None
        finally:
            await client.aclose()
        if deployment.status != "succeeded":
            record.error = f"deployment {deployment.id} failed: {deployment.error}"
        return deployment.id

    return asyncio.run(run())


def _finish(
    store: TrainingStore, checkpoints: CheckpointStore, record: TrainingRecord, status: str, error: str | None
) -> TrainingRecord:
    record.status = status  # type: ignore[assignment]
    if error is not None:
        record.error = error
    if status != "succeeded":
        checkpoints.discard(record.id)
    store.save(record)
    log.info("training finished", extra={"training_id": record.id, "status": status})
    return record


def register_train_tasks(app: Celery, settings: TrainerSettings | None = None) -> None:
    """Add the train task to ``app``, routed to the ``train`` queue."""

    @app.task(
        name=TASK_TRAIN, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, max_retries=None
    )
    def train(self, training_id: str) -> None:
        resolved = settings or TrainerSettings()  # type: ignore[call-arg]
        try:
            run_training_record(training_id, resolved)
        except LeaseHeld as exc:
            # running on another worker (this is a redelivery): look again once its lease could have run out
            raise self.retry(countdown=resolved.training_lease_s, exc=exc) from exc

    @app.task(
        name=TASK_ROUND, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, max_retries=None
    )
    def run_round_task(self, round_id: str) -> None:
        # the round driver trains in this process (solo pool), so a round never waits for its own trainings
        from services.trainer.rounds import run_round

        resolved = settings or TrainerSettings()  # type: ignore[call-arg]
        try:
            run_round(round_id, resolved)
        except LeaseHeld as exc:
            raise self.retry(countdown=resolved.training_lease_s, exc=exc) from exc

    routes = dict(app.conf.task_routes or {})
    routes[TASK_TRAIN] = {"queue": TRAIN_QUEUE}
    routes[TASK_ROUND] = {"queue": TRAIN_QUEUE}
    app.conf.task_routes = routes


def enqueue_training(app: Celery, training_id: str) -> None:
    app.send_task(TASK_TRAIN, args=[training_id], queue=TRAIN_QUEUE)


def enqueue_round(app: Celery, round_id: str) -> None:
    app.send_task(TASK_ROUND, args=[round_id], queue=TRAIN_QUEUE)


def register_if_configured(app: Celery) -> bool:
    """For the search service's ``create_celery``: register the train task when the trainer is configured
    (``CPL_TRAINER_CHECKPOINT_ROOT`` set), so ``cpl worker --queues train`` can run it."""
    if not os.environ.get("CPL_TRAINER_CHECKPOINT_ROOT"):
        return False
    if TASK_TRAIN not in app.tasks:
        register_train_tasks(app, TrainerSettings())  # type: ignore[call-arg]
    return True
