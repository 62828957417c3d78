"""The dashboard's pages without a browser: shells with no job data, their own script, no outside source."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from services.common.app import create_service_app
from services.common.metrics import ServiceMetrics
from services.search.dashboard import dashboard_router


async def _ready() -> tuple[bool, str]:
    return True, "ready"


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = create_service_app(title="dashboard pages", metrics=ServiceMetrics("dashboard_pages"), ready=_ready)
    app.include_router(dashboard_router())
    return TestClient(app)


@pytest.mark.parametrize(
    ("path", "view"),
    [
        ("/", "index"),
        ("/ui/searches/0123abcd", "search"),
        ("/ui/batches/feed-42", "batch"),
        ("/ui/trainings/abc-r1-sft", "training"),
        ("/ui/rounds/0123abcd", "round"),
    ],
)
def test_pages_are_shells_that_load_only_local_files(client: TestClient, path: str, view: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert f'data-view="{view}"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    assert 'id="key-panel"' in r.text


def test_script_and_style_are_served(client: TestClient) -> None:
    js = client.get("/ui/static/dashboard.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "If-None-Match" in js.text and "sessionStorage" in js.text
    assert "innerHTML" not in js.text  # data enters the page as text only
    assert "createElementNS" in js.text and "loss-curve" in js.text  # the loss curve is inline SVG, no library
    assert client.get("/ui/static/dashboard.css").status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/ui/static/routes.py", "/ui/static/..%2Froutes.py", "/ui/searches/a.b", "/ui/batches/x%20y", "/ui/rounds/a.b"],
)
def test_unknown_files_and_odd_ids_are_404(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert r.json()["detail"]
