"""The tiny tokenizer and models the project builds for tests and development (no vLLM needed)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from cpl.formats import DEMONSTRATIONS, MARKERS, PromptFormat, demonstration_steps, render_prompt, render_response
from cpl.models import build_tiny_models, build_tokenizer, default_corpus, transformers_values, value_from_logit
from cpl.models.reference import transformers_step_logprob


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models[0])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_markers_are_single_normal_tokens(tokenizer):
    special = set(tokenizer.all_special_tokens)
    assert {"<s>", "</s>", "<pad>"} <= special
    for marker in MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1, marker
        assert marker not in special
        assert tokenizer.decode(ids, skip_special_tokens=True) == marker


@pytest.mark.parametrize("fmt", list(PromptFormat))
def test_prompts_round_trip_with_skip_special_tokens(tokenizer, fmt):
    demo = DEMONSTRATIONS[0]
    text = render_prompt("What is 12+30?", [], fmt, few_shot=True) + render_response(
        demonstration_steps(demo, fmt), fmt
    )
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for marker in MARKERS:
        if marker in text:
            assert tokenizer.convert_tokens_to_ids(marker) in ids


def test_digits_are_split(tokenizer):
    ids = tokenizer.encode("12345", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == list("12345")
    ids = tokenizer.encode("x=907+13", add_special_tokens=False)
    assert [t for t in tokenizer.convert_ids_to_tokens(ids) if t.isdigit()] == list("90713")


def test_tokenizer_files(tiny_models):
    for d in tiny_models:
        assert (d / "tokenizer.json").is_file()
        config = json.loads((d / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_build_tokenizer_vocab_limit():
    tok = build_tokenizer(default_corpus(num_arithmetic=50), vocab_size=300)
    assert len(tok) <= 300
    assert all(len(tok.encode(m, add_special_tokens=False)) == 1 for m in MARKERS)


def test_policy_loads_and_matches_tokenizer(tiny_models, tokenizer):
    policy_dir, _ = tiny_models
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    config = model.config
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("Plan 1: x<endstep>").input_ids])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_value_model_loads_and_is_bounded(tiny_models, tokenizer):
    _, value_dir = tiny_models
    config = AutoConfig.from_pretrained(value_dir)
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert config.num_labels == 1
    assert config.pad_token_id == tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(value_dir)
    assert model.score.bias is None
    texts = ["Question: 1+1?\n\nPlans:\n", "Plan 1: add.<endstep>\n", "<question>\nx\n</question>\n<plan>\n"]
    values = transformers_values(value_dir, texts)
    assert len(values) == 3
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert len(set(values)) == 3  # the fresh head is small but not zero


def test_value_model_shares_backbone(tiny_models):
    policy_dir, value_dir = tiny_models
    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    cls = AutoModelForSequenceClassification.from_pretrained(value_dir)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, cls.model.state_dict()[name]), name


def test_value_from_logit():
    assert value_from_logit(0.0) == 0.0
    assert math.isclose(value_from_logit(0.5), math.tanh(0.5))
    assert torch.allclose(value_from_logit(torch.tensor([100.0, -100.0])), torch.tensor([1.0, -1.0]))


def test_build_is_deterministic(tiny_models, tmp_path):
    policy_dir, value_dir = build_tiny_models(tmp_path / "again", seed=0)
    assert _sha(policy_dir / "model.safetensors") == _sha(tiny_models[0] / "model.safetensors")
    assert _sha(value_dir / "model.safetensors") == _sha(tiny_models[1] / "model.safetensors")
    assert (policy_dir / "tokenizer.json").read_text() == (tiny_models[0] / "tokenizer.json").read_text()
    other, _ = build_tiny_models(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(policy_dir / "model.safetensors")


def test_qwen2_arch(tmp_path):
    policy_dir, value_dir = build_tiny_models(tmp_path, arch="qwen2", num_layers=1)
    assert AutoConfig.from_pretrained(policy_dir).model_type == "qwen2"
    assert AutoConfig.from_pretrained(value_dir).architectures == ["Qwen2ForSequenceClassification"]
    (v,) = transformers_values(value_dir, ["Plan 1: x<endstep>\n"])
    assert -1.0 <= v <= 1.0


def test_head_dim_must_be_64(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_models(tmp_path, hidden_size=64, num_heads=4)


def test_step_logprob_reference(tiny_models, tokenizer):
    policy_dir, _ = tiny_models
    prompt = "Question: 2+2?\n\nPlans:\n"
    step = tokenizer.encode("Plan 1: add.<endstep>", add_special_tokens=False)
    total = transformers_step_logprob(policy_dir, prompt, step)
    # the sum over the step equals the sum of one-token steps with growing prompts (ids, not text)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    ids = tokenizer(prompt).input_ids
    expected = 0.0
    with torch.no_grad():
        for tok in step:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            expected += torch.log_softmax(logits, -1)[tok].item()
            ids = [*ids, tok]
    assert total < 0
    assert math.isclose(total, expected, abs_tol=1e-4)
    assert transformers_step_logprob(policy_dir, prompt, []) == 0.0
