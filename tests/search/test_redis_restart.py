"""Redis restarts (AOF on): no finished search is lost and a running one continues. The test runs its own
``redis-server --appendonly yes`` on a free port with its own API and worker; the shared Redis is not touched."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cpl.tree import Tree
from services.common.ports import find_free_port
from tests.search.conftest import Proc, Stack, search_env, toy_question, wait_final, wait_until
from tests.search.invariants import check_tree

QUESTION, ANSWER = toy_question(3)


class PrivateRedis:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = find_free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        try:
            wait_until(lambda: _pings(client), 30, "the private redis-server")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_stack(inference, tmp_path: Path) -> Iterator[tuple[Stack, PrivateRedis]]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on the PATH (apt-get install redis-server)")
    server = PrivateRedis(tmp_path)
    server.start()
    policy, value = inference
    env = search_env("cpltest:restart", policy.url, value.url)
    env["CPL_SEARCH_REDIS_URL"] = server.url
    port = find_free_port()
    api = Proc(
        "restart-api",
        [sys.executable, "-m", "services.cli", "serve", "search", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path / "api.log",
        url=f"http://127.0.0.1:{port}",
    )
    worker = Proc("restart-worker", [sys.executable, "-m", "services.cli", "worker"], env, tmp_path / "worker.log")
    stack = Stack("cpltest:restart", env, policy, value, api, worker, tmp_path)
    try:
        api.start()
        worker.start()
        api.wait_http("/ready", timeout=120)
        yield stack, server
    finally:
        worker.stop()
        api.stop()
        server.kill()


def test_redis_restart_keeps_finished_searches_and_running_ones_continue(private_stack):
    stack, server = private_stack
    with stack.client() as client:
        done = client.post("/v1/searches", json={"question": QUESTION, "answer": ANSWER, "simulations": 6}).json()
        finished = wait_final(client, done["id"])
        assert finished["status"] == "succeeded"
        finished_tree = client.get(f"/v1/searches/{done['id']}/tree").content

        running = client.post("/v1/searches", json={"question": QUESTION, "answer": ANSWER, "simulations": 80}).json()
        wait_until(
            lambda: client.get(f"/v1/searches/{running['id']}").json()["progress"]["simulations_done"] >= 3,
            180,
            "the long search to run",
        )
        server.kill()
        time.sleep(2)
        assert client.get("/ready").status_code == 503
        server.start()  # same port, same directory: the AOF is replayed

        wait_until(lambda: client.get("/ready").status_code == 200, 60, "the API to see Redis again")
        again = client.get(f"/v1/searches/{done['id']}")
        assert again.status_code == 200 and again.json()["status"] == "succeeded"
        assert client.get(f"/v1/searches/{done['id']}/tree").content == finished_tree
        final = wait_final(client, running["id"], timeout=300)
        assert final["status"] == "succeeded", final
        tree = Tree.model_validate_json(client.get(f"/v1/searches/{running['id']}/tree").content)
        check_tree(tree)
        assert tree.simulations_done == 80
