"""SFT: the loss is on the response tokens, and training lowers it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpl.training import SFTConfig, response_nll, train_sft
from cpl.training.data import SFTRow, tokenize_sft

from .helpers import sft_rows, write_jsonl


def _nll(model_dir, rows) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_sft(tokenizer, [SFTRow.model_validate(r) for r in rows], 4096)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return response_nll(model, examples, tokenizer.pad_token_id)


def test_sft_lowers_the_response_loss(policy_dir, tmp_path):
    rows = sft_rows(8, seed=1)
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = SFTConfig(learning_rate=2e-3, epochs=4, batch_size=4, micro_batch_size=2, warmup_ratio=0.0, progress=False)
    result = train_sft(policy_dir, [data], tmp_path / "ckpt", config)

    before, after = _nll(policy_dir, rows), _nll(result.out_dir, rows)
    assert after < before - 1.0, (before, after)
    # the job's own first-step loss is the same quantity, measured on the first batch before any update
    assert result.history[0]["loss"] > result.history[-1]["loss"]
    assert result.metrics["steps"] == 8
    assert result.manifest.kind == "sft"


def test_prompt_tokens_carry_no_loss(policy_dir):
    """Changing only the prompt tokens' *targets* must not change the SFT loss: they are not targets."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    rows = [SFTRow.model_validate(r) for r in sft_rows(3, seed=2)]
    examples, _ = tokenize_sft(tokenizer, rows, 4096)
    full = response_nll(model, examples, tokenizer.pad_token_id)
    # the same mean over the response tokens computed by hand from full-sequence logits
    total = count = 0.0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            token = logps.gather(-1, ids[0, 1:, None])[:, 0]
            total += float(-token[ex.prompt_len - 1 :].sum())
            count += ex.num_target_tokens
    assert abs(full - total / count) < 1e-4
