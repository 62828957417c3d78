"""``make demo`` (``cpl up --demo``): once the stack is up, search a few held-out toy word problems through the
search API, follow the batch, print the best plans and the paper's Table 1 statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.stack.client import ClientError, SearchAPIClient, Target, format_batch, format_best_plans

if TYPE_CHECKING:
    from services.stack.up import Stack

DEMO_SEED = 11


def demo_problems(n: int) -> list[dict[str, str]]:
    """``n`` problems of the toy world's held-out split (never in the planner's training corpus)."""
    from cpl.toy import world

    return [
        {"question": p.question, "answer": p.gold, "id": f"toy-test-{i}"}
        for i, p in enumerate(world.generate("arith", n, seed=DEMO_SEED, split="test"))
    ]


def demo_batch(stack: Stack, n: int, simulations: int) -> int:
    try:
        with SearchAPIClient(Target(stack.url, stack.api_key)) as client:
            batch = client.submit_problems(demo_problems(n), simulations)
            print(f"\nSearching {n} held-out toy problems, {simulations} simulations each (batch {batch['id']}):")
            print(f"watch it live: {stack.url}/ui/batches/{batch['id']}", flush=True)
            batch = client.follow(batch["id"])
            print("\n".join(format_best_plans(client.batch_searches(batch["id"]))))
            print("\n".join(format_batch(batch)))
            print(f"datasets: cpl export {batch['id']} --out runs/demo", flush=True)
    except ClientError as exc:
        print(f"demo: {exc}")
        return exc.code
    return 0
