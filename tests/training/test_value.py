"""Value training: lowers the MSE on held-out states; the checkpoint scores like transformers_values."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cpl.models import transformers_values
from cpl.training import ValueConfig, predict_values, train_value

from .helpers import states, write_jsonl


def _mse(model_dir, data) -> float:
    values = transformers_values(model_dir, [t for t, _ in data])
    return sum((v - y) ** 2 for v, (_, y) in zip(values, data, strict=True)) / len(data)


@pytest.fixture(scope="module")
def trained(policy_dir, tmp_path_factory):
    """A value model trained from the *causal LM* (fresh score head), plus its held-out states."""
    tmp = tmp_path_factory.mktemp("value")
    train, held_out = states(24, seed=1), states(10, seed=2)
    data = write_jsonl(tmp / "value.jsonl", [{"text": t, "value": v} for t, v in train])
    config = ValueConfig(learning_rate=1e-3, epochs=4, batch_size=8, micro_batch_size=4, progress=False)
    result = train_value(policy_dir, [data], tmp / "ckpt", config)
    return result, held_out


def test_value_training_lowers_held_out_mse(trained, value_dir):
    result, held_out = trained
    before, after = _mse(value_dir, held_out), _mse(result.out_dir, held_out)
    assert after < 0.1 and after < 0.5 * before, (before, after)
    assert result.metrics["final_step_loss"] < result.metrics["first_step_loss"]


def test_checkpoint_layout_matches_make_value_model(trained, value_dir):
    result, _ = trained
    ours = json.loads((result.out_dir / "config.json").read_text())
    made = json.loads((value_dir / "config.json").read_text())
    for key in ("architectures", "num_labels", "problem_type", "pad_token_id", "hidden_size", "vocab_size"):
        assert ours.get(key) == made.get(key), key
    assert ours["architectures"] == ["LlamaForSequenceClassification"]
    assert (result.out_dir / "tokenizer.json").read_bytes() == (value_dir / "tokenizer.json").read_bytes()
    model = AutoModelForSequenceClassification.from_pretrained(result.out_dir)
    assert model.score.bias is None and model.score.weight.shape == (1, model.config.hidden_size)


def test_batched_values_equal_transformers_values(trained):
    result, held_out = trained
    texts = [t for t, _ in held_out]
    model = AutoModelForSequenceClassification.from_pretrained(result.out_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir)
    batched = predict_values(model, tokenizer, texts, batch_size=4)  # right-padded batches
    reference = transformers_values(result.out_dir, texts)  # one text at a time
    assert batched == pytest.approx(reference, abs=1e-5)
    assert max(abs(v) for v in reference) > 0.1  # trained, not the near-zero fresh head


def test_value_job_continues_from_a_value_checkpoint(trained, tmp_path):
    result, held_out = trained
    data = write_jsonl(tmp_path / "more.jsonl", [{"text": t, "value": v} for t, v in held_out])
    config = ValueConfig(learning_rate=1e-12, epochs=1, batch_size=10, progress=False)
    again = train_value(result.out_dir, [data], tmp_path / "ckpt", config)
    assert again.manifest.parent_checkpoint.checkpoint_id == result.manifest.checkpoint_id
    assert again.manifest.base_model == result.manifest.base_model
    # lr ~0: the first step's loss is the held-out MSE of the loaded checkpoint
    assert again.history[0]["loss"] == pytest.approx(_mse(result.out_dir, held_out), abs=1e-4)


def test_head_learning_rate_moves_only_the_head(value_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "v.jsonl", [{"text": t, "value": v} for t, v in states(4, seed=5)])
    config = ValueConfig(
        learning_rate=1e-12, head_learning_rate=1e-2, epochs=1, batch_size=4, warmup_ratio=0.0, progress=False
    )
    result = train_value(value_dir, [data], tmp_path / "ckpt", config)
    before = load_file(str(value_dir / "model.safetensors"))
    after = load_file(str(result.out_dir / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k]) and (after[k] - before[k]).abs().max() > 1e-6}
    assert moved == {"score.weight"}, moved
