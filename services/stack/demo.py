"""``make demo`` (``cpl up --demo``): once the stack is up, search a few held-out toy word problems through the
search API, follow the batch, export its datasets and trees, and print the same summary as library mode
(:func:`cpl.search_stats.format_summary`: each best plan and the paper's Table 1)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cpl.cli import DEMO_SEARCH_SEED
from cpl.search_stats import compute_stats, format_summary, write_stats
from cpl.tree import Tree
from services.stack.client import ClientError, SearchAPIClient, Target, format_batch

if TYPE_CHECKING:
    from services.stack.up import Stack

DEMO_PROBLEMS_SEED = 11
"""Seed of the toy world's sample the demo's problems come from (the search's own seed is `DEMO_SEARCH_SEED`)."""


def demo_problems(n: int) -> list[dict[str, str]]:
    """``n`` problems of the toy world's held-out split (never in the planner's training corpus)."""
    from cpl.toy import world

    return [
        {"question": p.question, "answer": p.gold, "id": f"toy-test-{i}"}
        for i, p in enumerate(world.generate("arith", n, seed=DEMO_PROBLEMS_SEED, split="test"))
    ]


def demo_batch(stack: Stack, n: int, simulations: int, out: Path | None = None) -> int:
    out = out or stack.run_dir / "demo"
    try:
        with SearchAPIClient(Target(stack.url, stack.api_key)) as client:
            # Seeded as library mode's `cpl demo`: every run shows the same trees (and pairs).
            batch = client.submit_problems(demo_problems(n), simulations, {"seed": DEMO_SEARCH_SEED})
            print(f"\nSearching {n} held-out toy problems, {simulations} simulations each (batch {batch['id']}):")
            print(f"watch it live: {stack.url}/ui/batches/{batch['id']}", flush=True)
            batch = client.follow(batch["id"])
            searches = client.batch_searches(batch["id"])
            trees = [
                Tree.model_validate_json(client.request("GET", f"/v1/searches/{s['id']}/tree").content)
                for s in searches
            ]
            counts = client.export(batch["id"], out)
            (out / "trees").mkdir(parents=True, exist_ok=True)
            for tree in trees:
                (out / "trees" / f"{tree.id}.json").write_text(tree.model_dump_json())
            stats = compute_stats(trees, counts)
            write_stats(out, stats)
            print(format_batch(batch)[0])
            print(format_summary(trees, stats, out), flush=True)
    except ClientError as exc:
        print(f"demo: {exc}")
        return exc.code
    return 0
