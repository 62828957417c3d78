"""A trained value checkpoint served by vLLM's pooling runner gives transformers' values."""

from __future__ import annotations

import asyncio

import pytest

from cpl.models import transformers_values
from cpl.training import ValueConfig, train_value

from .helpers import write_jsonl
from .test_value import states


@pytest.mark.vllm
def test_trained_value_checkpoint_in_vllm(policy_dir, tmp_path):
    # No importorskip: a missing vLLM must fail here (CI installs it); deselect with -m "not vllm" instead.
    from cpl.engines import VLLMValue
    from cpl.protocols import State

    data = write_jsonl(tmp_path / "value.jsonl", [{"text": t, "value": v} for t, v in states(16, seed=3)])
    config = ValueConfig(learning_rate=1e-3, epochs=2, batch_size=8, progress=False)
    result = train_value(policy_dir, [data], tmp_path / "ckpt", config)

    probe = [State(question=q, steps=[]) for q in ("Ann has 3 apples. How many?", "What is 2+2?")]
    reference = transformers_values(result.out_dir, [s.value_prompt() for s in probe])
    engine = VLLMValue(result.out_dir, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    try:
        served = [r.value for r in asyncio.run(engine.evaluate(probe))]
    finally:
        engine.close()
    assert max(abs(v) for v in reference) > 0.05  # a trained head, not the near-zero fresh one
    assert served == pytest.approx(reference, abs=1e-3)
