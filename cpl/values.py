"""The value transform: the one place that turns a value head's logit into V in [-1, 1].

The value model's score head outputs a logit; V = tanh(logit), clamped to [-1, 1] (tanh stays inside it, the
clamp makes the bound hold exactly for numbers that arrive from elsewhere: a value service, a stored tree).
Every consumer (the transformers reference, the offline engine, the value gateway, the trainer, the search and
the exported labels) calls these functions. No torch import here: the services use it without torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from torch import Tensor

V_MIN, V_MAX = -1.0, 1.0


def clamp_value(v: float) -> float:
    """``v`` clamped to [-1, 1]."""
    return min(V_MAX, max(V_MIN, v))


@overload
def value_from_logit(x: float) -> float: ...
@overload
def value_from_logit(x: Tensor) -> Tensor: ...
def value_from_logit(x: float | Tensor) -> float | Tensor:
    """V = tanh(logit), clamped to [-1, 1]; for a float or (elementwise) a torch tensor."""
    if isinstance(x, int | float):
        return clamp_value(math.tanh(x))
    return x.tanh().clamp(V_MIN, V_MAX)
