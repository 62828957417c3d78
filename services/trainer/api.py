"""The training and deployment routes (an ``APIRouter`` the search service's app includes).

- ``POST /v1/trainings``: kind, starting model, data (an inline JSONL, checked row by row against the job's row
  schema of docs/data-formats.md before anything is queued), output name, config overrides, ``deploy``. 202.
- ``GET /v1/trainings``, ``GET /v1/trainings/{id}``: status, step / total steps, epoch, loss, learning rate,
  ETA, loss curve, final metrics, the published checkpoint and its manifest.
- ``POST /v1/trainings/{id}/cancel``.
- ``POST /v1/deployments``, ``GET /v1/deployments``, ``GET /v1/deployments/{id}``.
- ``POST /v1/rounds`` (CPL's rounds as one job on the ``train`` queue, services/trainer/rounds.py),
  ``GET /v1/rounds``, ``GET /v1/rounds/{id}``, ``POST /v1/rounds/{id}/cancel``.

Every route needs an operator key (``CPL_TRAINER_OPERATOR_KEYS``): 401 without a bearer token, 403 with any
other key (a search API key included). Bad input is a 4xx with a message and queues nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpl.training.config import JobKind
from cpl.training.data import PairRow, SFTRow, StepPairRow, TrainingInputError, ValueRow, read_rows
from services.common.auth import bearer_auth
from services.trainer.checkpoints import NAME_RE, CheckpointNameError, CheckpointStore, check_name
from services.trainer.deploy import Deployer, Deployment, DeploymentError, DeploymentRequest
from services.trainer.jobs import TrainingSpec, build_config, starting_model
from services.trainer.records import FINAL, TrainingRecord, TrainingStore
from services.trainer.rounds import (
    ROUND_FINAL,
    RoundProblem,
    RoundRecord,
    RoundSpec,
    RoundStore,
    plan_stages,
    search_config,
)
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

UPLOADS = ".uploads"
ROW_TYPES = {"sft": SFTRow, "step-apo": StepPairRow, "step-dpo": PairRow, "dpo": PairRow, "value": ValueRow}


class TrainingCreate(BaseModel):
    kind: JobKind
    model: str = Field(default="base", description="`base`, or the name of a published checkpoint")
    data_jsonl: str = Field(min_length=1, description="the dataset: JSONL rows of the job's format")
    name: str | None = Field(default=None, description="checkpoint name (default: `<kind>-<training id>`)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="hyperparameters over the defaults")
    deploy: bool = Field(default=False, description="deploy the checkpoint to every replica when done")


class CancelResult(BaseModel):
    id: str
    status: str
    cancel_requested: bool


class RoundCreate(BaseModel):
    """``POST /v1/rounds``: CPL's rounds over these problems, run by the stack (docs/trainer-service.md)."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(default=2, ge=1, le=5)
    problems: list[RoundProblem] = Field(min_length=1, description="training problems, each with its answer")
    eval_problems: list[RoundProblem] = Field(
        default_factory=list, description="held-out problems, evaluated zero-shot after every round"
    )
    simulations: list[int] | None = Field(
        default=None, min_length=1, description="simulations per round (the last one repeats; default 200, 100)"
    )
    search_settings: dict[str, Any] = Field(default_factory=dict, description="search settings (SearchOverrides)")
    training: dict[JobKind, dict[str, Any]] = Field(
        default_factory=dict, description='hyperparameter overrides per job kind, e.g. {"sft": {"epochs": 1}}'
    )
    baselines: bool = Field(default=False, description="also train the Step-DPO baseline")
    eval_max_tokens: int = Field(default=256, ge=1, le=4096)


def check_round(body: RoundCreate, settings: TrainerSettings, search: Any | None) -> RoundSpec:
    """Everything a round will need, checked before it is queued: a 4xx (HTTPException) names what is wrong."""
    from services.search.schemas import SearchOverrides

    if settings.base_policy is None:
        raise HTTPException(422, "no base model configured (CPL_TRAINER_BASE_POLICY): a round trains from it")
    if not settings.policy_replicas or not settings.value_replicas:
        raise HTTPException(
            422, "a round deploys its models: CPL_TRAINER_POLICY_REPLICAS and CPL_TRAINER_VALUE_REPLICAS must be set"
        )
    if search is not None:
        if len(body.problems) > search.max_batch_problems:
            raise HTTPException(
                413, f"{len(body.problems)} problems; a round's batch holds at most {search.max_batch_problems}"
            )
        for i, p in enumerate([*body.problems, *body.eval_problems]):
            if len(p.question) > search.max_question_chars:
                raise HTTPException(422, f"problem {i}: question longer than {search.max_question_chars} characters")
        for sims in body.simulations or []:
            if not 1 <= sims <= search.max_simulations:
                raise HTTPException(422, f"simulations must be between 1 and {search.max_simulations} (got {sims})")
    try:
        if body.search_settings:
            SearchOverrides(**body.search_settings)
        spec = RoundSpec(**body.model_dump())
        for r in range(1, spec.rounds + 1):
            search_config(spec, r)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise HTTPException(422, f"invalid round settings: {where}") from exc
    for kind, overrides in body.training.items():
        try:
            build_config(TrainingSpec(id="check", kind=kind, data=[Path("-")], name="check", overrides=overrides))
        except TrainingInputError as exc:
            raise HTTPException(422, f"training.{kind}: {exc}") from exc
    return spec


