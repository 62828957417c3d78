"""Step-APO: the margin widens, and more so where the advantage is larger (eq. 13's weighting)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpl.losses import step_apo_loss
from cpl.training import PreferenceConfig, pair_log_probs, train_preference
from cpl.training.data import StepPairRow, tokenize_pairs

from .helpers import pair_rows, write_jsonl

SMALL, LARGE = (0.0, 0.0), (1.0, -1.0)


def _margins(model_dir, ref_dir, rows) -> torch.Tensor:
    """Per pair: log-ratio(chosen) - log-ratio(rejected) of ``model_dir`` against ``ref_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    pairs, _ = tokenize_pairs(
        tokenizer, [StepPairRow.model_validate(r) for r in rows], 4096, append_eos=False, solution_value_scale=None
    )
    out = []
    for d in (model_dir, ref_dir):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        out.append(pair_log_probs(model, pairs, tokenizer.pad_token_id))
    (pc, pr), (rc, rr) = out
    return (pc - rc) - (pr - rr)


def _train(policy_dir, tmp_path, name, group_a, group_b):
    """Group A: plan-step pairs, group B: solution-step pairs (different tokens, so the groups are not coupled
    too tightly through shared parameters); values unscaled so that only the advantages differ."""
    rows_a = pair_rows(4, seed=10, chosen_value=group_a[0], rejected_value=group_a[1])
    rows_b = pair_rows(4, seed=20, chosen_value=group_b[0], rejected_value=group_b[1], kind="solution")
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows_a + rows_b)
    config = PreferenceConfig(
        learning_rate=5e-5,
        epochs=2,
        batch_size=8,
        micro_batch_size=4,
        warmup_ratio=0.0,
        solution_value_scale=1.0,
        progress=False,
    )
    result = train_preference(policy_dir, [data], tmp_path / name, config)
    margins = _margins(result.out_dir, policy_dir, rows_a + rows_b)
    return result, margins[:4].mean().item(), margins[4:].mean().item()


def test_step_apo_widens_margins_more_for_larger_advantages(policy_dir, tmp_path):
    # The same pairs twice, only the values differ: group A has the large advantage in run 1, group B in run 2.
    # Adam normalises the overall gradient scale, so the advantage shows in how the update is shared out.
    run1, a1, b1 = _train(policy_dir, tmp_path, "a_large", LARGE, SMALL)
    _, a2, b2 = _train(policy_dir, tmp_path, "b_large", SMALL, LARGE)
    assert min(a1, b1, a2, b2) > 0, (a1, b1, a2, b2)
    assert a1 > 1.05 * a2, (a1, a2)  # measured: ~1.16x
    assert b2 > 1.3 * b1, (b1, b2)  # measured: ~2.0x
    assert run1.metrics["final_epoch"]["accuracy"] == 1.0
    assert run1.manifest.kind == "step-apo"


def test_reference_is_the_starting_model_and_loss_is_eq12(policy_dir, tmp_path):
    """One step at lr ~0: the logged loss equals eq. 12 with policy = reference (log-ratios 0)."""
    rows = pair_rows(3, seed=5, chosen_value=0.6, rejected_value=-0.2) + pair_rows(
        3, seed=6, chosen_value=1.0, rejected_value=-1.0, kind="solution"
    )
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = PreferenceConfig(learning_rate=1e-12, epochs=1, batch_size=6, micro_batch_size=4, progress=False)
    result = train_preference(policy_dir, [data], tmp_path / "ckpt", config)
    zeros = torch.zeros(6)
    scale = torch.tensor([1.0] * 3 + [0.3] * 3)  # solution-pair values are scaled by 0.3
    values = torch.tensor([[r["chosen_value"], r["rejected_value"]] for r in rows]) * scale[:, None]
    expected = step_apo_loss(zeros, zeros, zeros, zeros, values[:, 0], values[:, 1], beta=0.3).mean()
    assert result.history[0]["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert result.history[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert result.manifest.reference_model == str(policy_dir.resolve())


def test_step_dpo_ignores_values(policy_dir, tmp_path):
    rows = pair_rows(4, seed=7, chosen_value=0.9, rejected_value=-0.9)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = PreferenceConfig(loss="step-dpo", learning_rate=1e-12, epochs=1, batch_size=4, progress=False)
    result = train_preference(policy_dir, [data], tmp_path / "ckpt", config)
    assert result.history[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # -log sigmoid(0)
