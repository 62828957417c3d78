"""Tests for cpl.losses: Step-APO (eq. 12/13), DPO (eq. 7) against TRL, value MSE, solution-value scaling."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from cpl.losses import (
    dpo_loss,
    scale_solution_values,
    step_apo_loss,
    value_mse_loss,
)

# ----------------------------------------------------------------------------------------------------
# TRL reference.
#
# TRL 1.x has no standalone `DPOTrainer.dpo_loss`: the sigmoid loss lives inside
# `DPOTrainer._compute_loss`, which runs the model (with TRL's fused LM head, returning per-token
# `log_probs`) on a [chosen; rejected] batch and returns the batch-mean loss. We call it unbound on a
# minimal `self` carrying only the attributes it reads, with a fake model whose per-token log-probs are
# the summed log-probs we want (one completion token per sequence) and with precomputed reference
# log-probs. Everything after the loss is metric logging, which the stubs absorb.
# ----------------------------------------------------------------------------------------------------


class _FakeFusedLM:
    """Stands in for a model wrapped by TRL's fused LM head: returns fixed per-token log-probs."""

    training = True

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        self.per_token_logps = per_token_logps  # [2B, 1]

    def __call__(self, **_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(self.per_token_logps)
        return SimpleNamespace(
            log_probs=self.per_token_logps,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
        )


def _trl_dpo_sigmoid_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> torch.Tensor:
    """Batch-mean DPO sigmoid loss computed by TRL's own `DPOTrainer._compute_loss`."""
    from trl.trainer.dpo_trainer import DPOTrainer

    batch = pc.shape[0]
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        label_smoothing=0.0,
        use_weighting=False,
        beta=beta,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * batch, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, 2, dtype=torch.long),
        # prompt token + one completion token: the shifted completion mask has exactly one position per row.
        "completion_mask": torch.tensor([[0, 1]] * (2 * batch)),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    model = _FakeFusedLM(torch.cat([pc, pr]).unsqueeze(1))
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _random_logps(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # summed step log-probs: negative, tens of nats
    return tuple(-torch.rand(batch, generator=g, dtype=torch.float64) * 40.0 - 1.0 for _ in range(4))


def _eq13_weight(pc, pr, rc, rr, v_w, v_l, beta):
    """Eq. (13): d loss / d log pi(a_w|s) = -beta * sigmoid(r_l - r_w + V_w - V_l)."""
    r_w = beta * (pc - rc)
    r_l = beta * (pr - rr)
    return -beta * torch.sigmoid(r_l - r_w + v_w - v_l)


# ----------------------------------------------------------------------------------------------------
# Agreement with TRL
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_step_apo_with_zero_values_equals_trl_dpo(beta: float) -> None:
    pc, pr, rc, rr = _random_logps(8, seed=0)
    zeros = torch.zeros_like(pc)
    ours = step_apo_loss(pc, pr, rc, rr, zeros, zeros, beta=beta)
    assert ours.shape == (8,)
    # per pair: one TRL call per pair (TRL returns the batch mean)
    for i in range(8):
        s = slice(i, i + 1)
        trl = _trl_dpo_sigmoid_loss(pc[s], pr[s], rc[s], rr[s], beta)
        assert ours[i].item() == pytest.approx(trl.item(), abs=1e-6)
    # and the batch mean
    assert ours.mean().item() == pytest.approx(_trl_dpo_sigmoid_loss(pc, pr, rc, rr, beta).item(), abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_dpo_loss_equals_trl(beta: float) -> None:
    pc, pr, rc, rr = _random_logps(8, seed=1)
    ours = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert ours.shape == (8,)
    for i in range(8):
        s = slice(i, i + 1)
        trl = _trl_dpo_sigmoid_loss(pc[s], pr[s], rc[s], rr[s], beta)
        assert ours[i].item() == pytest.approx(trl.item(), abs=1e-6)


def test_dpo_loss_default_beta_is_trl_default() -> None:
    from trl import DPOConfig

    pc, pr, rc, rr = _random_logps(4, seed=2)
    trl_beta = DPOConfig.__dataclass_fields__["beta"].default
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr), dpo_loss(pc, pr, rc, rr, beta=trl_beta))


def test_step_apo_values_act_as_reference_shift_in_trl() -> None:
    """Eq. (12) with values equals TRL's DPO with ref logps shifted by V/beta: pins the sign of each value."""
    beta = 0.3
    pc, pr, rc, rr = _random_logps(6, seed=3)
    g = torch.Generator().manual_seed(4)
    v_w = torch.rand(6, generator=g, dtype=torch.float64) * 2 - 1
    v_l = torch.rand(6, generator=g, dtype=torch.float64) * 2 - 1
    ours = step_apo_loss(pc, pr, rc, rr, v_w, v_l, beta=beta)
    for i in range(6):
        s = slice(i, i + 1)
        trl = _trl_dpo_sigmoid_loss(pc[s], pr[s], rc[s] + v_w[s] / beta, rr[s] + v_l[s] / beta, beta)
        assert ours[i].item() == pytest.approx(trl.item(), abs=1e-6)


