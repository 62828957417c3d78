"""Batches: a GSM8K-format file (held-out toy-world problems, written by ``cpl.toy.world.write_gsm8k_jsonl``)
runs to completion; counts, accuracy and Table 1 agree with the trees; the exports are
the rows library mode's ``cpl.pairs`` makes from the same trees."""

from __future__ import annotations

import json

import pytest

from cpl.pairs import DATASETS, sft_examples
from cpl.problems import load_problems
from cpl.search_stats import SearchStats, compute_stats
from cpl.tree import Tree
from tests.search.conftest import Stack, toy_problems, wait_until
from tests.search.invariants import check_tree


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory: pytest.TempPathFactory):
    from cpl.toy.world import write_gsm8k_jsonl

    return write_gsm8k_jsonl(toy_problems(3, seed=11), tmp_path_factory.mktemp("batch") / "toy_gsm8k.jsonl")


@pytest.fixture(scope="module")
def gsm8k_batch(stack: Stack, gsm8k_file) -> dict:
    path = gsm8k_file
    with stack.client() as client:
        response = client.post(
            "/v1/batches/upload",
            files={"file": ("toy_gsm8k.jsonl", path.read_bytes())},
            data={"simulations": "16", "settings": json.dumps({"max_step_tokens": 64}), "request_id": "gsm8k-1"},
        )
        assert response.status_code == 202, response.text
        batch = response.json()
        assert response.headers["location"] == f"/v1/batches/{batch['id']}"
        again = client.post(
            "/v1/batches/upload",
            files={"file": ("toy_gsm8k.jsonl", path.read_bytes())},
            data={"simulations": "16", "request_id": "gsm8k-1"},
        )
        assert again.status_code == 202 and again.json()["id"] == batch["id"]

        def done() -> dict | None:
            body = client.get(f"/v1/batches/{batch['id']}").json()
            return body if body["done"] else None

        final = wait_until(done, 600, "the GSM8K batch", interval=1.0)
        searches = client.get("/v1/searches", params={"batch_id": batch["id"], "limit": 200}).json()["searches"]
        trees = {
            s["id"]: Tree.model_validate_json(client.get(f"/v1/searches/{s['id']}/tree").content) for s in searches
        }
        exports = {
            name: [json.loads(line) for line in client.get(f"/v1/batches/{batch['id']}/exports/{name}").iter_lines()]
            for name in DATASETS
        }
    return {"batch": final, "searches": searches, "trees": trees, "exports": exports}


def test_a_gsm8k_batch_completes(gsm8k_batch: dict, gsm8k_file):
    problems = load_problems(gsm8k_file)
    batch, searches, trees = gsm8k_batch["batch"], gsm8k_batch["searches"], gsm8k_batch["trees"]
    assert batch["total"] == len(problems) == len(searches) == 3
    assert batch["counts"]["succeeded"] == 3 and batch["done"]
    by_problem = {s["problem_id"]: s for s in searches}
    for problem in problems:
        search = by_problem[problem.id]
        tree = trees[search["id"]]
        assert search["status"] == "succeeded" and search["answer"] == problem.gold
        assert tree.question == problem.question and tree.gold == problem.gold
        assert tree.simulations_done == 16 and tree.config.max_step_tokens == 64 and not tree.config.few_shot
        check_tree(tree)


def test_batch_accuracy_and_table_1_agree_with_the_trees(gsm8k_batch: dict):
    batch, searches, trees = gsm8k_batch["batch"], gsm8k_batch["searches"], gsm8k_batch["trees"]
    assert batch["graded"] == 3
    correct = sum(1 for s in searches if s["best"] is not None and s["best"]["correct"])
    assert batch["accuracy"] == pytest.approx(correct / 3)
    # Library mode's Table 1 over the same trees, with the dataset sizes of the batch's exports.
    counts = {name: len(rows) for name, rows in gsm8k_batch["exports"].items()}
    expected = compute_stats(list(trees.values()), counts)
    assert SearchStats.model_validate(batch["stats"]) == expected
    assert expected.trees == 3 and expected.value > 0


def test_exports_equal_what_library_mode_extracts(gsm8k_batch: dict):
    trees = list(gsm8k_batch["trees"].values())
    searches = gsm8k_batch["searches"]
    order = [t for s in searches for t in trees if t.id == s["id"]]
    for name, rows in gsm8k_batch["exports"].items():
        expected = [
            json.loads(row.model_dump_json())
            for tree in order
            for row in (sft_examples(tree) if name == "sft" else DATASETS[name](tree))
        ]
        assert sorted(rows, key=json.dumps) == sorted(expected, key=json.dumps), name
    assert gsm8k_batch["exports"]["value"], "every tree has visited states"