def create_trainer_router(
    settings: TrainerSettings,
    enqueue: Callable[[str], None],
    enqueue_round: Callable[[str], None] | None = None,
    search_settings: Any | None = None,
) -> APIRouter:
    """The routes; ``enqueue(training_id)`` sends the train task (e.g. :func:`tasks.enqueue_training`),
    ``enqueue_round(round_id)`` the round task (no round routes without it); ``search_settings`` (the search
    service's) bound a round's problems and simulations before it is queued."""
    auth = bearer_auth(settings.resolved_operator_keys, "training API (operator key)")
    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)], tags=["trainings"])
    store = TrainingStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    checkpoints = CheckpointStore(settings.checkpoint_root)
    async_redis = aioredis.Redis.from_url(settings.redis_url)
    deployer = Deployer(settings, async_redis)
    running: set[asyncio.Task[Any]] = set()

    def _create(body: TrainingCreate) -> TrainingRecord:
        training_id = uuid.uuid4().hex[:16]
        name = body.name or f"{body.kind}-{training_id}"
        try:
            check_name(name)
            if checkpoints.exists(name):
                raise CheckpointNameError(409, f"a checkpoint named {name!r} exists already")
            spec = TrainingSpec(id=training_id, kind=body.kind, model=body.model, data=[Path("-")], name=name)
            starting_model(spec, settings, checkpoints)
            build_config(spec.model_copy(update={"overrides": body.overrides}))
        except CheckpointNameError as exc:
            raise HTTPException(422 if exc.status == 400 else exc.status, exc.message) from exc
        except TrainingInputError as exc:
            raise HTTPException(422, str(exc)) from exc
        data = body.data_jsonl.encode()
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"data_jsonl is larger than {settings.max_upload_bytes} bytes")
        upload = settings.checkpoint_root / UPLOADS / f"{training_id}.jsonl"
        upload.parent.mkdir(parents=True, exist_ok=True)
        upload.write_bytes(data)
        try:
            rows, _ = read_rows([upload], ROW_TYPES[body.kind])
        except TrainingInputError as exc:
            upload.unlink(missing_ok=True)
            message = str(exc).replace(str(upload), "data_jsonl")
            raise HTTPException(422, f"data does not fit a {body.kind} training: {message}") from exc
        record = TrainingRecord(
            id=training_id,
            kind=body.kind,
            model=body.model,
            data=[str(upload)],
            data_rows=len(rows),
            name=name,
            overrides=body.overrides,
            deploy=body.deploy,
        )
        store.create(record)
        try:
            enqueue(training_id)
        except Exception as exc:
            record.status, record.error = "failed", f"could not queue the training: {exc}"
            store.save(record)
            raise HTTPException(503, record.error, headers={"Retry-After": "5"}) from exc
        return record

    @router.post("/trainings", status_code=202, response_model=TrainingRecord, responses={401: {}, 403: {}})
    async def create_training(body: TrainingCreate) -> TrainingRecord:
        """Check everything, then queue the job on the ``train`` queue. 202 with the training."""
        return await asyncio.to_thread(_create, body)

    @router.get("/trainings", response_model=list[TrainingRecord])
    async def list_trainings(limit: int = 100) -> list[TrainingRecord]:
        return await asyncio.to_thread(store.list, max(1, min(limit, 1000)))

    async def _get(training_id: str) -> TrainingRecord:
        record = await asyncio.to_thread(store.get, training_id) if NAME_RE.fullmatch(training_id) else None
        if record is None:
            raise HTTPException(404, f"no training {training_id!r}")
        return record

    @router.get("/trainings/{training_id}", response_model=TrainingRecord)
    async def get_training(training_id: str) -> TrainingRecord:
        return await _get(training_id)

    @router.post("/trainings/{training_id}/cancel", status_code=202, response_model=CancelResult)
    async def cancel_training(training_id: str) -> CancelResult:
        """Queued: cancelled at once. Running: stops after the current step, publishes nothing."""
        record = await _get(training_id)
        if record.status in FINAL:
            raise HTTPException(409, f"training {training_id} is already {record.status}")
        await asyncio.to_thread(store.request_cancel, training_id)
        record = await _get(training_id)
        if record.status == "queued":
            record.status = "cancelled"
            await asyncio.to_thread(store.save, record)
        return CancelResult(id=training_id, status=record.status, cancel_requested=True)

    if enqueue_round is not None:
        _round_routes(router, settings, enqueue_round, search_settings, store)

    @router.post("/deployments", status_code=202, response_model=Deployment, tags=["deployments"])
    async def create_deployment(body: DeploymentRequest) -> Deployment:
        """Swap published checkpoints into every replica (one deployment per service at a time: 409)."""
        try:
            deployment, locks, paths = await deployer.begin(body)
        except DeploymentError as exc:
            raise HTTPException(exc.status, exc.message) from exc
        task = asyncio.create_task(deployer.run(body, deployment, locks, paths))
        running.add(task)
        task.add_done_callback(running.discard)
        return deployment

    @router.get("/deployments", response_model=list[Deployment], tags=["deployments"])
    async def list_deployments(limit: int = 50) -> list[Deployment]:
        return await deployer.store.list(max(1, min(limit, 500)))

    @router.get("/deployments/{deployment_id}", response_model=Deployment, tags=["deployments"])
    async def get_deployment(deployment_id: str) -> Deployment:
        found = await deployer.store.get(deployment_id) if NAME_RE.fullmatch(deployment_id) else None
        if found is None:
            raise HTTPException(404, f"no deployment {deployment_id!r}")
        return found

    return router