def test_zero_value_gradients_match_trl_autograd() -> None:
    beta = 0.1
    pc, pr, rc, rr = _random_logps(5, seed=5)
    pc_ours, pr_ours = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo_loss(pc_ours, pr_ours, rc, rr, beta=beta).mean().backward()
    pc_trl, pr_trl = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    _trl_dpo_sigmoid_loss(pc_trl, pr_trl, rc, rr, beta).backward()
    torch.testing.assert_close(pc_ours.grad, pc_trl.grad, atol=1e-9, rtol=0)
    torch.testing.assert_close(pr_ours.grad, pr_trl.grad, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Gradient (eq. 13)
# ----------------------------------------------------------------------------------------------------


def test_gradient_matches_eq13_weight() -> None:
    beta = 0.3
    pc, pr, rc, rr = _random_logps(16, seed=6)
    g = torch.Generator().manual_seed(7)
    v_w = torch.rand(16, generator=g, dtype=torch.float64) * 2 - 1
    v_l = torch.rand(16, generator=g, dtype=torch.float64) * 2 - 1
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    step_apo_loss(pc_, pr_, rc, rr, v_w, v_l, beta=beta).sum().backward()
    weight = _eq13_weight(pc, pr, rc, rr, v_w, v_l, beta)
    assert (weight < 0).all()
    torch.testing.assert_close(pc_.grad, weight, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(pr_.grad, -weight, atol=1e-12, rtol=1e-9)


def test_larger_advantage_gives_larger_gradient_monotonically() -> None:
    beta = 0.3
    n = 41
    pc = torch.full((n,), -12.0, dtype=torch.float64, requires_grad=True)
    pr = torch.full((n,), -15.0, dtype=torch.float64, requires_grad=True)
    rc = torch.full((n,), -13.0, dtype=torch.float64)
    rr = torch.full((n,), -14.0, dtype=torch.float64)
    advantage = torch.linspace(-2.0, 2.0, n, dtype=torch.float64)
    v_l = torch.full((n,), -0.3, dtype=torch.float64)
    v_w = v_l + advantage
    losses = step_apo_loss(pc, pr, rc, rr, v_w, v_l, beta=beta)
    losses.sum().backward()
    chosen_mag = pc.grad.abs()
    rejected_mag = pr.grad.abs()
    assert (torch.diff(chosen_mag) > 0).all()
    assert (torch.diff(rejected_mag) > 0).all()
    # chosen is pushed up, rejected down, for every advantage
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # only the advantage matters, not the level of the values
    shifted = step_apo_loss(pc, pr, rc, rr, v_w + 0.5, v_l + 0.5, beta=beta)
    torch.testing.assert_close(shifted, losses)


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------


def test_step_apo_hand_computed() -> None:
    # beta = 0.3
    # r_w = 0.3 * (-2.0 - (-3.0)) = 0.3
    # r_l = 0.3 * (-4.0 - (-3.5)) = -0.15
    # z   = r_w - V_w - r_l + V_l = 0.3 - 0.6 + 0.15 - 0.2 = -0.35
    # loss = -log sigmoid(-0.35) = log(1 + e^0.35) = log(2.4190675...) = 0.8833821554
    # d loss / d pc = -0.3 * sigmoid(0.35) = -0.3 * 0.5866175789 = -0.1759852737
    pc = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-3.0], dtype=torch.float64)
    rr = torch.tensor([-3.5], dtype=torch.float64)
    v_w = torch.tensor([0.6], dtype=torch.float64)
    v_l = torch.tensor([-0.2], dtype=torch.float64)
    loss = step_apo_loss(pc, pr, rc, rr, v_w, v_l, beta=0.3)
    assert loss.item() == pytest.approx(0.8833821554, abs=1e-9)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1759852737, abs=1e-9)
    assert pr.grad.item() == pytest.approx(0.1759852737, abs=1e-9)
    # DPO on the same log-probs (values 0): z = 0.3 + 0.15 = 0.45, loss = log(1 + e^-0.45) = 0.4932489460
    assert dpo_loss(pc, pr, rc, rr, beta=0.3).item() == pytest.approx(0.4932489460, abs=1e-9)


def test_scale_solution_values() -> None:
    # a solution pair (+1 vs -1, gap 2) becomes +0.3 vs -0.3 (gap 0.6); plan-step values are untouched
    values = torch.tensor([1.0, -1.0, 0.7, -0.1])
    is_solution = torch.tensor([True, True, False, False])
    torch.testing.assert_close(scale_solution_values(values, is_solution), torch.tensor([0.3, -0.3, 0.7, -0.1]))
    torch.testing.assert_close(
        scale_solution_values(values, is_solution, factor=0.5), torch.tensor([0.5, -0.5, 0.7, -0.1])
    )


# ----------------------------------------------------------------------------------------------------
# value_mse_loss
# ----------------------------------------------------------------------------------------------------


def test_value_mse_loss() -> None:
    predicted = torch.tensor([0.5, -0.5, 1.0])
    target = torch.tensor([1.0, 0.0, -1.0])
    # ((-0.5)^2 + (-0.5)^2 + 2^2) / 3 = 4.5 / 3 = 1.5
    loss = value_mse_loss(predicted, target)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(1.5)
    assert value_mse_loss(target, target).item() == 0.0


def test_value_mse_loss_rejects_broadcasting_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        value_mse_loss(torch.zeros(3, 1), torch.zeros(3))
