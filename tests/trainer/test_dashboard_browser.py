"""The dashboard's trainings and rounds in a real browser (Debian's chromium, Playwright's sync API): the search
app with the trainer routes served by uvicorn, real Redis holding a training (with its loss curve) and a round
written through the stores the services use. No inference service is needed: these pages read only
``/v1/trainings`` and ``/v1/rounds``, with an operator key typed next to the search key.

Run in the browser tests' own pytest process (Makefile ``test``): sync Playwright keeps an event loop running."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import uvicorn
from playwright.sync_api import Page, expect

from services.common.ports import find_free_port
from services.search.api import create_search_app
from services.search.settings import SearchSettings
from services.trainer.records import TrainingRecord, TrainingStore
from services.trainer.rounds import RoundRecord, RoundSpec, RoundStore, plan_stages
from tests.search.conftest import REDIS_URL, unlink_prefix

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SEARCH_KEY = "dash-search-key"
OPERATOR = "dash-operator-key"
CURVE = [(step, round(2.0 - 0.07 * step, 4)) for step in range(1, 21)]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-gpu"],
    }


def _seed(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    training = TrainingRecord(
        id="t-curve",
        status="succeeded",
        kind="sft",
        model="base",
        data=["sft.jsonl"],
        data_rows=10,
        name="sft-curve",
        step=20,
        total_steps=20,
        epoch=1,
        loss=CURVE[-1][1],
        loss_curve=CURVE,
        checkpoint="sft-curve",
        metrics={"steps": 20, "final_step_loss": CURVE[-1][1]},
    )
    TrainingStore(client, prefix).create(training)
    spec = RoundSpec(problems=[{"question": "Ann has 3 apples and buys 4. How many?", "answer": "7"}], rounds=1)
    record = RoundRecord(id="r-demo", status="running", spec=spec, stages=plan_stages(spec), round=1, stage="value")
    search = record.entry(1, "search")
    search.status = "done"
    search.outputs = {
        "batch_id": "b0123",
        "format": "plain",
        "simulations": 24,
        "accuracy": 1.0,
        "model_versions": {"policy": ["base-v1"], "value": ["base-v1"]},
        "stats": {
            "trees": 1,
            "avg_depth_correct": 3.0,
            "positive_plan_steps": 4,
            "negative_plan_steps": 2,
            "plan_pairs": 5,
            "solution_pairs": 3,
        },
    }
    sft = record.entry(1, "sft")
    sft.status = "done"
    sft.outputs = {"training_id": "t-curve", "checkpoint": "sft-curve", "started_from": "base", "rows": 10}
    record.entry(1, "value").status = "running"
    RoundStore(client, prefix).create(record)
    client.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    search_prefix = f"cpltest:{uuid.uuid4().hex[:10]}"
    trainer_prefix = f"cpltest-dash-{uuid.uuid4().hex[:8]}:"
    env = {
        "CPL_TRAINER_CHECKPOINT_ROOT": str(tmp_path_factory.mktemp("dash_root")),
        "CPL_TRAINER_REDIS_URL": REDIS_URL,
        "CPL_TRAINER_KEY_PREFIX": trainer_prefix,
        "CPL_TRAINER_OPERATOR_KEYS": json.dumps([OPERATOR]),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    server = None
    thread = None
    try:
        app = create_search_app(SearchSettings(redis_url=REDIS_URL, key_prefix=search_prefix, api_keys=[SEARCH_KEY]))
        _seed(trainer_prefix)
        port = find_free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=10)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        client = redis.Redis.from_url(REDIS_URL)
        unlink_prefix(client, search_prefix)
        keys = list(client.scan_iter(match=f"{trainer_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_trainings_and_rounds_need_an_operator_key_then_show_the_loss_curve_and_stages(url: str, page: Page) -> None:
    page.set_default_timeout(30_000)
    page.goto(f"{url}/")
    page.fill("#api-key", SEARCH_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#content")).to_be_visible()
    # the search key does not open the trainer's routes: the operator form asks for its own key
    expect(page.locator("#operator-form")).to_be_visible()
    expect(page.locator("tr[data-round-id]")).to_have_count(0)
    page.fill("#operator-key", SEARCH_KEY)
    page.click("#operator-form button[type=submit]")
    expect(page.locator("#operator-error")).to_contain_text("not accepted")
    page.fill("#operator-key", OPERATOR)
    page.click("#operator-form button[type=submit]")
    expect(page.locator("#operator-form")).to_be_hidden()
    round_row = page.locator('tr[data-round-id="r-demo"]')
    expect(round_row).to_contain_text("round 1: value")
    expect(round_row.locator("progress")).to_have_attribute("value", "2")
    expect(page.locator('tr[data-training-id="t-curve"]')).to_contain_text("sft-curve")

    page.click('tr[data-training-id="t-curve"] a')
    expect(page.locator("#training-summary")).to_contain_text("step 20/20")
    line = page.locator("#loss-curve svg.loss-curve polyline")
    expect(line).to_have_count(1)
    points = line.get_attribute("points").split()
    assert len(points) == len(CURVE)
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys)  # the loss falls, so the line goes down the box (SVG y grows downwards)
    expect(page.locator("#training-metrics")).to_contain_text("final_step_loss")
    expect(page.locator("#cancel")).to_be_hidden()

    page.goto(f"{url}/ui/rounds/r-demo")
    expect(page.locator('tr[data-stage="1-search"]')).to_contain_text("done")
    expect(page.locator('tr[data-stage="1-search"]')).to_contain_text("24 simulations")
    expect(page.locator('tr[data-stage="1-value"]')).to_contain_text("running")
    expect(page.locator('tr[data-stage="1-sft"] a')).to_have_attribute("href", "/ui/trainings/t-curve")
    expect(page.locator("#round-stats")).to_contain_text("100.0%")
    expect(page.locator("#round-stats")).to_contain_text("3.00")  # avg depth of correct solutions
    expect(page.locator("#cancel")).to_be_visible()
