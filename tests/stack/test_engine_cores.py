"""``cpl up`` gives the policy and the value engine cores of their own (vLLM's auto binding would give both the
same ones), covering every core, never overlapping."""

from __future__ import annotations

import pytest

from services.stack.up import engine_cores


def _cores(spec: str) -> set[int]:
    first, _, last = spec.partition("-")
    return set(range(int(first), int(last or first) + 1))


@pytest.mark.parametrize("cpus", [2, 3, 4, 5, 8, 16, 64])
def test_policy_and_value_get_disjoint_cores_that_cover_the_machine(cpus):
    policy, value = _cores(engine_cores("policy", cpus)), _cores(engine_cores("value", cpus))
    assert policy and value and not policy & value
    assert policy | value == set(range(cpus))
    assert len(policy) >= len(value)  # generation is the bigger share of the work


def test_one_core_is_shared():
    assert engine_cores("policy", 1) == engine_cores("value", 1) == "0"
