"""Step log-probs: shared-prefix and concatenated layouts agree with each other and with the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpl.models.reference import transformers_step_logprob
from cpl.training.data import PairRow, SFTRow, tokenize_pairs, tokenize_sft
from cpl.training.logps import pair_batch, pair_logps

from .helpers import pair_rows, sft_rows


@pytest.fixture(scope="module")
def model_and_tokenizer(policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    return model, tokenizer


def _pairs(tokenizer, n=5):
    rows = [PairRow.model_validate(r) for r in pair_rows(n, seed=3, chosen_value=0.5, rejected_value=-0.5)]
    # prompts of different lengths in one batch: the padding sits between prompt and step
    rows[1] = rows[1].model_copy(update={"prompt": rows[1].prompt + "Plan 1: Read the question twice.<endstep>\n"})
    pairs, dropped = tokenize_pairs(tokenizer, rows, 4096, append_eos=False, solution_value_scale=None)
    assert dropped == 0
    return rows, pairs


def _batch(tokenizer, pairs, sharing):
    return pair_batch(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        tokenizer.pad_token_id,
        "cpu",
        prefix_sharing=sharing,
    )


def test_prompt_and_step_are_tokenised_separately(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    rows, pairs = _pairs(tokenizer)
    for row, pair in zip(rows, pairs, strict=True):
        assert pair.prompt_ids == tokenizer(row.prompt).input_ids
        assert pair.prompt_ids[0] == tokenizer.bos_token_id
        assert pair.chosen_ids == tokenizer(row.chosen, add_special_tokens=False).input_ids
        assert tokenizer.bos_token_id not in pair.chosen_ids and tokenizer.eos_token_id not in pair.chosen_ids
    sft = [SFTRow.model_validate(r) for r in sft_rows(2)]
    examples, _ = tokenize_sft(tokenizer, sft, 4096)
    for row, ex in zip(sft, examples, strict=True):
        prompt = tokenizer(row.prompt).input_ids
        response = tokenizer(row.response, add_special_tokens=False).input_ids
        assert ex.input_ids == prompt + response + [tokenizer.eos_token_id]
        assert ex.prompt_len == len(prompt) and ex.num_target_tokens == len(response) + 1


@pytest.mark.parametrize("sharing", [True, False])
def test_step_logps_match_reference(model_and_tokenizer, policy_dir, sharing):
    model, tokenizer = model_and_tokenizer
    rows, pairs = _pairs(tokenizer)
    with torch.no_grad():
        chosen, rejected = pair_logps(model.eval(), _batch(tokenizer, pairs, sharing))
    for row, pair, c, r in zip(rows, pairs, chosen, rejected, strict=True):
        assert float(c) == pytest.approx(transformers_step_logprob(policy_dir, row.prompt, pair.chosen_ids), abs=1e-3)
        assert float(r) == pytest.approx(transformers_step_logprob(policy_dir, row.prompt, pair.rejected_ids), abs=1e-3)


def test_prefix_sharing_gives_the_same_gradients(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    _, pairs = _pairs(tokenizer)
    grads = []
    for sharing in (True, False):
        model.zero_grad()
        chosen, rejected = pair_logps(model.train(), _batch(tokenizer, pairs, sharing))
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_layouts_agree_without_any_padding(model_and_tokenizer):
    """One prompt, two steps of equal length: no padding, so attention runs without a mask (q_len != kv_len)."""
    model, tokenizer = model_and_tokenizer
    prompt = [tokenizer("Question: What is 2+2?\n\nPlans:\n").input_ids]
    chosen = [tokenizer("Plan 1: add<endstep>\n", add_special_tokens=False).input_ids]
    rejected = [tokenizer("Plan 1: mul<endstep>\n", add_special_tokens=False).input_ids]
    assert len(chosen[0]) == len(rejected[0])
    with torch.no_grad():
        shared = pair_logps(model.eval(), pair_batch(prompt, chosen, rejected, 0, "cpu", prefix_sharing=True))
        concat = pair_logps(model.eval(), pair_batch(prompt, chosen, rejected, 0, "cpu", prefix_sharing=False))
    torch.testing.assert_close(torch.stack(shared), torch.stack(concat), rtol=1e-5, atol=1e-4)
