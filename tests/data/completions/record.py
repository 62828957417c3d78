"""Record the vLLM completions of tests/test_completions.py: one prompt, both vLLM paths, as JSON.

    python tests/data/completions/record.py        # ~2 min on 2 CPU cores; rewrites recorded.json

The embedded planner (cpl/assets/planner/policy) answers two expand requests, greedily, once through an
in-process ``vllm.LLM`` (the library engine) and once through ``vllm serve``'s ``/v1/completions`` (what the
policy gateway calls), both with the same ``max_model_len``:

- ``greedy``: temperature 0, n = 3, a short prompt; the step ends on a stop marker.
- ``context_limit``: a longer prompt (one step further) after which ``max_model_len`` leaves only 5 tokens:
  the step is cut at the context limit (finish_reason "length").

Stored per case: the request, the prompt's token count, the in-process ``CompletionOutput`` fields and the
server's JSON answer, exactly as they came.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from cpl.completions import sampling_plan  # noqa: E402
from cpl.formats import StepKind  # noqa: E402
from cpl.protocols import ExpandRequest, State  # noqa: E402
from cpl.toy import world  # noqa: E402

MODEL = REPO / "cpl" / "assets" / "planner" / "policy"
OUT = Path(__file__).with_name("recorded.json")
FIRST_STEP = "Plan 1: Find Leo's stickers by adding the difference to Hugo's stickers."
CUT_ROOM = 5


def requests() -> dict[str, ExpandRequest]:
    (problem,) = world.generate("arith", 1, seed=5, split="test")
    state = State(question=problem.question)
    longer = State(question=problem.question, steps=[(StepKind.PLAN, FIRST_STEP)])
    return {
        "greedy": ExpandRequest(state=state, n=3, temperature=0.0, max_tokens=96, few_shot=False),
        "context_limit": ExpandRequest(state=longer, n=1, temperature=0.0, max_tokens=96, few_shot=False),
    }


def max_model_len(reqs: dict[str, ExpandRequest]) -> int:
    """Room for only ``CUT_ROOM`` tokens after the context-limit prompt (the greedy prompt is shorter)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    return len(tokenizer(reqs["context_limit"].prompt()).input_ids) + CUT_ROOM


def offline(reqs: dict[str, ExpandRequest], limit: int) -> dict[str, dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(MODEL),
        dtype="float32",
        max_model_len=limit,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=128 << 20,
    )
    tokenizer = llm.get_tokenizer()
    out = {}
    for name, request in reqs.items():
        ids = list(tokenizer(request.prompt()).input_ids)
        plan = sampling_plan(request, max_model_len=limit, prompt_tokens=len(ids))
        params = SamplingParams(
            n=plan.n, temperature=plan.temperature, max_tokens=plan.max_tokens, stop=plan.stop, logprobs=0
        )
        (result,) = llm.generate([{"prompt_token_ids": ids}], [params], use_tqdm=False)
        out[name] = {
            "prompt_tokens": len(ids),
            "outputs": [
                {
                    "index": c.index,
                    "text": c.text,
                    "token_ids": list(c.token_ids),
                    "cumulative_logprob": c.cumulative_logprob,
                    "logprobs": [{str(t): lp.logprob for t, lp in entry.items()} for entry in c.logprobs],
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in result.outputs
            ],
        }
    return out


def server(reqs: dict[str, ExpandRequest], limit: int) -> dict[str, dict]:
    from services.common.ports import find_free_port
    from services.policy.app import completion_payload

    port = find_free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL),
        "--port",
        str(port),
        "--served-model-name",
        "planner",
        "--max-model-len",
        str(limit),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--seed",
        "0",
        "--generation-config",
        "vllm",
        "--logprobs-mode",
        "raw_logprobs",
        "--kv-cache-memory-bytes",
        str(128 << 20),
    ]
    child = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("vLLM server did not start")
            time.sleep(1)
        out = {}
        for name, request in reqs.items():
            payload = completion_payload(request, "planner", limit)
            response = httpx.post(f"{url}/v1/completions", json=payload, timeout=120)
            response.raise_for_status()
            out[name] = {"payload": payload, "response": response.json()}
        return out
    finally:
        child.terminate()
        child.wait(60)


def main() -> None:
    reqs = requests()
    length = max_model_len(reqs)
    recorded = {"max_model_len": length, "model": "cpl/assets/planner/policy", "cases": {}}
    off = offline(reqs, length)
    srv = server(reqs, length)
    for name, request in reqs.items():
        recorded["cases"][name] = {
            "request": request.model_dump(mode="json"),
            "offline": off[name],
            "server": srv[name],
        }
    OUT.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
