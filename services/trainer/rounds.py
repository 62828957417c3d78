"""CPL's rounds run by the stack: ``POST /v1/rounds`` queues one round job on the ``train`` queue, and the round
driver (:func:`run_round`, the task ``cpl.rounds.run``) takes it through every stage of every round:

    search (a batch through the search service's own store and queue) -> export (the batch's four datasets)
    -> sft -> step_apo (-> step_dpo when asked) -> value (training jobs, recorded like ``POST /v1/trainings``)
    -> deploy (policy and value into every replica, :class:`~services.trainer.deploy.Deployer`)
    -> eval (zero-shot, through the policy service, :func:`cpl.evaluation.evaluate`)

Round 1 searches with the plain prompt (200 simulations), round 2 and later with the XML prompt (100), searched
by the models the previous round deployed; every round's policy is trained from the base model again (paper
§4.1), the value model continues from the one that searched (docs/decisions/004). The order and the starting
models are the library's (:func:`cpl.round.training_steps`); the service only runs them.

Each stage's record lives in the round's record in Redis. The driver runs in a train worker (solo pool) and
trains in-process, so a round and the trainings it starts never wait for each other. A worker killed mid-round
leaves the task unacknowledged; the next delivery skips the stages already done and resumes the one it had
reached: the search batch by its idempotency key (the same batch), a training from its last saved step, a
deployment or an evaluation from the start.

Keys (under the trainer's prefix): ``{prefix}round:{id}`` (the record, JSON), ``{prefix}rounds`` (ids by time),
``{prefix}round-cancel:{id}`` (a cancel was asked), ``{prefix}round-lease:{id}`` (the driver running it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from cpl.config import PromptFormat, SearchConfig
from cpl.round import final_policy_stage, training_steps
from cpl.training.data import TrainingInputError, read_rows
from services.trainer.records import TrainingRecord, TrainingStore, now
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

ROUNDS_DIR = ".rounds"
EXPORTS = ("sft", "plan_pairs", "solution_pairs", "value")
RoundStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ROUND_FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
StageStatus = Literal["pending", "running", "done", "skipped", "failed", "cancelled"]


class RoundProblem(BaseModel):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1, description="the ground truth (the search grades its leaves with it)")
    id: str | None = Field(default=None, min_length=1, max_length=200)


class StageEntry(BaseModel):
    round: int
    stage: str
    status: StageStatus = "pending"
    started_at: str | None = None
    finished_at: str | None = None
    reason: str | None = Field(default=None, description="why a stage was skipped")
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class RoundSpec(BaseModel):
    """What a round job runs (the validated request, stored in the record)."""

    rounds: int = Field(default=2, ge=1, le=5)
    problems: list[RoundProblem]
    eval_problems: list[RoundProblem] = Field(default_factory=list)
    simulations: list[int] | None = Field(
        default=None, description="simulations of each round's searches (default 200, then 100: paper §4.1)"
    )
    search_settings: dict[str, Any] = Field(default_factory=dict, description="search settings over the presets")
    training: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="hyperparameter overrides per job kind (sft, step-apo, step-dpo, value)"
    )
    baselines: bool = Field(default=False, description="also train the Step-DPO baseline")
    eval_max_tokens: int = Field(default=256, ge=1, le=4096)


class RoundRecord(BaseModel):
    id: str
    status: RoundStatus = "queued"
    spec: RoundSpec
    round: int = Field(default=1, description="the round being run (the last one once finished)")
    stage: str | None = Field(default=None, description="the stage being run")
    stages: list[StageEntry] = Field(default_factory=list)
    accuracy: dict[str, float] = Field(default_factory=dict, description="round number -> eval accuracy")
    training_id: str | None = Field(default=None, description="the training job running now")
    error: str | None = None
    attempts: int = 0
    created_at: str = Field(default_factory=now)
    updated_at: str = Field(default_factory=now)

    def entry(self, round_number: int, stage: str) -> StageEntry:
        found = next((e for e in self.stages if e.round == round_number and e.stage == stage), None)
        if found is None:
            raise KeyError(f"round {round_number} has no stage {stage}")
        return found

    def done(self, round_number: int) -> set[str]:
        return {e.stage for e in self.stages if e.round == round_number and e.status == "done"}


def stage_names(round_number: int, baselines: bool) -> list[str]:
    return ["search", "export", *(s.stage for s in training_steps(round_number, baselines)), "deploy", "eval"]


def plan_stages(spec: RoundSpec) -> list[StageEntry]:
    return [
        StageEntry(round=r, stage=stage) for r in range(1, spec.rounds + 1) for stage in stage_names(r, spec.baselines)
    ]


def search_config(spec: RoundSpec, round_number: int) -> SearchConfig:
    """The round's preset (plain/200, then XML/100) with the request's simulations and settings on top."""
    overrides: dict[str, Any] = dict(spec.search_settings)
    if spec.simulations:
        overrides["simulations"] = spec.simulations[min(round_number, len(spec.simulations)) - 1]
    return SearchConfig.round_preset(round_number, **overrides)


class RoundStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def key(self, round_id: str) -> str:
        return f"{self.prefix}round:{round_id}"

    def cancel_key(self, round_id: str) -> str:
        return f"{self.prefix}round-cancel:{round_id}"

    def lease_key(self, round_id: str) -> str:
        return f"{self.prefix}round-lease:{round_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}rounds"

    def create(self, record: RoundRecord) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(record.id), record.model_dump_json())
            pipe.zadd(self.index, {record.id: time.time()})
            pipe.execute()

    def save(self, record: RoundRecord) -> None:
        record.updated_at = now()
        self.redis.set(self.key(record.id), record.model_dump_json())

    def get(self, round_id: str) -> RoundRecord | None:
        raw = self.redis.get(self.key(round_id))
        return None if raw is None else RoundRecord.model_validate_json(raw)

    def list(self, limit: int = 100) -> list[RoundRecord]:
        ids = self.redis.zrevrange(self.index, 0, limit - 1)
        found = [self.get(i.decode() if isinstance(i, bytes) else i) for i in ids]
        return [r for r in found if r is not None]

    def request_cancel(self, round_id: str) -> None:
        self.redis.set(self.cancel_key(round_id), "1")

    def cancel_requested(self, round_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(round_id)))


class RoundCancelled(Exception):
    """A cancel was asked: the driver stops between (or inside) stages."""


class StageFailed(Exception):
    """A stage cannot succeed (a failed training, a failed deployment, a failed batch): the round fails."""


class LeaseKeeper:
    """Renews the round's lease from a thread while the (blocking) driver runs, so a second delivery of the same
    round waits instead of running it twice, and a dead driver's lease runs out."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        from services.trainer.tasks import Lease

        self.lease = Lease(client, key, ttl_s)
        self.interval = ttl_s / 3
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="cpl-round-lease", daemon=True)

    def acquire(self) -> bool:
        if not self.lease.acquire():
            return False
        self.thread.start()
        return True

    def _renew(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.lease.renew()
            except redis.RedisError as exc:
                log.warning("round lease renewal failed; retrying", extra={"error": str(exc)})

    def release(self) -> None:
        self.stop.set()
        self.lease.release()


class RoundDriver:
    """Runs one round record's stages in order; every stage's outcome is saved before the next starts."""

    def __init__(self, settings: TrainerSettings, client: redis.Redis, record: RoundRecord) -> None:
        from services.search.settings import SearchSettings

        self.settings = settings
        self.search_settings = SearchSettings()  # type: ignore[call-arg]
        self.store = RoundStore(client, settings.key_prefix)
        self.trainings = TrainingStore(client, settings.key_prefix)
        self.record = record
        self.dir = settings.checkpoint_root / ROUNDS_DIR / record.id

    def save(self) -> None:
        self.store.save(self.record)

    def check_cancel(self) -> None:
        if self.store.cancel_requested(self.record.id):
            raise RoundCancelled

    def run(self) -> RoundRecord:
        r = self.record
        r.status = "running"
        r.attempts += 1
        r.error = None
        self.save()
        try:
            for entry in r.stages:
                if entry.status in ("done", "skipped"):
                    continue
                self.check_cancel()
                r.round, r.stage = entry.round, entry.stage
                entry.status, entry.started_at, entry.error = "running", now(), None
                self.save()
                try:
                    outcome = getattr(self, f"stage_{entry.stage}")(entry.round)
                except StageFailed as exc:
                    entry.status, entry.error, entry.finished_at = "failed", str(exc), now()
                    raise
                except RoundCancelled:
                    entry.status, entry.finished_at = "cancelled", now()
                    raise
                if isinstance(outcome, str):
                    entry.status, entry.reason = "skipped", outcome
                else:
                    entry.status, entry.outputs = "done", outcome
                entry.finished_at = now()
                r.training_id = None
                self.save()
        except RoundCancelled:
            return self.finish("cancelled", None)
        except StageFailed as exc:
            return self.finish("failed", f"round {r.round} {r.stage}: {exc}")
        r.stage = None
        return self.finish("succeeded", None)

    def finish(self, status: RoundStatus, error: str | None) -> RoundRecord:
        self.record.status, self.record.error, self.record.training_id = status, error, None
        self.save()
        log.info("round finished", extra={"round_id": self.record.id, "status": status})
        return self.record

    # --- search and export ---------------------------------------------------------------------------------

    def stage_search(self, round_number: int) -> dict[str, Any]:
        return asyncio.run(self._search(round_number))

    async def _search(self, round_number: int) -> dict[str, Any]:
        from services.common.errors import APIError
        from services.search.api import SearchAPI
        from services.search.schemas import ProblemIn, SearchOverrides

        spec = self.record.spec
        preset = search_config(spec, round_number)
        api = SearchAPI(self.search_settings)
        try:
            # the search service's own rules: its limits, its defaults (few-shot from the policy's card, step tokens)
            overrides = SearchOverrides(**spec.search_settings) if spec.search_settings else None
            config = await api.config_for(preset.format.value, preset.simulations, overrides)
            problems = [ProblemIn(question=p.question, answer=p.answer, id=p.id) for p in spec.problems]
            # the idempotency key makes a resumed driver find the batch it had created, not queue a second one
            batch_id, _ = await api.create_batch(problems, config, request_id=f"round-{self.record.id}-{round_number}")
            self.record.entry(round_number, "search").outputs = {"batch_id": batch_id}  # followed from the start
            self.save()
            while True:
                batch = await api.batch_record(batch_id)
                if batch.done:
                    break
                if self.store.cancel_requested(self.record.id):
                    for search in await api.store.get_many(await api.store.batch_ids(batch_id)):
                        if not search.status.final:
                            await api.cancel(search.id)
                    raise RoundCancelled
                await asyncio.sleep(1.0)
            records = await api.store.get_many(await api.store.batch_ids(batch_id))
        except APIError as exc:
            raise StageFailed(f"the search service refused the batch: {exc}") from exc
        finally:
            await api.close()
        succeeded = [s for s in records if s.status.value == "succeeded"]
        if not succeeded:
            raise StageFailed(f"no search of batch {batch_id} succeeded ({self._counts(batch.counts)})")
        versions: dict[str, set[str]] = {"policy": set(), "value": set()}
        for search in succeeded:
            versions["policy"].update(search.model_versions.policy)
            versions["value"].update(search.model_versions.value)
        return {
            "batch_id": batch_id,
            "format": config.format.value,
            "simulations": config.simulations,
            "counts": self._counts(batch.counts),
            "accuracy": batch.accuracy,
            "stats": batch.stats.model_dump(mode="json") if batch.stats is not None else None,
            "model_versions": {k: sorted(v) for k, v in versions.items()},
        }

    @staticmethod
    def _counts(counts: dict[Any, int]) -> dict[str, int]:
        return {getattr(k, "value", str(k)): v for k, v in counts.items()}

    def stage_export(self, round_number: int) -> dict[str, Any]:
        return asyncio.run(self._export(round_number))

    async def _export(self, round_number: int) -> dict[str, Any]:
        """The batch's datasets, the rows ``GET /v1/batches/{id}/exports/{name}`` streams, written for training."""
        from cpl.pairs import DATASETS
        from services.common.redis_client import redis_client
        from services.search.keys import Keys
        from services.search.store import SearchStore

        batch_id = self.record.entry(round_number, "search").outputs["batch_id"]
        client = redis_client(self.search_settings.redis_url, attempts=5)
        s = self.search_settings
        store = SearchStore(client, Keys(s.key_prefix), retention_s=s.retention_s, events_max=s.events_max)
        lines: dict[str, list[str]] = {name: [] for name in EXPORTS}
        try:
            for search in await store.get_many(await store.batch_ids(batch_id)):
                tree = await store.load_tree(search.id) if search.status.value == "succeeded" else None
                if tree is None:
                    continue
                for name in EXPORTS:
                    lines[name] += [item.model_dump_json() + "\n" for item in DATASETS[name](tree)]
        finally:
            await client.aclose()
        out = self.dir / f"round{round_number}"
        out.mkdir(parents=True, exist_ok=True)
        files, rows = {}, {}
        for name, chunk in lines.items():
            path = out / f"{name}.jsonl"
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(chunk))
            tmp.replace(path)
            files[name], rows[name] = str(path), len(chunk)
        return {"batch_id": batch_id, "dir": str(out), "files": files, "rows": rows}

    # --- trainings -----------------------------------------------------------------------------------------

    def _checkpoint(self, round_number: int, stage: str) -> str | None:
        try:
            entry = self.record.entry(round_number, stage)
        except KeyError:
            return None
        return entry.outputs.get("checkpoint") if entry.status == "done" else None

    def _start_model(self, round_number: int, start: str) -> str:
        if start == "base":
            return "base"
        if start.startswith("stage:"):
            return self._checkpoint(round_number, start.removeprefix("stage:")) or "base"
        if start == "previous:value":
            return self._checkpoint(round_number - 1, "value") or "base"
        raise ValueError(f"unknown start {start!r}")

    def _train(self, round_number: int, stage: str) -> dict[str, Any] | str:
        from services.trainer.api import ROW_TYPES
        from services.trainer.tasks import LeaseHeld, run_training_record

        step = next(s for s in training_steps(round_number, self.record.spec.baselines) if s.stage == stage)
        files = self.record.entry(round_number, "export").outputs["files"]
        data = [Path(files[name]) for name in step.datasets if Path(files[name]).stat().st_size > 0]
        if not data:
            return f"no {' or '.join(step.datasets)} rows in round {round_number}'s trees"
        try:
            rows, _ = read_rows(data, ROW_TYPES[step.kind])  # type: ignore[index]
        except TrainingInputError as exc:
            raise StageFailed(f"exported data does not fit a {step.kind} training: {exc}") from exc
        training_id = f"{self.record.id}-r{round_number}-{stage.replace('_', '-')}"
        if self.trainings.get(training_id) is None:
            self.trainings.create(
                TrainingRecord(
                    id=training_id,
                    kind=step.kind,  # type: ignore[arg-type]
                    model=self._start_model(round_number, step.start),
                    data=[str(p) for p in data],
                    data_rows=len(rows),
                    name=f"round-{training_id}",
                    overrides=self.record.spec.training.get(step.kind, {}),
                )
            )
        self.record.training_id = training_id
        self.save()
        while True:
            try:
                training = run_training_record(training_id, self.settings)
                break
            except LeaseHeld:
                # a dead driver's training holds its lease until it runs out: then this one resumes it
                self.check_cancel()
                time.sleep(min(5.0, self.settings.training_lease_s / 3))
        if training is None or training.status != "succeeded":
            if training is not None and training.status == "cancelled":
                raise RoundCancelled
            raise StageFailed(
                f"training {training_id} {training.status if training else 'vanished'}: "
                f"{training.error if training else ''}"
            )
        return {
            "training_id": training_id,
            "kind": step.kind,
            "started_from": training.model,
            "checkpoint": training.checkpoint,
            "rows": training.data_rows,
            "metrics": training.metrics,
        }

    def stage_sft(self, round_number: int) -> dict[str, Any] | str:
        return self._train(round_number, "sft")

    def stage_step_apo(self, round_number: int) -> dict[str, Any] | str:
        return self._train(round_number, "step_apo")

    def stage_step_dpo(self, round_number: int) -> dict[str, Any] | str:
        return self._train(round_number, "step_dpo")

    def stage_value(self, round_number: int) -> dict[str, Any] | str:
        return self._train(round_number, "value")

    # --- deployment and evaluation -------------------------------------------------------------------------

    def stage_deploy(self, round_number: int) -> dict[str, Any] | str:
        import redis.asyncio as aioredis

        from services.trainer.deploy import Deployer, DeploymentError, DeploymentRequest, DeploymentTarget

        targets = []
        policy_stage = final_policy_stage(self.record.done(round_number))
        if policy_stage is not None:
            targets.append(DeploymentTarget(service="policy", checkpoint=self._checkpoint(round_number, policy_stage)))
        value = self._checkpoint(round_number, "value")
        if value is not None:
            targets.append(DeploymentTarget(service="value", checkpoint=value))
        if not targets:
            return "the round trained neither a policy nor a value model"

        async def deploy() -> Any:
            client = aioredis.Redis.from_url(self.settings.redis_url)
            try:
                return await Deployer(self.settings, client).deploy(DeploymentRequest(targets=targets))
            finally:
                await client.aclose()

        try:
            deployment = asyncio.run(deploy())
        except DeploymentError as exc:
            raise StageFailed(f"deployment refused: {exc.message}") from exc
        if deployment.status != "succeeded":
            raise StageFailed(f"deployment {deployment.id} failed: {deployment.error}")
        return {
            "deployment_id": deployment.id,
            "policy_from": policy_stage,
            "targets": [t.model_dump() for t in targets],
            "versions": deployment.versions,
        }

    def stage_eval(self, round_number: int) -> dict[str, Any] | str:
        from cpl.evaluation import evaluate
        from cpl.problems import Problem
        from services.policy.evaluation import http_generator

        spec = self.record.spec
        if not spec.eval_problems:
            return "no evaluation problems given"
        fmt = PromptFormat(self.record.entry(round_number, "search").outputs["format"])
        problems = [
            Problem(id=p.id or f"eval-{i}", question=p.question, gold=p.answer)
            for i, p in enumerate(spec.eval_problems)
        ]
        url = self.search_settings.policy_url
        try:
            report = evaluate(
                problems, http_generator(url, fmt), fmt=fmt, few_shot=False, max_tokens=spec.eval_max_tokens
            )
        except Exception as exc:  # the policy service refused or is away: the round says so
            raise StageFailed(f"evaluation through {url} failed: {exc.__class__.__name__}: {exc}") from exc
        deployed = self.record.entry(round_number, "deploy")
        self.record.accuracy[str(round_number)] = report.accuracy
        return {
            "accuracy": report.accuracy,
            "correct": report.correct,
            "total": report.total,
            "format": fmt.value,
            "policy_version": deployed.outputs.get("versions", {}).get("policy"),
            "items": [i.model_dump(mode="json", exclude={"response"}) for i in report.items],
        }


