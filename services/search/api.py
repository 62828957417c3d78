"""The search API (``cpl serve search``): REST routes over the Redis store, tasks sent to the Celery workers.

Every ``/v1`` route needs ``Authorization: Bearer <key>`` (``CPL_SEARCH_API_KEYS`` or ``_API_KEYS_FILE``): 401
without a key, 403 with a wrong one. Bad input answers 4xx naming what is wrong, and nothing is queued.
docs/search-service.md documents the routes, the records and the Redis keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from redis.exceptions import RedisError
from sse_starlette.sse import EventSourceResponse

from cpl.config import SearchConfig
from cpl.pairs import DATASETS, sft_examples
from cpl.problems import ProblemFileError, load_problems
from cpl.tree import Tree
from services.common.aio import cancel_and_wait
from services.common.app import create_service_app
from services.common.auth import bearer_auth
from services.common.errors import APIError
from services.common.redis_client import redis_client
from services.policy.client import PolicyClient
from services.search.celery_app import TASK_RUN, create_celery
from services.search.dashboard import dashboard_router
from services.search.keys import Keys
from services.search.metrics import SearchMetrics
from services.search.records import table_stats
from services.search.schemas import (
    BatchCancelResult,
    BatchCreate,
    BatchRecord,
    CancelResult,
    ModelVersions,
    ProblemIn,
    Progress,
    SearchCreate,
    SearchOverrides,
    SearchPage,
    SearchRecord,
    SearchStatus,
)
from services.search.settings import SearchSettings
from services.search.store import SearchStore, StoredSearch, search_etag
from services.trainer.api import include_trainer_routes
from services.value.client import ValueClient

log = logging.getLogger(__name__)

FINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})
ExportName = Literal["sft", "plan_pairs", "solution_pairs", "value"]


class SearchAPI:
    """What the routes share: settings, the store, the Celery producer, the inference clients."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Few retries: an API request should fail fast (503) rather than hang while Redis is away.
        self.redis = redis_client(settings.redis_url, attempts=3)
        self.store = SearchStore(
            self.redis, self.keys, retention_s=settings.retention_s, events_max=settings.events_max
        )
        self.celery = create_celery(settings)
        common: dict[str, Any] = {"timeout_s": 10.0, "retries": 0, "api_key": settings.inference_token()}
        self.policy = PolicyClient(settings.policy_url, **common)
        self.value = ValueClient(settings.value_url, **common)
        self._card: tuple[float, dict[str, Any]] | None = None

    async def close(self) -> None:
        await self.policy.aclose()
        await self.value.aclose()
        await self.redis.aclose()

    # --- readiness -----------------------------------------------------------------------------------------

    async def ready(self) -> tuple[bool, str]:
        """Ready only when a search could run now: Redis answers and both inference services are ready."""
        try:
            async with asyncio.timeout(3.0):
                await self.redis.ping()
        except Exception as exc:  # any failure to reach Redis means not ready, whatever its class
            return False, f"redis at {self.settings.redis_url} unreachable: {exc!r}"
        policy_ok, value_ok = await asyncio.gather(self.policy.ready(), self.value.ready())
        if not policy_ok:
            return False, f"policy service at {self.settings.policy_url} not ready"
        if not value_ok:
            return False, f"value service at {self.settings.value_url} not ready"
        return True, "ready"

    # --- settings of a new search ------------------------------------------------------------------------

    async def policy_prompt(self) -> dict[str, Any]:
        """Prompt settings the served policy's card declares (``GET /v1/model`` → ``prompt``), cached 60 s."""
        now = time.monotonic()
        if self._card is not None and now - self._card[0] < 60:
            return self._card[1]
        try:
            info = await self.policy.model_info()
        except Exception as exc:  # the card is optional: without it the service defaults apply
            log.info("policy model info unavailable; prompt defaults apply", extra={"error": str(exc)})
            info = {}
        prompt = info.get("prompt") if isinstance(info, dict) else None
        card = prompt if isinstance(prompt, dict) else {}
        self._card = (now, card)
        return card

    async def config_for(
        self, fmt: str | None, simulations: int | None, overrides: SearchOverrides | None
    ) -> SearchConfig:
        s = self.settings
        sims = simulations if simulations is not None else s.default_simulations
        if not 1 <= sims <= s.max_simulations:
            raise APIError(422, f"simulations must be between 1 and {s.max_simulations} (got {sims})")
        fields: dict[str, Any] = {"simulations": sims}
        if fmt is not None:
            fields["format"] = fmt
        o = overrides.model_dump(exclude_none=True) if overrides is not None else {}
        limits = {
            "root_children": s.max_children,
            "children": s.max_children,
            "max_depth": s.max_depth,
            "max_step_tokens": s.max_step_tokens,
        }
        for name, limit in limits.items():
            if name in o and o[name] > limit:
                raise APIError(422, f"settings.{name} must be at most {limit} (got {o[name]})")
        fields.update(o)
        if "max_step_tokens" not in fields and s.default_max_step_tokens is not None:
            fields["max_step_tokens"] = min(s.default_max_step_tokens, s.max_step_tokens)
        if "few_shot" not in fields:
            if s.few_shot is not None:
                fields["few_shot"] = s.few_shot
            else:
                card = await self.policy_prompt()
                if isinstance(card.get("few_shot"), bool):
                    fields["few_shot"] = card["few_shot"]
        try:
            return SearchConfig.model_validate(fields)
        except ValidationError as exc:
            raise APIError(422, f"invalid search settings: {exc.errors(include_url=False)}") from exc

    def check_problem(self, question: str, answer: str | None, where: str = "") -> None:
        s = self.settings
        if not question.strip():
            raise APIError(422, f"{where}question is empty")
        if len(question) > s.max_question_chars:
            raise APIError(
                422, f"{where}question has {len(question)} characters; at most {s.max_question_chars} are accepted"
            )
        if answer is not None and len(answer) > s.max_answer_chars:
            raise APIError(422, f"{where}answer is longer than {s.max_answer_chars} characters")

    def new_record(
        self,
        question: str,
        answer: str | None,
        config: SearchConfig,
        *,
        created_at: datetime,
        batch_id: str | None = None,
        problem_id: str | None = None,
        request_id: str | None = None,
    ) -> SearchRecord:
        return SearchRecord(
            id=uuid.uuid4().hex,
            status=SearchStatus.QUEUED,
            question=question,
            answer=answer,
            config=config.model_dump(mode="json"),
            progress=Progress(simulations_total=config.simulations),
            model_versions=ModelVersions(),
            batch_id=batch_id,
            problem_id=problem_id,
            request_id=request_id,
            created_at=created_at,
        )

    async def enqueue(self, search_ids: list[str]) -> None:
        def send() -> dict[str, str]:
            with self.celery.producer_or_acquire() as producer:
                return {
                    search_id: self.celery.send_task(TASK_RUN, args=(search_id,), producer=producer).id
                    for search_id in search_ids
                }

        try:
            task_ids = await asyncio.to_thread(send)
        except Exception as exc:  # the broker refused: the searches cannot run, say so
            raise APIError(503, f"could not queue the search: broker unavailable ({exc!r})", retry_after=5) from exc
        await self.store.set_task_ids(task_ids)

    async def cancel(self, search_id: str) -> StoredSearch | None:
        """Cancel through the store; a queued search's task is also revoked (without ``terminate``: a running
        task stops cooperatively, between simulations)."""
        before = await self.store.get(search_id)
        stored = await self.store.request_cancel(search_id)
        if before is not None and before.record.status is SearchStatus.QUEUED:
            task_id = await self.store.task_id(search_id)
            if task_id:
                await asyncio.to_thread(self.celery.control.revoke, task_id)
        return stored

    # --- batches ---------------------------------------------------------------------------------------------

    async def create_batch(
        self,
        problems: list[ProblemIn],
        config: SearchConfig,
        request_id: str | None,
    ) -> tuple[str, bool]:
        s = self.settings
        if not problems:
            raise APIError(422, "the batch has no problems")
        if len(problems) > s.max_batch_problems:
            raise APIError(413, f"the batch has {len(problems)} problems; at most {s.max_batch_problems} are accepted")
        for i, problem in enumerate(problems):
            self.check_problem(problem.question, problem.answer, where=f"problems[{i}]: ")
        batch_id = uuid.uuid4().hex
        if request_id is not None:
            found = await self.store.claim_request("batch", request_id, batch_id)
            if found != batch_id:
                return found, False
        now = datetime.now(UTC)
        await self.store.save_batch(
            batch_id,
            {
                "id": batch_id,
                "total": len(problems),
                "config": config.model_dump(mode="json"),
                "request_id": request_id,
                "created_at": now.isoformat(),
            },
            now,
        )
        ids = []
        for i, problem in enumerate(problems):
            # Distinct creation times keep the index order (and the cursors) exact within a batch.
            record = self.new_record(
                problem.question,
                problem.answer,
                config,
                created_at=now + timedelta(microseconds=i),
                batch_id=batch_id,
                problem_id=problem.id,
            )
            await self.store.create(record)
            ids.append(record.id)
        await self.enqueue(ids)
        return batch_id, True

    async def batch_record(self, batch_id: str) -> BatchRecord:
        data = await self.store.get_batch(batch_id)
        if data is None:
            raise APIError(404, f"no batch {batch_id!r}")
        records = await self.store.get_many(await self.store.batch_ids(batch_id))
        counts = {status: 0 for status in SearchStatus}
        for record in records:
            counts[record.status] += 1
        finished = [r for r in records if r.status is SearchStatus.SUCCEEDED]
        graded = [r for r in finished if r.answer is not None]
        correct = sum(1 for r in graded if r.best is not None and r.best.correct)
        return BatchRecord(
            id=batch_id,
            total=int(data["total"]),
            counts=counts,
            # Every search of the batch exists and is final (not "all of none" while the batch is being created).
            done=len(records) == int(data["total"]) and all(r.status.final for r in records),
            accuracy=correct / len(graded) if graded else None,
            graded=len(graded),
            stats=table_stats(finished),
            config=data["config"],
            request_id=data.get("request_id"),
            created_at=datetime.fromisoformat(data["created_at"]),
        )


