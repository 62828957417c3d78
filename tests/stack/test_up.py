"""``cpl up`` as a user runs it: the whole stack (a private redis-server, policy and value services on the embedded
planner, the search API, a worker), the demo batch, ``cpl submit`` and ``cpl export`` against it, and SIGTERM
leaving no process behind. Plus the clear messages when it cannot start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from services.common.ports import find_free_port
from services.stack.up import VALUE_BUSY_LOOP_S

REPO = Path(__file__).resolve().parents[2]
API_KEY = "up-test-key"
READY_TIMEOUT_S = 1200
CPL = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())"]


def _cpl(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CPL, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _dead_redis_url() -> str:
    return f"redis://127.0.0.1:{find_free_port()}/0"


def test_no_redis_and_no_redis_server_says_how_to_get_one(tmp_path: Path) -> None:
    env = {**os.environ, "CPL_REDIS_URL": _dead_redis_url(), "PATH": str(tmp_path)}  # no redis-server on it
    result = _cpl("up", "--port", str(find_free_port()), "--run-dir", str(tmp_path / "up"), env=env)
    assert result.returncode == 2, result.stderr
    assert "no Redis answers" in result.stderr and "redis-server is not on the PATH" in result.stderr
    assert "CPL_REDIS_URL" in result.stderr


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cpl("up", "--port", str(port), "--run-dir", str(tmp_path / "up"), env=dict(os.environ))
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "--port" in result.stderr


def test_submit_and_export_need_a_stack(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CPL_SEARCH_API_KEY", "CPL_SEARCH_URL")}
    result = _cpl("submit", "--question", "What is 2+2?", "--run-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and "no API key" in result.stderr
    env.update({"CPL_SEARCH_API_KEY": "k", "CPL_SEARCH_URL": f"http://127.0.0.1:{find_free_port()}"})
    result = _cpl("export", "abc", "--out", str(tmp_path / "x"), "--run-dir", str(tmp_path), env=env)
    assert result.returncode == 1 and "cpl up" in result.stderr
    result = _cpl("submit", "--input", str(tmp_path / "missing.jsonl"), "--run-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and "no such file" in result.stderr


class Output:
    """The lines a process prints, read as they come."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if proc.poll() is not None:
                time.sleep(0.5)
                raise AssertionError(f"cpl up exited with {proc.returncode}:\n" + "\n".join(self.lines[-60:]))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout:.0f}s:\n" + "\n".join(self.lines[-60:]))
            time.sleep(0.5)


