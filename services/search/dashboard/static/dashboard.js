// The CPL search dashboard: reads only the public /v1 API with the key the user typed (sessionStorage), polls
// every data-poll-ms while the tab is visible (GET /v1/searches/{id} with If-None-Match: a 304 costs nothing) and
// stops once what it shows is final. Data goes into the page only through textContent, never as HTML.
"use strict";

(() => {
  const KEY = "cplApiKey";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STATUSES = ["queued", "running", "succeeded", "failed", "cancelling", "cancelled"];
  const body = document.body;
  const view = body.dataset.view;
  const itemId = body.dataset.id;
  const pollMs = Number(body.dataset.pollMs) || 2000;
  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}

  // --- DOM helpers -------------------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const short = (id) => id.slice(0, 12);
  const clip = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);

  function progressBar(done, total, label) {
    return el(
      "span",
      { class: "progress" },
      el("progress", { max: Math.max(total, 1), value: Math.min(done, total) }),
      el("span", { class: "progress-text", text: label ?? `${done}/${total}` }),
    );
  }
  const statusBadge = (status) => el("span", { class: `status status-${status}`, text: status });

  // --- the key and the API -----------------------------------------------------------------------------------
  const apiKey = () => sessionStorage.getItem(KEY);

  async function api(path, { method = "GET", etag = null } = {}) {
    const headers = { Authorization: `Bearer ${apiKey()}` };
    if (etag) headers["If-None-Match"] = etag;
    // no-store: the browser's cache stays out of the way, so our own If-None-Match answers 304 here.
    const response = await fetch(path, { method, headers, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      throw new AuthError(response.status === 401 ? "The API asks for a key." : "That key is not accepted.");
    }
    if (response.status === 304) return { status: 304, etag };
    let data = null;
    try {
      data = await response.json();
    } catch (_err) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : response.statusText;
      throw new Error(`${method} ${path}: ${response.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    return { status: response.status, etag: response.headers.get("ETag"), body: data };
  }

  function askForKey(message) {
    generation += 1;
    sessionStorage.removeItem(KEY);
    $("content").hidden = true;
    $("forget-key").hidden = true;
    $("key-panel").hidden = false;
    $("key-error").textContent = message || "";
    $("api-key").focus();
  }

  function setConnection(message) {
    $("conn").textContent = message;
    $("conn").className = message ? "error" : "muted";
  }

  // --- polling: only while visible, one request at a time, stopped when the tick says it is final ----------
  let generation = 0; // a new key starts new pollers; the old ones stop

  function poll(tick) {
    const mine = generation;
    let timer = null;
    let inFlight = false;
    let finished = false;
    body.dataset.polling = "on";

    async function run() {
      timer = null;
      if (mine !== generation) finished = true;
      if (finished || inFlight || document.hidden) return;
      inFlight = true;
      let more = true;
      try {
        more = await tick();
        setConnection("");
      } catch (err) {
        if (err instanceof AuthError) {
          finished = true;
          body.dataset.polling = "stopped";
          askForKey(err.message);
          return;
        }
        setConnection(String(err.message || err));
      } finally {
        inFlight = false;
      }
      if (more === false) {
        finished = true;
        body.dataset.polling = "stopped";
        return;
      }
      schedule();
    }
    function schedule() {
      if (!finished && !timer && !document.hidden) timer = setTimeout(run, pollMs);
    }
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) {
        if (timer) clearTimeout(timer);
        timer = null;
        if (!finished) body.dataset.polling = "paused";
      } else if (!finished) {
        body.dataset.polling = "on";
        run();
      }
    });
    run();
    return { now: run };
  }

  // --- rows of searches (index and batch pages) --------------------------------------------------------------
  function searchRow(s) {
    const p = s.progress;
    let best = "–";
    if (s.best) {
      const mark = s.best.correct === true ? " ✓" : s.best.correct === false ? " ✗" : "";
      best = `${s.best.answer ?? "(none)"}${mark}`;
    }
    return el(
      "tr",
      { "data-search-id": s.id, "data-status": s.status },
      el("td", {}, el("a", { href: `/ui/searches/${encodeURIComponent(s.id)}`, text: short(s.id) })),
      el("td", { class: "question-cell", title: s.question, text: clip(s.question, 90) }),
      el("td", {}, statusBadge(s.status)),
      el("td", {}, progressBar(p.simulations_done, p.simulations_total)),
      el("td", { class: "num", text: p.nodes }),
      el("td", { class: "best-cell", text: best }),
      el("td", { text: when(s.created_at) }),
    );
  }

  function fillSearches(searches) {
    const tbody = $("searches").querySelector("tbody");
    tbody.replaceChildren(...searches.map(searchRow));
    const empty = $("searches-empty");
    if (empty) empty.hidden = searches.length > 0;
  }

  function batchFinal(b) {
    return (b.counts.succeeded || 0) + (b.counts.failed || 0) + (b.counts.cancelled || 0);
  }
  // Final when every one of its searches is: a batch read while its searches are being created is not.
  const batchDone = (b) => b.done && batchFinal(b) >= b.total;

  function batchRow(b) {
    const c = b.counts;
    return el(
      "tr",
      { "data-batch-id": b.id, "data-done": batchDone(b) ? "true" : "false" },
      el("td", {}, el("a", { href: `/ui/batches/${encodeURIComponent(b.id)}`, text: short(b.id) })),
      el("td", {}, progressBar(batchFinal(b), b.total)),
      ...["queued", "running", "succeeded", "failed", "cancelled"].map((k) =>
        el("td", { class: `num count-${k}`, text: c[k] || 0 }),
      ),
      el("td", { class: "num accuracy", text: b.graded ? `${pct(b.accuracy)} of ${b.graded}` : "–" }),
      el("td", { text: when(b.created_at) }),
    );
  }

  // --- the index: newest searches and their batches ----------------------------------------------------------
  function indexView() {
    const batches = new Map(); // id -> record; final ones are not fetched again
    poll(async () => {
      const page = await api("/v1/searches?limit=50");
      const searches = page.body.searches;
      fillSearches(searches);
      const ids = [...new Set(searches.map((s) => s.batch_id).filter(Boolean))].slice(0, 20);
      await Promise.all(
        ids
          .filter((id) => !(batches.get(id) && batchDone(batches.get(id))))
          .map(async (id) => batches.set(id, (await api(`/v1/batches/${encodeURIComponent(id)}`)).body)),
      );
      const shown = ids.map((id) => batches.get(id)).filter(Boolean);
      $("batches").querySelector("tbody").replaceChildren(...shown.map(batchRow));
      $("batches-empty").hidden = shown.length > 0;
      return true; // new searches may come at any time
    });
  }

  // --- one batch ---------------------------------------------------------------------------------------------
  function batchView() {
    const cancel = $("cancel");
    const poller = poll(async () => {
      const b = (await api(`/v1/batches/${encodeURIComponent(itemId)}`)).body;
      const page = await api(`/v1/searches?batch_id=${encodeURIComponent(itemId)}&limit=200`);
      const counts = STATUSES.map((k) => `${k} ${b.counts[k] || 0}`).join(" · ");
      $("batch-summary").replaceChildren(
        el("p", {}, progressBar(batchFinal(b), b.total, `${batchFinal(b)}/${b.total} final`)),
        el("p", { class: "counts", text: counts }),
        el("p", {
          class: "accuracy",
          text: b.graded ? `Accuracy ${pct(b.accuracy)} over ${b.graded} graded searches` : "Accuracy: none graded yet",
        }),
      );
      const st = b.stats;
      const rows = [
        ["Trees (solved)", `${st.trees} (${st.solved_trees})`],
        ["Average depth of correct solutions", fmt(st.avg_depth_correct)],
        ["Positive:negative plan steps", st.negatives_per_positive == null ? "–" : `1:${fmt(st.negatives_per_positive)}`],
        ["Plan steps with V > 0 / V < 0", `${st.positive_plan_steps} / ${st.negative_plan_steps}`],
        ["Correct / wrong solution steps", `${st.correct_solutions} / ${st.incorrect_solutions}`],
        ["Plan pairs", st.plan_pairs],
        ["Solution pairs", st.solution_pairs],
        ["SFT rows / value rows", `${st.sft} / ${st.value}`],
      ];
      $("batch-stats")
        .querySelector("tbody")
        .replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v }))));
      fillSearches(page.body.searches);
      cancel.hidden = batchDone(b);
      return !batchDone(b);
    });
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`/v1/batches/${encodeURIComponent(itemId)}/cancel`, { method: "POST" });
      } catch (err) {
        setConnection(String(err.message || err));
      }
      cancel.disabled = false;
      poller.now();
    });
  }

  // --- one search and its tree -------------------------------------------------------------------------------
  function nodeLine(node, isBest) {
    const classes = ["node-line"];
    if (isBest) classes.push("best");
    if (node.correct === true) classes.push("correct");
    if (node.correct === false) classes.push("incorrect");
    const mark = node.correct === true ? "✓" : node.correct === false ? "✗" : node.dead_end ? "∅" : "";
    return el(
      "div",
      { class: classes.join(" ") },
      el("span", { class: `kind kind-${node.kind}`, text: node.kind }),
      mark ? el("span", { class: "mark", text: mark, title: node.correct ? "correct" : "incorrect" }) : null,
      el("span", { class: "step", text: node.text }),
      el(
        "span",
        { class: "stats" },
        el("span", { class: "stat-n", text: `N=${node.N}` }),
        el("span", { class: "stat-v", text: `V=${fmt(node.V)}` }),
        el("span", { class: "stat-q", text: `Q=${fmt(node.Q)}` }),
        el("span", { class: "stat-prior", text: `π=${fmt(node.prior, 3)}` }),
        node.answer !== null && node.answer !== undefined ? el("span", { text: `answer ${node.answer}` }) : null,
      ),
    );
  }

  function renderTree(tree, bestId) {
    const nodes = tree.nodes;
    const best = new Set();
    for (let id = bestId; id !== null && id !== undefined && nodes[id]; id = nodes[id].parent) best.add(id);
    function subtree(node) {
      const li = el("li", {
        class: `node${best.has(node.id) ? " on-best-path" : ""}`,
        "data-node-id": node.id,
        "data-kind": node.kind,
      });
      li.append(nodeLine(node, best.has(node.id)));
      if (node.children.length) li.append(el("ul", {}, ...node.children.map((c) => subtree(nodes[c]))));
      return li;
    }
    const root = nodes[0];
    const header = el(
      "div",
      { class: `node-line root${best.size ? " best" : ""}` },
      el("span", { class: "kind", text: "question" }),
      el(
        "span",
        { class: "stats" },
        el("span", { class: "stat-n", text: `N=${root.N}` }),
        el("span", { class: "stat-v", text: `V=${fmt(root.V)}` }),
        el("span", { text: `${tree.simulations_done}/${tree.config.simulations} simulations` }),
      ),
    );
    const rootLi = el("li", { class: "node root", "data-node-id": 0 }, header);
    if (root.children.length) rootLi.append(el("ul", {}, ...root.children.map((c) => subtree(nodes[c]))));
    $("tree").replaceChildren(el("ul", { class: "tree", "data-nodes": nodes.length }, rootLi));
  }

  function searchSummary(s) {
    const p = s.progress;
    const items = [
      el("p", {}, statusBadge(s.status), " ", progressBar(p.simulations_done, p.simulations_total,
        `${p.simulations_done}/${p.simulations_total} simulations`), ` · ${p.nodes} nodes`),
    ];
    if (s.answer !== null && s.answer !== undefined) items.push(el("p", { text: `Ground truth: ${s.answer}` }));
    if (s.best) {
      const verdict = s.best.correct === true ? " (correct)" : s.best.correct === false ? " (incorrect)" : "";
      items.push(el("p", { class: "best-answer", text: `Best answer: ${s.best.answer ?? "(none)"}${verdict}, value ${fmt(s.best.value)}` }));
    }
    items.push(el("p", { text: `Root value ${fmt(s.root_value)}` }));
    const versions = [...(s.model_versions.policy || []).map((v) => `policy ${v}`), ...(s.model_versions.value || []).map((v) => `value ${v}`)];
    if (versions.length) items.push(el("p", { class: "muted", text: `Models: ${versions.join(", ")}` }));
    items.push(el("p", { class: "muted", text: `Created ${when(s.created_at)} · started ${when(s.started_at)} · finished ${when(s.finished_at)}` }));
    if (s.error) items.push(el("p", { class: "error", text: `Error ${s.error.code}: ${s.error.message}` }));
    $("search-summary").replaceChildren(...items);
    $("question").textContent = s.question;
    if (s.batch_id) {
      $("batch-link").href = `/ui/batches/${encodeURIComponent(s.batch_id)}`;
      $("batch-link").hidden = false;
    }
  }

  function searchView() {
    const cancel = $("cancel");
    const path = `/v1/searches/${encodeURIComponent(itemId)}`;
    let etag = null;
    const poller = poll(async () => {
      const r = await api(path, { etag });
      if (r.status === 304) return true;
      etag = r.etag;
      const s = r.body;
      searchSummary(s);
      const tree = (await api(`${path}/tree`)).body;
      renderTree(tree, s.best ? s.best.node_id : null);
      const final = FINAL.has(s.status);
      cancel.hidden = final;
      body.dataset.status = s.status;
      return !final;
    });
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`${path}/cancel`, { method: "POST" });
      } catch (err) {
        setConnection(String(err.message || err));
      }
      cancel.disabled = false;
      poller.now();
    });
  }

  // --- trainings and rounds: the trainer routes, read with an operator key (a search key gets 403 there) ------
  const OP_KEY = "cplOperatorKey";
  const SVG = "http://www.w3.org/2000/svg";
  class OperatorNeeded extends Error {}

  async function opApi(path, { method = "GET" } = {}) {
    const key = sessionStorage.getItem(OP_KEY);
    if (!key) throw new OperatorNeeded("");
    const response = await fetch(path, { method, headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(OP_KEY);
      throw new OperatorNeeded("That operator key is not accepted.");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_err) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : response.statusText;
      throw new Error(`${method} ${path}: ${response.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    return data;
  }

  // The operator form: shown while no accepted key is set; a submitted key wakes the page's poller.
  function operatorGate(poller) {
    const form = $("operator-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("operator-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(OP_KEY, key);
      $("operator-key").value = "";
      form.hidden = true;
      poller.now();
    });
    return (err) => {
      form.hidden = false;
      $("operator-error").textContent = err.message;
    };
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The loss curve as inline SVG: (step, loss) points scaled into a fixed box, min/max labelled.
  function lossCurve(points) {
    const w = 560;
    const h = 220;
    const pad = 44;
    const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: w, height: h, class: "loss-curve", role: "img",
      "aria-label": "training loss by step" });
    if (!points.length) {
      root.append(svg("text", { x: pad, y: h / 2, class: "axis-label" }, "no steps yet"));
      return root;
    }
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - 2 * pad);
    const sy = (y) => h - pad - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (h - 2 * pad);
    root.append(
      svg("line", { x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, class: "axis" }),
      svg("line", { x1: pad, y1: pad, x2: pad, y2: h - pad, class: "axis" }),
      svg("text", { x: pad, y: h - pad + 16, class: "axis-label" }, `step ${x0}`),
      svg("text", { x: w - pad, y: h - pad + 16, class: "axis-label", "text-anchor": "end" }, `step ${x1}`),
      svg("text", { x: pad - 4, y: pad + 4, class: "axis-label", "text-anchor": "end" }, fmt(y1, 3)),
      svg("text", { x: pad - 4, y: h - pad, class: "axis-label", "text-anchor": "end" }, fmt(y0, 3)),
      svg("polyline", { points: points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
        class: "loss-line", fill: "none" }),
    );
    return root;
  }

  function trainingRow(t) {
    return el(
      "tr",
      { "data-training-id": t.id, "data-status": t.status },
      el("td", {}, el("a", { href: `/ui/trainings/${encodeURIComponent(t.id)}`, text: clip(t.id, 28) })),
      el("td", { text: t.kind }),
      el("td", {}, statusBadge(t.status)),
      el("td", {}, progressBar(t.step || 0, t.total_steps || 0)),
      el("td", { class: "num", text: fmt(t.loss, 4) }),
      el("td", { text: t.checkpoint || "–" }),
      el("td", { text: when(t.created_at) }),
    );
  }

  const stageDone = (e) => e.status === "done" || e.status === "skipped";
  const accuracyText = (acc) =>
    Object.keys(acc || {}).length ? Object.entries(acc).map(([r, a]) => `round ${r}: ${pct(a)}`).join(" · ") : "–";

  function roundRow(r) {
    const done = r.stages.filter(stageDone).length;
    return el(
      "tr",
      { "data-round-id": r.id, "data-status": r.status },
      el("td", {}, el("a", { href: `/ui/rounds/${encodeURIComponent(r.id)}`, text: short(r.id) })),
      el("td", {}, statusBadge(r.status)),
      el("td", {}, progressBar(done, r.stages.length)),
      el("td", { text: FINAL.has(r.status) ? "–" : `round ${r.round}: ${r.stage || "queued"}` }),
      el("td", { class: "accuracy", text: accuracyText(r.accuracy) }),
      el("td", { text: when(r.created_at) }),
    );
  }

  function trainerLists() {
    const poller = poll(async () => {
      try {
        const [rounds, trainings] = await Promise.all([opApi("/v1/rounds?limit=20"), opApi("/v1/trainings?limit=30")]);
        $("rounds").querySelector("tbody").replaceChildren(...rounds.map(roundRow));
        $("trainings").querySelector("tbody").replaceChildren(...trainings.map(trainingRow));
      } catch (err) {
        if (!(err instanceof OperatorNeeded)) throw err;
        showGate(err);
      }
      return true;
    });
    const showGate = operatorGate(poller);
  }

  // A training's or a round's page: polls `path` with the operator key (the gate asks for it), draws the item with
  // `render`, and stops once it is final; its cancel button posts to `${path}/cancel`.
  function operatorPage(path, render) {
    const cancel = $("cancel");
    const poller = poll(async () => {
      let item;
      try {
        item = await opApi(path);
      } catch (err) {
        if (!(err instanceof OperatorNeeded)) throw err;
        showGate(err);
        return true;
      }
      render(item);
      const final = FINAL.has(item.status);
      cancel.hidden = final;
      body.dataset.status = item.status;
      return !final;
    });
    const showGate = operatorGate(poller);
    onOperatorCancel(cancel, path, poller);
  }

  function trainingView() {
    operatorPage(`/v1/trainings/${encodeURIComponent(itemId)}`, (t) => {
      const items = [
        el("p", {}, statusBadge(t.status), " ", progressBar(t.step || 0, t.total_steps || 0,
          `step ${t.step || 0}/${t.total_steps ?? "?"}`), ` · epoch ${t.epoch ?? "–"}`),
        el("p", { text: `${t.kind} from ${t.model} on ${t.data_rows} rows → ${t.name}` }),
        el("p", { class: "muted", text: `loss ${fmt(t.loss, 4)} · learning rate ${t.learning_rate ?? "–"} · ETA ${t.eta_s ?? "–"} s` }),
      ];
      if (t.checkpoint) items.push(el("p", { text: `Published checkpoint: ${t.checkpoint}` }));
      if (t.deployment_id) items.push(el("p", { text: `Deployment: ${t.deployment_id}` }));
      if (t.error) items.push(el("p", { class: "error", text: t.error }));
      $("training-summary").replaceChildren(...items);
      $("loss-curve").replaceChildren(lossCurve(t.loss_curve || []));
      const metrics = Object.entries(t.metrics || {}).filter(([, v]) => typeof v !== "object");
      $("training-metrics")
        .querySelector("tbody")
        .replaceChildren(...metrics.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v }))));
    });
  }

  // The cancel button of a training's or a round's page (operator routes).
  function onOperatorCancel(cancel, path, poller) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await opApi(`${path}/cancel`, { method: "POST" });
      } catch (err) {
        setConnection(String(err.message || err));
      }
      cancel.disabled = false;
      poller.now();
    });
  }

  function stageOutputs(e) {
    const o = e.outputs || {};
    if (e.reason) return el("span", { class: "muted", text: e.reason });
    if (e.error) return el("span", { class: "error", text: e.error });
    if (o.training_id) {
      return el("span", {}, el("a", { href: `/ui/trainings/${encodeURIComponent(o.training_id)}`, text: o.checkpoint || o.training_id }),
        ` from ${o.started_from} · ${o.rows} rows`);
    }
    if (o.batch_id && e.stage === "search") {
      return el("span", {}, el("a", { href: `/ui/batches/${encodeURIComponent(o.batch_id)}`, text: `batch ${short(o.batch_id)}` }),
        ` · ${o.format}, ${o.simulations} simulations · served by ${(o.model_versions.policy || []).join(", ")}`);
    }
    if (o.rows) return el("span", { text: Object.entries(o.rows).map(([k, v]) => `${k} ${v}`).join(" · ") });
    if (o.versions) return el("span", { text: Object.entries(o.versions).map(([k, v]) => `${k} → ${v}`).join(" · ") });
    if (o.total !== undefined) return el("span", { text: `${o.correct}/${o.total} correct (${pct(o.accuracy)}), zero-shot` });
    return el("span", { class: "muted", text: "–" });
  }

  function roundView() {
    operatorPage(`/v1/rounds/${encodeURIComponent(itemId)}`, (r) => {
      const done = r.stages.filter(stageDone).length;
      const items = [
        el("p", {}, statusBadge(r.status), " ", progressBar(done, r.stages.length, `${done}/${r.stages.length} stages`),
          FINAL.has(r.status) ? "" : ` · round ${r.round}: ${r.stage || "queued"}`),
        el("p", { text: `${r.spec.problems.length} problems · ${r.spec.eval_problems.length} evaluation problems · ${r.spec.rounds} rounds` }),
        el("p", { class: "accuracy", text: `Accuracy per round: ${accuracyText(r.accuracy)}` }),
      ];
      if (r.error) items.push(el("p", { class: "error", text: r.error }));
      $("round-summary").replaceChildren(...items);
      $("stages").querySelector("tbody").replaceChildren(
        ...r.stages.map((e) =>
          el("tr", { "data-stage": `${e.round}-${e.stage}`, "data-status": e.status },
            el("td", { class: "num", text: e.round }), el("td", { text: e.stage }), el("td", {}, statusBadge(e.status)),
            el("td", { text: when(e.started_at) }), el("td", { text: when(e.finished_at) }), el("td", {}, stageOutputs(e))),
        ),
      );
      const rounds = [...new Set(r.stages.map((e) => e.round))];
      $("round-stats").querySelector("tbody").replaceChildren(
        ...rounds.map((n) => {
          const search = r.stages.find((e) => e.round === n && e.stage === "search");
          const st = (search && search.outputs && search.outputs.stats) || {};
          return el("tr", {}, el("td", { class: "num", text: n }), el("td", { class: "num", text: st.trees ?? "–" }),
            el("td", { class: "num", text: fmt(st.avg_depth_correct) }),
            el("td", { class: "num", text: st.positive_plan_steps ?? "–" }),
            el("td", { class: "num", text: st.negative_plan_steps ?? "–" }),
            el("td", { class: "num", text: st.plan_pairs ?? "–" }),
            el("td", { class: "num", text: st.solution_pairs ?? "–" }),
            el("td", { class: "num", text: search && search.outputs ? pct(search.outputs.accuracy) : "–" }),
            el("td", { class: "num", text: r.accuracy[String(n)] === undefined ? "–" : pct(r.accuracy[String(n)]) }));
        }),
      );
    });
  }

  // --- start -------------------------------------------------------------------------------------------------
  function start() {
    generation += 1;
    $("key-panel").hidden = true;
    $("content").hidden = false;
    $("forget-key").hidden = false;
    if (view === "search") searchView();
    else if (view === "batch") batchView();
    else if (view === "training") trainingView();
    else if (view === "round") roundView();
    else {
      indexView();
      trainerLists();
    }
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("api-key").value = "";
    start();
  });
  $("forget-key").addEventListener("click", () => askForKey(""));

  if (apiKey()) start();
  else askForKey("");
})();