def _search_response(stored: StoredSearch, status_code: int = 200, location: bool = False) -> JSONResponse:
    headers = {"ETag": stored.etag, "Cache-Control": "no-cache"}
    if location:
        headers["Location"] = f"/v1/searches/{stored.record.id}"
    return JSONResponse(stored.record.model_dump(mode="json"), status_code=status_code, headers=headers)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    return if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]


def _read_upload(data: bytes, filename: str, limit: int) -> list[ProblemIn]:
    with tempfile.TemporaryDirectory(prefix="cpl-upload-") as tmp:
        path = Path(tmp) / "upload.jsonl"
        path.write_bytes(data)
        try:
            problems = load_problems(path, limit=limit + 1)
        except ProblemFileError as exc:
            raise APIError(422, str(exc).replace(str(path), filename)) from exc
        except UnicodeDecodeError as exc:
            raise APIError(422, f"{filename}: not UTF-8 text ({exc.reason})") from exc
    return [ProblemIn(question=p.question, answer=p.gold, id=p.id) for p in problems]


def create_search_app(settings: SearchSettings | None = None) -> FastAPI:
    settings = settings or SearchSettings()
    api = SearchAPI(settings)
    metrics = SearchMetrics(api.store, api.keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        refresher = asyncio.create_task(metrics.refresh_forever())
        try:
            yield
        finally:
            await cancel_and_wait(refresher)
            await api.close()

    app = create_service_app(
        title="CPL search service",
        description="Plan-tree searches (MCTS over plan steps) run by Celery workers; docs/search-service.md.",
        metrics=metrics,
        ready=api.ready,
        lifespan=lifespan,
        retry_after_s=5,
    )
    app.state.api = api

    @app.exception_handler(RedisError)
    async def _store_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("redis error", extra={"error": repr(exc), "path": request.url.path})
        return JSONResponse(
            {"detail": f"search store (redis) unavailable: {exc.__class__.__name__}; retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    auth = bearer_auth(settings.resolved_api_keys, "search API")
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.post(
        "/searches",
        status_code=202,
        response_model=SearchRecord,
        responses={401: {}, 403: {}, 422: {}},
        tags=["searches"],
    )
    async def create_search(body: SearchCreate) -> JSONResponse:
        """Queue one search. 202 with the search and its ``Location``; the same ``request_id`` answers the same
        search and queues nothing."""
        api.check_problem(body.question, body.answer)
        if body.answer is not None and len(body.answer) > settings.max_answer_chars:
            raise APIError(422, f"answer is longer than {settings.max_answer_chars} characters")
        config = await api.config_for(body.format, body.simulations, body.settings)
        record = api.new_record(
            body.question, body.answer, config, created_at=datetime.now(UTC), request_id=body.request_id
        )
        request_key = api.keys.request("search", body.request_id) if body.request_id else None
        search_id, created = await api.store.create(record, request_key)
        if created:
            await api.enqueue([search_id])
            metrics.created.inc()
        stored = await api.store.get(search_id)
        if stored is None:
            raise APIError(404, f"search {search_id} of request_id {body.request_id!r} has expired")
        return _search_response(stored, 202, location=True)

    @v1.get("/searches", response_model=SearchPage, tags=["searches"])
    async def list_searches(
        status: Annotated[SearchStatus | None, Query(description="only searches with this status")] = None,
        batch_id: Annotated[str | None, Query(max_length=200, description="only this batch's searches")] = None,
        cursor: Annotated[str | None, Query(max_length=40, description="next_cursor of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, description="page size (at most CPL_SEARCH_PAGE_SIZE_MAX)")] = 50,
    ) -> SearchPage:
        """Searches, newest first, one page at a time."""
        if limit > settings.page_size_max:
            raise APIError(422, f"limit must be at most {settings.page_size_max}")
        position = None
        if cursor is not None:
            try:
                position = int(cursor)
            except ValueError as exc:
                raise APIError(422, f"cursor {cursor!r} is not one this API gave out") from exc
        searches, next_position = await api.store.page(status=status, batch_id=batch_id, cursor=position, limit=limit)
        return SearchPage(searches=searches, next_cursor=None if next_position is None else str(next_position))

    async def _get(search_id: str) -> StoredSearch:
        stored = await api.store.get(search_id) if len(search_id) <= 200 else None
        if stored is None:
            raise APIError(404, f"no search {search_id!r}")
        return stored

    @v1.get(
        "/searches/{search_id}",
        response_model=SearchRecord,
        responses={304: {"description": "not modified since the ETag given in If-None-Match"}, 404: {}},
        tags=["searches"],
    )
    async def get_search(
        search_id: str, if_none_match: Annotated[str | None, Header(max_length=400)] = None
    ) -> Response:
        """The search. A strong ``ETag``; ``If-None-Match`` with it answers 304 while nothing changed."""
        if if_none_match and len(search_id) <= 200:
            # A poller's usual case: the version counter alone decides, no record is read or parsed.
            version = await api.store.version(search_id)
            if version is not None and _etag_matches(if_none_match, search_etag(search_id, version)):
                return Response(status_code=304, headers={"ETag": search_etag(search_id, version)})
        stored = await _get(search_id)
        if _etag_matches(if_none_match, stored.etag):
            return Response(status_code=304, headers={"ETag": stored.etag})
        return _search_response(stored)

    @v1.get(
        "/searches/{search_id}/tree",
        responses={200: {"description": "the tree (cpl.tree.Tree JSON, as `cpl search` writes it)"}, 404: {}},
        tags=["searches"],
    )
    async def get_tree(search_id: str) -> Response:
        """The tree in the schema ``cpl search`` writes, live while the search runs (the last snapshot)."""
        stored = await _get(search_id)
        raw = await api.store.tree_json(search_id)
        if raw is None:  # not started yet: the root alone
            record = stored.record
            config = SearchConfig.model_validate(record.config)
            raw = Tree.new(search_id, record.question, record.answer, config).model_dump_json().encode()
        return Response(raw, media_type="application/json", headers={"Cache-Control": "no-cache"})

    @v1.get(
        "/searches/{search_id}/events",
        responses={200: {"description": "text/event-stream of progress events"}, 404: {}},
        tags=["searches"],
    )
    async def events(
        search_id: str,
        request: Request,
        last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> EventSourceResponse:
        """Server-sent events (``running``, ``progress``, ``slice``, ``cancelling``, then ``succeeded``,
        ``failed`` or ``cancelled``); reconnect with ``Last-Event-ID`` to resume after the last one seen."""
        await _get(search_id)
        start = last_event_id or "0"
        if start != "0" and not _valid_stream_id(start):
            raise APIError(422, f"Last-Event-ID {start!r} is not an event id of this stream")

        async def stream() -> AsyncIterator[dict[str, str]]:
            after = start
            while True:
                if await request.is_disconnected():
                    return
                batch = await api.store.read_events(search_id, after, block_ms=5000)
                for event_id, kind, data in batch:
                    after = event_id
                    yield {"id": event_id, "event": kind, "data": data}
                    if kind in FINAL_EVENTS:
                        return
                if not batch:
                    stored = await api.store.get(search_id)
                    if stored is None or stored.record.status.final:
                        return

        return EventSourceResponse(stream(), ping=15)

    @v1.post("/searches/{search_id}/cancel", response_model=CancelResult, responses={404: {}}, tags=["searches"])
    async def cancel_search(search_id: str) -> CancelResult:
        """Stop a search (idempotent): a queued one at once, a running one before its next simulation, keeping
        its partial tree. A final search stays as it is."""
        await _get(search_id)
        stored = await api.cancel(search_id)
        if stored is None:
            raise APIError(404, f"no search {search_id!r}")
        return CancelResult(id=search_id, status=stored.record.status)

    @v1.post("/batches", status_code=202, response_model=BatchRecord, responses={413: {}, 422: {}}, tags=["batches"])
    async def create_batch(body: BatchCreate) -> JSONResponse:
        """Queue one search per problem (JSON). 202 with the batch and its ``Location``."""
        if len(body.problems) > settings.max_batch_problems:
            raise APIError(
                413, f"the batch has {len(body.problems)} problems; at most {settings.max_batch_problems} are accepted"
            )
        config = await api.config_for(body.format, body.simulations, body.settings)
        batch_id, _ = await api.create_batch(body.problems, config, body.request_id)
        return _batch_response(await api.batch_record(batch_id))

    @v1.post(
        "/batches/upload",
        status_code=202,
        response_model=BatchRecord,
        responses={413: {}, 422: {}},
        tags=["batches"],
    )
    async def upload_batch(
        file: Annotated[UploadFile, File(description="JSONL: GSM8K rows (question, answer) or MATH rows")],
        format: Annotated[Literal["plain", "xml"] | None, Form()] = None,
        simulations: Annotated[int | None, Form(ge=1)] = None,
        settings_json: Annotated[
            str | None, Form(alias="settings", max_length=4000, description="search settings as JSON")
        ] = None,
        request_id: Annotated[str | None, Form(min_length=1, max_length=200)] = None,
    ) -> JSONResponse:
        """Queue one search per row of an uploaded JSONL file in GSM8K or MATH format."""
        data = await file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise APIError(413, f"the upload is larger than {settings.max_upload_bytes} bytes")
        overrides = None
        if settings_json:
            try:
                overrides = SearchOverrides.model_validate_json(settings_json)
            except ValidationError as exc:
                raise APIError(422, f"settings: {exc.errors(include_url=False)}") from exc
        config = await api.config_for(format, simulations, overrides)
        name = (file.filename or "upload.jsonl")[:200]
        problems = await asyncio.to_thread(_read_upload, data, name, settings.max_batch_problems)
        if not problems:
            raise APIError(422, f"{name}: no problems in the file")
        batch_id, _ = await api.create_batch(problems, config, request_id)
        return _batch_response(await api.batch_record(batch_id))

    @v1.get("/batches/{batch_id}", response_model=BatchRecord, responses={404: {}}, tags=["batches"])
    async def get_batch(batch_id: str) -> BatchRecord:
        """Counts by status, accuracy so far, and Table 1 statistics over the finished trees."""
        return await api.batch_record(batch_id)

    @v1.post("/batches/{batch_id}/cancel", response_model=BatchCancelResult, responses={404: {}}, tags=["batches"])
    async def cancel_batch(batch_id: str) -> BatchCancelResult:
        """Stop every search of the batch that is not final yet (idempotent)."""
        if await api.store.get_batch(batch_id) is None:
            raise APIError(404, f"no batch {batch_id!r}")
        cancelled = 0
        for record in await api.store.get_many(await api.store.batch_ids(batch_id)):
            if not record.status.final:
                await api.cancel(record.id)
                cancelled += 1
        return BatchCancelResult(id=batch_id, cancelled=cancelled)

    @v1.get(
        "/batches/{batch_id}/exports/{name}",
        responses={200: {"description": "JSONL rows (docs/data-formats.md)"}, 404: {}},
        tags=["batches"],
    )
    async def export(batch_id: str, name: ExportName) -> StreamingResponse:
        """The batch's finished trees as one dataset, streamed as JSONL: the rows library mode writes."""
        if await api.store.get_batch(batch_id) is None:
            raise APIError(404, f"no batch {batch_id!r}")
        ids = await api.store.batch_ids(batch_id)

        async def rows() -> AsyncIterator[bytes]:
            for record in await api.store.get_many(ids):
                if record.status is not SearchStatus.SUCCEEDED:
                    continue
                tree = await api.store.load_tree(record.id)
                if tree is None:
                    continue
                items = sft_examples(tree) if name == "sft" else DATASETS[name](tree)
                chunk = "".join(item.model_dump_json() + "\n" for item in items)
                if chunk:
                    yield chunk.encode()

        return StreamingResponse(
            rows(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{batch_id}-{name}.jsonl"'},
        )

    app.include_router(v1)
    # trainings, deployments and rounds (services/trainer), when CPL_TRAINER_CHECKPOINT_ROOT is set
    include_trainer_routes(app, api.celery)
    app.include_router(dashboard_router())  # the dashboard at / (services/search/dashboard)
    return app


def _batch_response(batch: BatchRecord) -> JSONResponse:
    return JSONResponse(batch.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/batches/{batch.id}"})


def _valid_stream_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and (seq == "" or seq.isdigit())
