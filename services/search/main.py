"""Entry points: ``serve()`` (``cpl serve search``: the API under uvicorn) and ``work()`` (``cpl worker``).
Settings come from ``CPL_SEARCH_*`` environment variables; keyword arguments override them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.serve import run_app
from services.search.settings import SearchSettings


def serve(**overrides: Any) -> None:
    from services.search.api import create_search_app

    run_app("search", SearchSettings(**overrides), create_search_app)


def work(queues: Sequence[str] = ("search",), **overrides: Any) -> int:
    """``cpl worker [--queues search,train]``: check the settings, then run one worker per queue under a
    supervisor that restarts them."""
    from services.common.logging import configure_logging
    from services.search.worker import supervise_worker

    settings = SearchSettings(**overrides)
    configure_logging(settings.log_level, settings.log_format, service="search-worker")
    if "train" in queues:
        from services.trainer.settings import TrainerSettings

        TrainerSettings()  # type: ignore[call-arg]  # refused here (exit 2) rather than in a restarting child
    return supervise_worker(overrides, queues)


def work_child(queue: str = "search") -> None:
    from services.search.worker import run_worker

    run_worker(SearchSettings(), queue)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["worker-child"]:
        work_child(*sys.argv[2:3])
    else:
        serve()