@pytest.mark.vllm
@pytest.mark.timeout(READY_TIMEOUT_S + 600)
def test_up_runs_the_demo_serves_submit_and_export_and_stops_clean_on_sigterm(tmp_path: Path) -> None:
    run_dir = tmp_path / "up"
    port = find_free_port()
    env = {
        **os.environ,
        "CPL_REDIS_URL": _dead_redis_url(),  # nothing answers there: cpl up starts its own redis-server
        "CPL_SEARCH_API_KEY": API_KEY,
        "DEMO_KEEP": "1",
        "PYTHONUNBUFFERED": "1",
        # A search that stalls is resumed (and where it waited is logged in RUN_DIR/logs) well within this test.
        "CPL_SEARCH_STALL_TIMEOUT_S": "90",
    }
    argv = [*CPL, "up", "--demo", "2", "--demo-simulations", "4", "--trainer"]
    argv += ["--port", str(port), "--run-dir", str(run_dir)]
    stderr = (tmp_path / "up.stderr").open("w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    out = Output(proc.stdout)
    family: list[psutil.Process] = []
    try:
        out.wait_for("Press Ctrl-C to stop.", proc, READY_TIMEOUT_S)
        text = "\n".join(out.lines)
        assert f"Dashboard: http://127.0.0.1:{port}/" in text
        assert f"API key:   {API_KEY}" in text
        assert "a private redis-server" in text
        after_setup = out.lines[next(i for i, line in enumerate(out.lines) if line.startswith("Dashboard:")) :]
        assert len(after_setup) < 60, text
        # Each tree's best path is printed; with 4 simulations a branching tree may not have reached a solution yet.
        assert "Table 1 (paper §4.1)" in text and ("-> answer" in text or "-> no solution yet" in text)
        assert len(list((run_dir / "demo" / "trees").glob("*.json"))) == 2, "the demo's trees, for cpl.show"
        assert (run_dir / "demo" / "value.jsonl").is_file()
        batch_id = next(line.split()[1].rstrip(":") for line in out.lines if line.startswith("batch "))

        family = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        for part in ("redis-server", "services.policy.main", "services.value.main", "serve search", "worker"):
            assert part in names, names
        assert "worker --queues search,train" in names, names  # --trainer: the train queue is consumed too
        # The value engine sleeps between steps; the policy keeps vLLM's spin
        # (docs/decisions/007-value-engine-does-not-spin.md).
        busy_loop = {}
        for p in family:
            cmd = " ".join(p.cmdline())
            if "vllm.entrypoints" in cmd:
                busy_loop["value" if "planner/value" in cmd else "policy"] = p.environ().get("CPL_VLLM_BUSY_LOOP_S")
        assert busy_loop == {"value": str(float(VALUE_BUSY_LOOP_S)), "policy": None}, busy_loop
        assert "Operator key (trainings, deployments, rounds): " in text

        # cpl submit and cpl export find the stack through its stack.json; the key never goes on a command line.
        cli_env = {k: v for k, v in os.environ.items() if k not in ("CPL_SEARCH_API_KEY", "CPL_SEARCH_URL")}
        problems = tmp_path / "problems.jsonl"
        problems.write_text(
            json.dumps({"question": "Ann has 3 pens and buys 4 more. How many pens?", "answer": "#### 7"}) + "\n"
        )
        sub = _cpl(
            "submit",
            "--input",
            str(problems),
            "--simulations",
            "2",
            "--show",
            "--run-dir",
            str(run_dir),
            env=cli_env,
            timeout=600,
        )
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert "Table 1 (paper §4.1)" in sub.stdout and "searches done" in sub.stderr  # the progress bar
        exp = _cpl("export", batch_id, "--out", str(tmp_path / "export"), "--run-dir", str(run_dir), env=cli_env)
        assert exp.returncode == 0, exp.stderr
        for name in ("sft", "plan_pairs", "solution_pairs", "value"):
            path = tmp_path / "export" / f"{name}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert f"{path}: {len(rows)} rows" in exp.stdout
        assert (tmp_path / "export" / "value.jsonl").read_text(), "graded trees always give value rows"
        bad = _cpl("export", "no-such-batch", "--out", str(tmp_path / "x"), "--run-dir", str(run_dir), env=cli_env)
        assert bad.returncode == 2 and "404" in bad.stderr

        # --trainer: one CPL round on this machine, the operator key found through stack.json
        rounds = _cpl(
            "round", "--api", f"http://127.0.0.1:{port}", "--input", str(problems), "--rounds", "1",
            "--simulations", "4", "--sft-epochs", "1", "--apo-epochs", "1", "--value-epochs", "1",
            "--run-dir", str(run_dir), env=cli_env, timeout=900,
        )  # fmt: skip
        assert rounds.returncode == 0, rounds.stdout + rounds.stderr[-3000:]
        assert "succeeded" in rounds.stdout and "round 1 deploy    done" in rounds.stdout
        assert list((run_dir / "checkpoints").glob("round-*-r1-value/manifest.json"))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
        assert "Stopped." in out.lines[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stderr.close()
        for p in family:  # what a failed run leaves is not left to the next test
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [" ".join(p.cmdline()) for p in left]
    assert not (run_dir / "stack.json").exists()
    assert list((run_dir / "redis").rglob("*.aof*")), "the private Redis keeps its data (AOF) under the run dir"


@pytest.mark.timeout(300)
def test_a_burst_of_signals_during_start_up_stops_everything(tmp_path: Path) -> None:
    """Ctrl-C pressed twice with a SIGTERM on top, while the inference services start: cpl up stops, and nothing it
    started lives on (its signal handler once took a lock, and a second signal inside it deadlocked cpl up)."""
    env = {**os.environ, "CPL_REDIS_URL": _dead_redis_url(), "PYTHONUNBUFFERED": "1"}
    argv = [*CPL, "up", "--port", str(find_free_port()), "--run-dir", str(tmp_path / "up")]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc.stdout)
    family: list[psutil.Process] = []
    try:
        out.wait_for("Starting the policy and value services", proc, 120)
        time.sleep(3)  # the vLLM children are starting
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("services.policy.main" in " ".join(p.cmdline()) for p in family)
        for sig in [signal.SIGINT, signal.SIGTERM, signal.SIGINT] * 20:
            proc.send_signal(sig)
        assert proc.wait(timeout=120) is not None
        assert "Stopped." in out.lines[-1], out.lines[-20:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        time.sleep(1)
        left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in left:
            p.kill()
    assert not left, [" ".join(p.cmdline()) for p in left]
