"""Training losses: Step-APO (paper eq. 12), DPO (eq. 7), value-model MSE, step log-probs.

All functions are pure torch and return per-pair tensors (shape ``[B]``) unless stated otherwise; the trainer
takes the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

STEP_APO_BETA = 0.3
"""Step-APO beta (paper Table 6)."""

SOLUTION_VALUE_SCALE = 0.3
"""Scale for the values of solution-step pairs (paper §4.1): their value gap is 2, plan steps' 0.6-0.8."""


def step_apo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_values: Tensor,
    rejected_values: Tensor,
    beta: float = STEP_APO_BETA,
) -> Tensor:
    """Per-pair Step-APO loss, eq. (12).

    ``-log sigma( beta*log pi/ref(a_w|s) - V(s'_w) - beta*log pi/ref(a_l|s) + V(s'_l) )``

    The log-probs are summed over the step's tokens. The advantage ``V(s'_w) - V(s'_l)`` is *subtracted*
    inside the sigmoid, so by eq. (13) a pair with a larger advantage gets a larger gradient weight
    ``beta * sigmoid(r_l - r_w + V_w - V_l)``. With all values zero this is DPO's sigmoid loss (eq. 7).
    """
    # eq. (12)
    chosen = beta * (policy_chosen_logps - reference_chosen_logps) - chosen_values
    rejected = beta * (policy_rejected_logps - reference_rejected_logps) - rejected_values
    return -F.logsigmoid(chosen - rejected)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-pair DPO sigmoid loss, eq. (7): Step-APO with all values zero."""
    zeros = torch.zeros_like(policy_chosen_logps)
    return step_apo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        zeros,
        zeros,
        beta=beta,
    )


def scale_solution_values(values: Tensor, is_solution: Tensor, factor: float = SOLUTION_VALUE_SCALE) -> Tensor:
    """Multiply the values of solution-step pairs (``is_solution`` true) by ``factor`` (paper §4.1)."""
    return torch.where(is_solution.bool(), values * factor, values)


def value_mse_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """Scalar mean squared error between predicted values and MCTS values (both in [-1, 1]).

    Shapes must match exactly: a ``[B, 1]`` head output against ``[B]`` targets would silently broadcast.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"shape mismatch: predicted {tuple(predicted.shape)} vs target {tuple(target.shape)}")
    return F.mse_loss(predicted, target.to(predicted.dtype))