def run_round(round_id: str, settings: TrainerSettings) -> RoundRecord | None:
    """The ``cpl.rounds.run`` task's body: run (or resume) one round under its lease."""
    from services.trainer.tasks import LeaseHeld

    client = redis.Redis.from_url(settings.redis_url)
    try:
        store = RoundStore(client, settings.key_prefix)
        record = store.get(round_id)
        if record is None:
            log.error("round task for an unknown record", extra={"round_id": round_id})
            return None
        if record.status in ROUND_FINAL:
            return record
        if store.cancel_requested(round_id):
            record.status = "cancelled"
            store.save(record)
            return record
        keeper = LeaseKeeper(client, store.lease_key(round_id), settings.training_lease_s)
        if not keeper.acquire():
            raise LeaseHeld(round_id)
        try:
            return RoundDriver(settings, client, record).run()
        except Exception as exc:
            # a bug or an unexpected failure must not leave the round "running" for ever; Redis being away is
            # the exception: the task is retried (the record could not be written anyway)
            if isinstance(exc, redis.RedisError):
                raise
            log.exception("round failed unexpectedly", extra={"round_id": round_id})
            record.status, record.error = "failed", f"{exc.__class__.__name__}: {exc}"
            store.save(record)
            return record
        finally:
            keeper.release()
    finally:
        client.close()
