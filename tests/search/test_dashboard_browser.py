"""The dashboard in a real browser (Debian's chromium driven by Playwright's sync API) against the session's real
stack: the key gate, a search's progress rising and its tree once done, a batch's counts, the cancel button.

Sync Playwright runs its own event loop: this module holds no asyncio test. ``CPL_DASHBOARD_SCREENSHOT=PATH``
saves a screenshot of a finished search's page there (docs/img/dashboard.png is made that way)."""

from __future__ import annotations

import os
import shutil

import pytest
from playwright.sync_api import Page, expect

from tests.search.conftest import API_KEY, Stack, wait_final

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 240_000

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-gpu"],
    }


@pytest.fixture()
def dash(stack: Stack, page: Page) -> Page:
    """A page of the dashboard with the key already typed in."""
    page.set_default_timeout(30_000)
    page.goto(f"{stack.url}/")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#content")).to_be_visible()
    return page


def test_without_a_key_no_job_data_is_shown(stack: Stack, page: Page) -> None:
    with stack.client() as client:
        client.post("/v1/searches", json={"question": "Ann has 3 cats. How many cats does Ann have?", "simulations": 1})
    page.goto(f"{stack.url}/")
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#content")).to_be_hidden()
    expect(page.locator("tr[data-search-id]")).to_have_count(0)
    page.fill("#api-key", "not-a-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_contain_text("not accepted")
    expect(page.locator("#content")).to_be_hidden()
    expect(page.locator("tr[data-search-id]")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('cplApiKey')") is None


def test_search_page_shows_progress_rising_then_the_tree(dash: Page, stack: Stack) -> None:
    # The toy world's trap (README): the planner's steps split between both readings, so the tree branches.
    question = (
        "Dev has 8 cards. Dev has 1 fewer cards than Cara. Ivy has 6 fewer cards than Cara. "
        "How many cards does Ivy have?"
    )
    with stack.client() as client:
        created = client.post("/v1/searches", json={"question": question, "answer": "3", "simulations": 40})
        assert created.status_code == 202, created.text
        search_id = created.json()["id"]
    # Every value the page's progress bar takes, recorded by the page itself as it changes.
    dash.add_init_script(
        """
        window.__progress = [];
        new MutationObserver(() => {
          const bar = document.querySelector('#search-summary progress');
          if (bar) { const v = Number(bar.getAttribute('value'));
                     if (window.__progress.at(-1) !== v) window.__progress.push(v); }
        }).observe(document, {subtree: true, childList: true, attributes: true});
        """
    )
    dash.goto(f"{stack.url}/ui/searches/{search_id}")
    expect(dash.locator("#question")).to_have_text(question)
    expect(dash.locator("#search-summary .status")).to_have_text("succeeded", timeout=TIMEOUT_MS)
    expect(dash.locator("body")).to_have_attribute("data-polling", "stopped")
    expect(dash.locator("#cancel")).to_be_hidden()

    seen = dash.evaluate("window.__progress")
    assert seen[-1] == 40, seen
    assert any(0 < v < 40 for v in seen), f"the page never showed a search in progress: {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"

    with stack.client() as client:
        record = wait_final(client, search_id)
        tree = client.get(f"/v1/searches/{search_id}/tree").json()
    nodes = tree["nodes"]
    expect(dash.locator("#tree li.node")).to_have_count(len(nodes))
    correct = [n for n in nodes if n["correct"] is True]
    incorrect = [n for n in nodes if n["correct"] is False]
    expect(dash.locator("#tree .node-line.correct")).to_have_count(len(correct))
    expect(dash.locator("#tree .node-line.incorrect")).to_have_count(len(incorrect))

    # The best path: the root and every node from it down to the best solution, and nothing else.
    best_id = record["best"]["node_id"]
    path = []
    node = nodes[best_id]
    while node["parent"] is not None:
        path.append(node)
        node = nodes[node["parent"]]
    expect(dash.locator("#tree li.node.on-best-path")).to_have_count(len(path))
    expect(dash.locator("#tree .node-line.best")).to_have_count(len(path) + 1)
    best = dash.locator(f'#tree li[data-node-id="{best_id}"] > .node-line')
    expect(best).to_have_class("node-line best correct" if nodes[best_id]["correct"] else "node-line best incorrect")
    expect(best.locator(".stat-n")).to_have_text(f"N={nodes[best_id]['N']}")
    expect(best.locator(".stat-v")).to_have_text(f"V={nodes[best_id]['V']:.2f}")
    expect(best.locator(".stat-q")).to_have_text(f"Q={nodes[best_id]['Q']:.2f}")
    expect(best.locator(".stat-prior")).to_have_text(f"π={nodes[best_id]['prior']:.3f}")
    expect(best.locator(".step")).to_have_text(nodes[best_id]["text"])

    shot = os.environ.get("CPL_DASHBOARD_SCREENSHOT")
    if shot:
        dash.set_viewport_size({"width": 1400, "height": 900})
        dash.screenshot(path=shot, full_page=False)


def test_index_lists_a_batch_with_counts_and_accuracy(dash: Page, stack: Stack) -> None:
    problems = [
        {"question": "Ivy has 4 pens. Ivy gets 3 more pens. How many pens does Ivy have?", "answer": "7"},
        {"question": "Dev has 9 cards. Dev gives away 2 cards. How many cards does Dev have?", "answer": "7"},
    ]
    with stack.client() as client:
        batch = client.post("/v1/batches", json={"problems": problems, "simulations": 4}).json()
    row = dash.locator(f'tr[data-batch-id="{batch["id"]}"]')
    expect(row).to_be_visible()
    expect(row).to_have_attribute("data-done", "true", timeout=TIMEOUT_MS)
    expect(row.locator(".count-succeeded")).to_have_text("2")
    expect(row.locator(".accuracy")).to_contain_text("of 2")
    expect(row.locator("progress")).to_have_attribute("value", "2")
    for search_row in dash.locator("tr[data-search-id]").all()[:2]:
        expect(search_row.locator(".status")).to_be_visible()

    dash.click(f'tr[data-batch-id="{batch["id"]}"] a')
    expect(dash.locator("#batch-stats")).to_contain_text("Plan pairs")
    expect(dash.locator("#searches tr[data-search-id]")).to_have_count(2)
    expect(dash.locator("body")).to_have_attribute("data-polling", "stopped")


def test_cancel_button_stops_a_running_search(dash: Page, stack: Stack) -> None:
    with stack.client() as client:
        body = {"question": "Leo has 8 hats. Leo buys 5 more hats. How many hats?", "simulations": 400}
        search_id = client.post("/v1/searches", json=body).json()["id"]
    dash.goto(f"{stack.url}/ui/searches/{search_id}")
    expect(dash.locator("#cancel")).to_be_visible()
    expect(dash.locator("#search-summary .status")).to_have_text("running", timeout=TIMEOUT_MS)
    dash.click("#cancel")
    expect(dash.locator("#search-summary .status")).to_have_text("cancelled", timeout=60_000)
    expect(dash.locator("#cancel")).to_be_hidden()
    expect(dash.locator("body")).to_have_attribute("data-polling", "stopped")
    with stack.client() as client:
        record = client.get(f"/v1/searches/{search_id}").json()
    assert record["status"] == "cancelled"
    assert record["progress"]["simulations_done"] < 400
