"""The search API end to end: a real worker process builds trees against the real policy and value services."""

from __future__ import annotations

import json
import time

import httpx

from cpl.tree import Tree
from tests.search.conftest import Stack, toy_question, wait_final, wait_until
from tests.search.invariants import check_tree

QUESTION, ANSWER = toy_question(1)


def test_one_search_runs_to_a_tree_that_satisfies_the_invariants(stack: Stack):
    with stack.client() as client:
        response = client.post("/v1/searches", json={"question": QUESTION, "answer": ANSWER, "simulations": 12})
        assert response.status_code == 202, response.text
        body = response.json()
        assert response.headers["location"] == f"/v1/searches/{body['id']}"
        assert body["status"] in ("queued", "running") and body["progress"]["simulations_total"] == 12
        assert body["config"]["few_shot"] is False
        final = wait_final(client, body["id"])
        assert final["status"] == "succeeded", final
        assert final["progress"]["simulations_done"] == 12 and final["started_at"] and final["finished_at"]
        tree = Tree.model_validate_json(client.get(f"/v1/searches/{body['id']}/tree").content)
        assert len(tree.nodes) > 1, tree.model_dump_json()[:3000]
        assert final["model_versions"]["policy"] == ["policy-v1"] and final["model_versions"]["value"] == ["value-v1"]
        assert final["snapshot_bytes"] > 0
        check_tree(tree)
        assert tree.simulations_done == 12 and tree.gold == ANSWER and tree.question == QUESTION
        assert final["progress"]["nodes"] == len(tree.nodes) > 1
        assert final["root_value"] == tree.root.V
        if final["best"] is not None:
            node = tree.nodes[final["best"]["node_id"]]
            assert node.kind.value == "solution" and final["best"]["value"] == node.V


def test_request_id_makes_creation_idempotent(stack: Stack):
    with stack.client() as client:
        body = {"question": "Ben has 12 coins and gives away 5. How many coins are left?", "request_id": "r-1"}
        first = client.post("/v1/searches", json={**body, "simulations": 3})
        second = client.post("/v1/searches", json={**body, "simulations": 3})
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        listed = client.get("/v1/searches", params={"limit": 200}).json()["searches"]
        assert [s["id"] for s in listed].count(first.json()["id"]) == 1
        assert sum(1 for s in listed if s["request_id"] == "r-1") == 1
        wait_final(client, first.json()["id"])


def test_etag_and_304(stack: Stack):
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "simulations": 2}).json()
        final = wait_final(client, created["id"])
        assert final["status"] == "succeeded"
        first = client.get(f"/v1/searches/{created['id']}")
        etag = first.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/")
        again = client.get(f"/v1/searches/{created['id']}", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        other = client.get(f"/v1/searches/{created['id']}", headers={"If-None-Match": '"stale"'})
        assert other.status_code == 200 and other.json() == first.json()


def test_etag_changes_while_running(stack: Stack):
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "simulations": 40}).json()
        etags = {client.get(f"/v1/searches/{created['id']}").headers["etag"]}
        final = wait_final(client, created["id"])
        etags.add(client.get(f"/v1/searches/{created['id']}").headers["etag"])
        assert final["status"] == "succeeded" and len(etags) == 2


def test_live_tree_and_events_resume_with_last_event_id(stack: Stack):
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "simulations": 60}).json()
        search_id = created["id"]

        def partial_tree() -> Tree | None:
            tree = Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content)
            return tree if 0 < tree.simulations_done < 60 else None

        live = wait_until(partial_tree, 120, "a live, unfinished tree")
        check_tree(live)
        wait_final(client, search_id)
        events = list(_sse(client, f"/v1/searches/{search_id}/events"))
        kinds = [kind for _, kind, _ in events]
        assert kinds[0] == "running" and kinds[-1] == "succeeded" and "progress" in kinds
        progress = [json.loads(data)["simulations_done"] for _, kind, data in events if kind == "progress"]
        assert progress == sorted(progress)
        middle_id = events[len(events) // 2][0]
        resumed = list(_sse(client, f"/v1/searches/{search_id}/events", last_event_id=middle_id))
        assert resumed == events[len(events) // 2 + 1 :]


def _sse(client: httpx.Client, path: str, last_event_id: str | None = None):
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", path, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        for line in response.iter_lines():
            if not line:
                if "event" in event:
                    yield event.get("id", ""), event["event"], event.get("data", "")
                event = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


def test_paging_newest_first_with_cursor(stack: Stack):
    with stack.client() as client:
        ids = [
            client.post("/v1/searches", json={"question": f"What is {i} plus 1?", "simulations": 1}).json()["id"]
            for i in range(5)
        ]
        seen: list[str] = []
        cursor = None
        for _ in range(100):
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/searches", params=params).json()
            seen += [s["id"] for s in page["searches"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert [i for i in seen if i in ids] == ids[::-1]
        times = [s["created_at"] for s in client.get("/v1/searches", params={"limit": 200}).json()["searches"]]
        assert times == sorted(times, reverse=True)
        for search_id in ids:
            wait_final(client, search_id)
        succeeded = client.get("/v1/searches", params={"status": "succeeded", "limit": 200}).json()["searches"]
        assert set(ids) <= {s["id"] for s in succeeded}
        assert all(s["status"] == "succeeded" for s in succeeded)


def test_cancel_stops_a_running_search_and_keeps_its_partial_tree(stack: Stack):
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": QUESTION, "answer": ANSWER, "simulations": 400}).json()
        search_id = created["id"]
        wait_until(
            lambda: client.get(f"/v1/searches/{search_id}").json()["progress"]["simulations_done"] >= 3,
            120,
            "the search to be running",
        )
        start = time.monotonic()
        cancel = client.post(f"/v1/searches/{search_id}/cancel")
        assert cancel.status_code == 200 and cancel.json()["status"] in ("cancelling", "cancelled")
        final = wait_final(client, search_id, timeout=30)
        assert final["status"] == "cancelled" and time.monotonic() - start < 10
        tree = Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content)
        check_tree(tree)
        assert 3 <= tree.simulations_done < 400
        assert final["progress"]["simulations_done"] == tree.simulations_done
        time.sleep(1.5)  # nothing runs on after the cancel
        assert Tree.model_validate_json(client.get(f"/v1/searches/{search_id}/tree").content) == tree
        again = client.post(f"/v1/searches/{search_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_of_a_queued_search_is_immediate(stack: Stack):
    with stack.client() as client:
        rid = f"queued-{time.time()}"
        # Fill the worker's threads first so this one waits in the queue.
        busy = [
            client.post("/v1/searches", json={"question": f"Busy {i}: 2 plus {i}?", "simulations": 60}).json()["id"]
            for i in range(20)
        ]
        created = client.post("/v1/searches", json={"question": QUESTION, "simulations": 5, "request_id": rid}).json()
        cancel = client.post(f"/v1/searches/{created['id']}/cancel").json()
        assert cancel["status"] in ("cancelled", "cancelling")
        final = wait_final(client, created["id"], timeout=120)
        assert final["status"] == "cancelled"
        for search_id in busy:
            client.post(f"/v1/searches/{search_id}/cancel")
        for search_id in busy:
            assert wait_final(client, search_id)["status"] in ("cancelled", "succeeded")
