"""Entry points: ``serve()`` (``cpl serve search``: the API under uvicorn) and ``work()`` (``cpl worker``).
Settings come from ``CPL_SEARCH_*`` environment variables; keyword arguments override them."""

from __future__ import annotations

from typing import Any

from services.common.serve import run_app
from services.search.settings import SearchSettings


def serve(**overrides: Any) -> None:
    from services.search.api import create_search_app

    run_app("search", SearchSettings(**overrides), create_search_app)


def work(**overrides: Any) -> int:
    """``cpl worker``: check the settings, then run the worker under a supervisor that restarts it."""
    from services.common.logging import configure_logging
    from services.search.worker import supervise_worker

    settings = SearchSettings(**overrides)
    configure_logging(settings.log_level, settings.log_format, service="search-worker")
    return supervise_worker(overrides)


def work_child() -> None:
    from services.search.worker import run_worker

    run_worker(SearchSettings())


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["worker-child"]:
        work_child()
    else:
        serve()
