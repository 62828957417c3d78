"""The deployment coordinator: one published checkpoint into every replica of a service, all or nothing.

A deployment names one checkpoint per service (policy, value or both). In order:

1. the checkpoints must be published, and of the kind the service serves (a value checkpoint is not a policy);
2. a Redis lock per service (one deployment per service at a time; a second one is refused, not queued);
3. the expected probe answers are computed from the checkpoint with transformers;
4. every replica of every targeted service must be ready, and its current version and checkpoint are recorded
   -- a replica that is down fails the deployment here, before anything is touched;
5. replica by replica: swap (the gateway drains its in-flight requests and holds new ones at its gate, so no
   request fails), then verify -- ``GET /v1/model`` reports the new version and the probe answers as the
   checkpoint does in transformers;
6. on the first failure every replica already swapped (the failing one included, if its swap went through) is
   swapped back to its previous checkpoint and version, newest first, and the deployment is marked failed.

Every step is written to the deployment's record in Redis, so the API can show it while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, model_validator
from redis.exceptions import LockError

from services.trainer.checkpoints import NAME_RE, CheckpointNameError, CheckpointStore
from services.trainer.probe import PolicyProbe, ValueProbe, policy_probe, value_probe
from services.trainer.replicas import ReplicaClient, ServiceError, resolve_replicas
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

ServiceName = Literal["policy", "value"]
DeploymentStatus = Literal["running", "succeeded", "failed"]
ReplicaStatus = Literal["pending", "swapped", "verified", "failed", "rolled_back", "rollback_failed"]


class DeploymentError(Exception):
    """A deployment refused before it started: ``status`` is the HTTP status (404, 409, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DeploymentTarget(BaseModel):
    service: ServiceName
    checkpoint: str = Field(pattern=NAME_RE.pattern, description="name of a published checkpoint")


class DeploymentRequest(BaseModel):
    targets: list[DeploymentTarget] = Field(min_length=1, max_length=2)
    version: str | None = Field(
        default=None, max_length=128, description="version label the replicas report (default: checkpoint name)"
    )

    @model_validator(mode="after")
    def _one_target_per_service(self) -> DeploymentRequest:
        services = [t.service for t in self.targets]
        if len(set(services)) != len(services):
            raise ValueError(f"one checkpoint per service, got {services}")
        return self

    def version_of(self, target: DeploymentTarget) -> str:
        return self.version or target.checkpoint


class ReplicaOutcome(BaseModel):
    service: ServiceName
    url: str
    previous_version: str | None = None
    previous_checkpoint: str | None = None
    status: ReplicaStatus = "pending"
    error: str | None = None
    swap_started_at: str | None = Field(default=None, description="when its swap was sent (ISO 8601, UTC)")
    swap_seconds: float | None = None


class Deployment(BaseModel):
    """The record of one deployment, as stored in Redis and returned by the API."""

    id: str
    status: DeploymentStatus = "running"
    targets: list[DeploymentTarget]
    versions: dict[str, str] = Field(default_factory=dict, description="service -> version label deployed")
    replicas: list[ReplicaOutcome] = Field(default_factory=list)
    error: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    finished_at: str | None = None


class DeploymentStore:
    """Deployment records in Redis: ``{prefix}deployment:{id}`` (JSON) and ``{prefix}deployments`` (by time)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, deployment_id: str) -> str:
        return f"{self.prefix}deployment:{deployment_id}"

    async def save(self, deployment: Deployment) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(deployment.id), deployment.model_dump_json())
            pipe.zadd(f"{self.prefix}deployments", {deployment.id: time.time()}, nx=True)
            await pipe.execute()

    async def get(self, deployment_id: str) -> Deployment | None:
        raw = await self.redis.get(self.key(deployment_id))
        return None if raw is None else Deployment.model_validate_json(raw)

    async def list(self, limit: int = 50) -> list[Deployment]:
        ids = await self.redis.zrevrange(f"{self.prefix}deployments", 0, limit - 1)
        found = [await self.get(i.decode() if isinstance(i, bytes) else i) for i in ids]
        return [d for d in found if d is not None]


class Deployer:
    def __init__(self, settings: TrainerSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.checkpoints = CheckpointStore(settings.checkpoint_root)
        self.store = DeploymentStore(redis, settings.key_prefix)

    def replica_entries(self, service: ServiceName) -> list[str]:
        return self.settings.policy_replicas if service == "policy" else self.settings.value_replicas

    def check(self, request: DeploymentRequest) -> dict[str, Path]:
        """The checkpoint directory of each target; 404/422 for unknown or unfit checkpoints."""
        paths: dict[str, Path] = {}
        for target in request.targets:
            try:
                manifest = self.checkpoints.manifest(target.checkpoint)
            except CheckpointNameError as exc:
                raise DeploymentError(exc.status, exc.message) from exc
            if manifest.model_type != target.service:
                raise DeploymentError(
                    422,
                    f"checkpoint {target.checkpoint!r} is a {manifest.model_type} model; "
                    f"the {target.service} service cannot serve it",
                )
            if not self.replica_entries(target.service):
                raise DeploymentError(
                    422, f"no {target.service} replicas configured (CPL_TRAINER_{target.service.upper()}_REPLICAS)"
                )
            paths[target.service] = self.checkpoints.published(target.checkpoint)
        return paths

    async def deploy(self, request: DeploymentRequest, deployment_id: str | None = None) -> Deployment:
        """Run a deployment to its end (succeeded or failed); raises :class:`DeploymentError` when refused."""
        deployment, locks, paths = await self.begin(request, deployment_id)
        await self.run(request, deployment, locks, paths)
        return deployment

    async def begin(
        self, request: DeploymentRequest, deployment_id: str | None = None
    ) -> tuple[Deployment, list[Any], dict[str, Path]]:
        """Check the request, take the services' locks and record the deployment as running."""
        paths = self.check(request)
        locks: list[Any] = []
        try:
            for service in sorted(paths):
                lock = self.redis.lock(
                    f"{self.settings.key_prefix}deploy-lock:{service}",
                    timeout=self.settings.deploy_lock_ttl_s,
                    thread_local=False,
                )
                if not await lock.acquire(blocking=False):
                    raise DeploymentError(409, f"a deployment to the {service} service is already running")
                locks.append(lock)
            deployment = Deployment(
                id=deployment_id or uuid.uuid4().hex,
                targets=request.targets,
                versions={t.service: request.version_of(t) for t in request.targets},
            )
            await self.store.save(deployment)
        except BaseException:
            await self._release(locks)
            raise
        return deployment, locks, paths

    async def run(
        self, request: DeploymentRequest, deployment: Deployment, locks: list[Any], paths: dict[str, Path]
    ) -> None:
        """Swap, verify, roll back on failure (:meth:`begin` first); releases the locks at the end."""
        try:
            await self._run(request, deployment, paths)
        except Exception as exc:
            log.exception("deployment crashed", extra={"deployment_id": deployment.id})
            await self._fail(deployment, f"deployment crashed: {exc.__class__.__name__}: {exc}")
        finally:
            await self._release(locks)

    @staticmethod
    async def _release(locks: list[Any]) -> None:
        for lock in locks:
            try:
                await lock.release()
            except LockError:
                log.warning("deployment lock had expired before its release")

    async def _run(self, request: DeploymentRequest, deployment: Deployment, paths: dict[str, Path]) -> None:
        token = self.settings.resolved_admin_token()
        clients: dict[str, ReplicaClient] = {}
        try:
            # 3. what a correct replica answers
            probes: dict[str, PolicyProbe | ValueProbe] = {}
            for service, path in paths.items():
                if service == "policy":
                    probes[service] = await asyncio.to_thread(policy_probe, path, self.settings.probe_max_tokens)
                else:
                    probes[service] = await asyncio.to_thread(value_probe, path)
            # 4. every replica ready, before anything is touched
            for target in request.targets:
                try:
                    urls = await resolve_replicas(self.replica_entries(target.service))
                except ValueError as exc:
                    return await self._fail(deployment, f"{target.service} replicas: {exc}")
                for url in urls:
                    deployment.replicas.append(ReplicaOutcome(service=target.service, url=url))
                    clients[url] = ReplicaClient(
                        url,
                        target.service,
                        admin_token=token,
                        timeout_s=self.settings.swap_timeout_s,
                        retries=self.settings.replica_retries,
                        max_connections=4,
                    )
            for outcome in deployment.replicas:
                client = clients[outcome.url]
                try:
                    await client.check_ready()
                    info = await client.model_info()
                except ServiceError as exc:
                    outcome.status, outcome.error = "failed", str(exc)
                    return await self._fail(deployment, f"{outcome.service} {exc}; nothing was changed on any replica")
                outcome.previous_version, outcome.previous_checkpoint = info["version"], info["checkpoint"]
            await self.store.save(deployment)
            # 5. one replica at a time
            for target in request.targets:
                version = request.version_of(target)
                for outcome in [o for o in deployment.replicas if o.service == target.service]:
                    client = clients[outcome.url]
                    try:
                        outcome.swap_started_at = datetime.now(UTC).isoformat()
                        started = time.perf_counter()
                        await client.swap_checkpoint(target.checkpoint, version)
                        outcome.status = "swapped"
                        outcome.swap_seconds = round(time.perf_counter() - started, 3)
                        await self._verify(client, target.service, version, probes[target.service])
                        outcome.status = "verified"
                    except ServiceError as exc:
                        outcome.error = str(exc)
                        if outcome.status == "pending":
                            outcome.status = "failed"
                        await self._rollback(deployment, clients)
                        return await self._fail(deployment, str(exc))
                    finally:
                        await self.store.save(deployment)
                    log.info("replica swapped", extra={"url": outcome.url, "version": version})
            deployment.status = "succeeded"
            deployment.finished_at = datetime.now(UTC).isoformat()
            await self.store.save(deployment)
        finally:
            for client in clients.values():
                await client.aclose()

    async def _verify(self, client: ReplicaClient, service: str, version: str, probe: PolicyProbe | ValueProbe) -> None:
        info = await client.model_info()
        if info["version"] != version:
            raise ServiceError(
                client.service, client.base_url, f"reports version {info['version']!r} after the swap, not {version!r}"
            )
        if isinstance(probe, PolicyProbe):
            got = await client.greedy_tokens(info["served_model_name"], probe.prompt_ids, len(probe.expected))
            if got != probe.expected:
                raise ServiceError(
                    client.service,
                    client.base_url,
                    f"greedy probe answered {got}, the checkpoint in transformers {probe.expected}",
                )
        else:
            got_values = await client.values(probe.states)
            worst = max(abs(a - b) for a, b in zip(got_values, probe.expected, strict=True))
            if not math.isfinite(worst) or worst > self.settings.probe_value_tolerance:
                raise ServiceError(
                    client.service,
                    client.base_url,
                    f"value probe answered {got_values}, the checkpoint in transformers {probe.expected}",
                )

    async def _rollback(self, deployment: Deployment, clients: dict[str, ReplicaClient]) -> None:
        """Swap every replica that took the new checkpoint back to its previous one, newest first."""
        for outcome in reversed(deployment.replicas):
            if outcome.previous_checkpoint is None or outcome.previous_version is None:
                continue
            client = clients[outcome.url]
            if outcome.status == "failed":
                # the swap call failed, but it may have gone through (e.g. the answer was lost): ask the replica
                try:
                    if (await client.model_info())["version"] == outcome.previous_version:
                        continue
                except ServiceError:
                    continue
            elif outcome.status not in ("swapped", "verified"):
                continue
            try:
                await client.swap_checkpoint(outcome.previous_checkpoint, outcome.previous_version)
                info = await client.model_info()
                if info["version"] != outcome.previous_version:
                    raise ServiceError(
                        client.service, client.base_url, f"reports {info['version']!r} after the rollback"
                    )
                outcome.status = "rolled_back"
            except ServiceError as exc:
                outcome.status = "rollback_failed"
                outcome.error = f"{outcome.error or ''}; rollback: {exc}".lstrip("; ")
                log.error("rollback failed", extra={"url": outcome.url, "error": str(exc)})
            await self.store.save(deployment)

    async def _fail(self, deployment: Deployment, message: str) -> None:
        deployment.status = "failed"
        deployment.error = message
        deployment.finished_at = datetime.now(UTC).isoformat()
        await self.store.save(deployment)
        log.warning("deployment failed", extra={"deployment_id": deployment.id, "error": message})
