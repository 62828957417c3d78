"""Routes of the dashboard: the page shells (searches, batches, trainings, rounds) and the script. The pages carry
no job data: the script fetches it from ``/v1`` with the user's API key (trainings and rounds: an operator key),
so the dashboard shows nothing to someone without a key."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from services.common.errors import APIError

HERE = Path(__file__).parent
STATIC = HERE / "static"
# An id as the API gives them out; anything else is a 404 of the page, never a template error.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,200}")
STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
POLL_MS = 2000

templates = Jinja2Templates(directory=HERE / "templates")

# Pages the script fills in: no inline script, no outside source.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def _page(request: Request, name: str, **context: object) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, {"poll_ms": POLL_MS, **context})
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-cache"
    return response


def _checked_id(value: str) -> str:
    # Ids as the API gives them out; anything else is no page (the script would only get a 404 for it).
    if not ID_PATTERN.fullmatch(value):
        raise APIError(404, f"no page for id {value[:80]!r}")
    return value


def dashboard_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        """Searches and batches, with live progress."""
        return _page(request, "index.html", view="index")

    @router.get("/ui/searches/{search_id}", response_class=HTMLResponse)
    async def search_page(request: Request, search_id: str) -> HTMLResponse:
        """One search: its record, its tree (live while it runs) and a cancel button."""
        return _page(request, "search.html", view="search", item_id=_checked_id(search_id))

    @router.get("/ui/batches/{batch_id}", response_class=HTMLResponse)
    async def batch_page(request: Request, batch_id: str) -> HTMLResponse:
        """One batch: counts, accuracy, Table 1 statistics and its searches."""
        return _page(request, "batch.html", view="batch", item_id=_checked_id(batch_id))

    @router.get("/ui/trainings/{training_id}", response_class=HTMLResponse)
    async def training_page(request: Request, training_id: str) -> HTMLResponse:
        """One training job: progress, its loss curve (inline SVG), metrics, the published checkpoint."""
        return _page(request, "training.html", view="training", item_id=_checked_id(training_id))

    @router.get("/ui/rounds/{round_id}", response_class=HTMLResponse)
    async def round_page(request: Request, round_id: str) -> HTMLResponse:
        """One round job: every stage with its outputs, Table 1 of each round's search, accuracy per round."""
        return _page(request, "round.html", view="round", item_id=_checked_id(round_id))

    @router.get("/ui/static/{name}")
    async def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise APIError(404, f"no dashboard file {name!r}")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return router
