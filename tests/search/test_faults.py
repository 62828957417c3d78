"""Faults, each with the real process killed: a worker SIGKILLed mid-search, the same task delivered twice at
once, the policy service stopped mid-search."""

from __future__ import annotations

import time

from cpl.tree import Tree
from services.search.celery_app import TASK_RUN, create_celery
from services.search.settings import SearchSettings
from tests.search.conftest import Stack, toy_question, wait_final, wait_until
from tests.search.invariants import check_tree

QUESTION, ANSWER = toy_question(2)


def _events(stack: Stack, search_id: str) -> list[tuple[str, dict[bytes, bytes]]]:
    r = stack.redis()
    try:
        return [(eid.decode(), fields) for eid, fields in r.xrange(f"{stack.prefix}:events:{search_id}")]
    finally:
        r.close()


def _settings(stack: Stack) -> SearchSettings:
    """The stack's broker settings (what a Celery producer needs to reach the same queue)."""
    env = stack.env
    return SearchSettings(
        redis_url=env["CPL_SEARCH_REDIS_URL"],
        key_prefix=env["CPL_SEARCH_KEY_PREFIX"],
        slice_seconds=float(env["CPL_SEARCH_SLICE_SECONDS"]),
        visibility_timeout_s=int(env["CPL_SEARCH_VISIBILITY_TIMEOUT_S"]),
        lease_ms=int(env["CPL_SEARCH_LEASE_MS"]),
    )


def test_worker_killed_mid_search_resumes_on_a_new_worker(stack: Stack):
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "answer": ANSWER, "simulations": 120}).json()
        search_id = created["id"]
        wait_until(
            lambda: client.get(f"/v1/searches/{search_id}").json()["progress"]["simulations_done"] >= 5,
            180,
            "the search to make progress",
        )
        stack.worker.kill()
        killed_at = client.get(f"/v1/searches/{search_id}").json()
        stack.worker.start()
        assert killed_at["status"] == "running", killed_at
        final = wait_final(client, search_id, timeout=300)
        assert final["status"] == "succeeded", final
        tree = Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content)
        check_tree(tree)  # no duplicated nodes, one parent each
        assert tree.simulations_done == tree.root.N == 120  # simulations counted once
        assert final["attempts"] >= 2
        listed = client.get("/v1/searches", params={"limit": 200}).json()["searches"]
        assert [s["id"] for s in listed].count(search_id) == 1
    r = stack.redis()
    try:
        assert r.exists(f"{stack.prefix}:tree:{search_id}") == 1
        assert r.exists(f"{stack.prefix}:lease:{search_id}") == 0
    finally:
        r.close()
    running = [f for _, f in _events(stack, search_id) if f[b"type"] == b"running"]
    assert len(running) >= 2  # the search was claimed again after the kill


def test_the_same_task_delivered_twice_at_once_builds_one_tree(stack: Stack):
    celery = create_celery(_settings(stack))
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "answer": ANSWER, "simulations": 40}).json()
        search_id = created["id"]
        for _ in range(2):  # two more deliveries of the same task, while the first one starts
            celery.send_task(TASK_RUN, args=(search_id,))
        final = wait_final(client, search_id, timeout=300)
        assert final["status"] == "succeeded"
        tree = Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content)
        check_tree(tree)
        assert tree.simulations_done == tree.root.N == 40
        time.sleep(2)  # the spare deliveries find the search final and leave it as it is
        assert Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content) == tree
        assert client.get(f"/v1/searches/{search_id}").json()["status"] == "succeeded"
    # Every running event comes from a new claim with a higher fencing token.
    attempts = [
        int(f[b"data"].split(b'"attempt": ')[1].split(b",")[0])
        for _, f in _events(stack, search_id)
        if f[b"type"] == b"running"
    ]
    assert attempts == sorted(set(attempts))
    assert "held by another worker" in stack.worker.tail(400) or '"outcome": "final"' in stack.worker.tail(400)


def test_policy_stopped_mid_search_fails_naming_it_then_searches_go_on(stack: Stack):
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "simulations": 500}).json()
        search_id = created["id"]
        wait_until(
            lambda: client.get(f"/v1/searches/{search_id}").json()["progress"]["simulations_done"] >= 3,
            180,
            "the search to make progress",
        )
        stack.policy.kill()  # the gateway and its vLLM child die at once
        try:
            final = wait_final(client, search_id, timeout=120)
            ready = client.get("/ready")
        finally:
            stack.policy.start()
        assert final["status"] == "failed", final
        assert final["error"]["code"] == "policy_service_failed"
        assert "policy service at " + stack.policy.url in final["error"]["message"]
        assert "gave up after" in final["error"]["message"]
        assert ready.status_code == 503 and "policy" in ready.json()["status"]
        tree = Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content)
        assert tree.simulations_done >= 3  # the partial tree is kept
        stack.policy.wait_http("/ready")
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "the search API to be ready again")
        after = client.post("/v1/searches", json={"question": QUESTION, "simulations": 4}).json()
        assert wait_final(client, after["id"])["status"] == "succeeded"