def _round_routes(
    router: APIRouter,
    settings: TrainerSettings,
    enqueue_round: Callable[[str], None],
    search_settings: Any | None,
    trainings: TrainingStore,
) -> None:
    rounds = RoundStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)

    def _create(body: RoundCreate) -> RoundRecord:
        spec = check_round(body, settings, search_settings)
        record = RoundRecord(id=uuid.uuid4().hex[:16], spec=spec, stages=plan_stages(spec))
        rounds.create(record)
        try:
            enqueue_round(record.id)
        except Exception as exc:
            record.status, record.error = "failed", f"could not queue the round: {exc}"
            rounds.save(record)
            raise HTTPException(503, record.error, headers={"Retry-After": "5"}) from exc
        return record

    @router.post("/rounds", status_code=202, response_model=RoundRecord, tags=["rounds"], responses={401: {}, 403: {}})
    async def create_round(body: RoundCreate) -> RoundRecord:
        """Check everything, then queue the round job on the ``train`` queue. 202 with the round."""
        return await asyncio.to_thread(_create, body)

    @router.get("/rounds", response_model=list[RoundRecord], tags=["rounds"])
    async def list_rounds(limit: int = 50) -> list[RoundRecord]:
        return await asyncio.to_thread(rounds.list, max(1, min(limit, 500)))

    async def _get(round_id: str) -> RoundRecord:
        record = await asyncio.to_thread(rounds.get, round_id) if NAME_RE.fullmatch(round_id) else None
        if record is None:
            raise HTTPException(404, f"no round {round_id!r}")
        return record

    @router.get("/rounds/{round_id}", response_model=RoundRecord, tags=["rounds"])
    async def get_round(round_id: str) -> RoundRecord:
        return await _get(round_id)

    @router.post("/rounds/{round_id}/cancel", status_code=202, response_model=CancelResult, tags=["rounds"])
    async def cancel_round(round_id: str) -> CancelResult:
        """Queued: cancelled at once. Running: its search or training stops, nothing further is deployed."""
        record = await _get(round_id)
        if record.status in ROUND_FINAL:
            raise HTTPException(409, f"round {round_id} is already {record.status}")
        await asyncio.to_thread(rounds.request_cancel, round_id)
        if record.training_id is not None:
            await asyncio.to_thread(trainings.request_cancel, record.training_id)
        if record.status == "queued":
            record.status = "cancelled"
            await asyncio.to_thread(rounds.save, record)
        return CancelResult(id=round_id, status=record.status, cancel_requested=True)


def include_trainer_routes(app: FastAPI, celery: Celery) -> bool:
    """The one line a search app factory needs: mount the trainer routes and register the train task on its
    Celery app, when the trainer is configured (``CPL_TRAINER_CHECKPOINT_ROOT`` set); returns whether it did."""
    from services.trainer.tasks import enqueue_round, enqueue_training, register_if_configured

    if not register_if_configured(celery):
        log.info("trainer routes not mounted: CPL_TRAINER_CHECKPOINT_ROOT is not set")
        return False
    settings = TrainerSettings()  # type: ignore[call-arg]
    api = getattr(app.state, "api", None)  # the search service's (its limits bound a round's batch)
    router = create_trainer_router(
        settings,
        lambda training_id: enqueue_training(celery, training_id),
        lambda round_id: enqueue_round(celery, round_id),
        getattr(api, "settings", None),
    )
    app.include_router(router)
    return True
