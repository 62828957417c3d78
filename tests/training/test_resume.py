"""Resumable training: a run interrupted after a saved step and restarted ends with the same weights, log and
metrics as the uninterrupted run."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from cpl.training import PreferenceConfig, SFTConfig, TrainingInputError, train_preference, train_sft
from cpl.training.resume import FitHooks, TrainState

from .helpers import pair_rows, sft_rows, write_jsonl


class Interrupted(Exception):
    pass


def _stop_at(step: int):
    def on_step(record, total):
        if record["step"] == step:
            raise Interrupted

    return on_step


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _assert_same_run(a, b):
    wa, wb = _weights(a.out_dir), _weights(b.out_dir)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] == wb[name]).all(), name
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert a.metrics["epochs"] == b.metrics["epochs"]
    assert a.metrics["tokens_seen"] == b.metrics["tokens_seen"]


@pytest.mark.parametrize("stop", [5, 3])  # mid-epoch, and exactly on an epoch's last step (3 steps per epoch)
def test_sft_resumed_equals_uninterrupted(policy_dir, tmp_path, stop):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(6, seed=3))
    config = SFTConfig(learning_rate=1e-3, epochs=3, batch_size=2, micro_batch_size=1, progress=False)
    full = train_sft(policy_dir, [data], tmp_path / "full", config)

    state = TrainState(tmp_path / "state", every=3)
    with pytest.raises(Interrupted):
        train_sft(policy_dir, [data], tmp_path / "resumed", config, hooks=FitHooks(state, _stop_at(stop + 1)))
    assert state.saved_step == 3
    assert not (tmp_path / "resumed").exists()
    restarted = FitHooks(TrainState(state.directory, every=3))
    resumed = train_sft(policy_dir, [data], tmp_path / "resumed", config, hooks=restarted)
    assert resumed.metrics["resumed_from_step"] == 3
    assert resumed.metrics["steps"] == full.metrics["steps"] == 9
    _assert_same_run(full, resumed)


def test_step_apo_resumed_equals_uninterrupted(policy_dir, tmp_path):
    """The reference log-probs come from the starting model, not from the restored weights."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6, seed=4, chosen_value=0.8, rejected_value=-0.5))
    config = PreferenceConfig(learning_rate=1e-3, epochs=2, batch_size=2, micro_batch_size=2, progress=False)
    full = train_preference(policy_dir, [data], tmp_path / "full", config)
    state = TrainState(tmp_path / "state", every=2)
    with pytest.raises(Interrupted):
        train_preference(policy_dir, [data], tmp_path / "resumed", config, hooks=FitHooks(state, _stop_at(4)))
    resumed = train_preference(policy_dir, [data], tmp_path / "resumed", config, hooks=FitHooks(state))
    assert resumed.metrics["resumed_from_step"] == 2
    _assert_same_run(full, resumed)


def test_a_state_of_another_run_is_refused(policy_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4, seed=5))
    config = SFTConfig(learning_rate=1e-3, epochs=2, batch_size=1, progress=False)
    state = TrainState(tmp_path / "state", every=2)
    with pytest.raises(Interrupted):
        train_sft(policy_dir, [data], tmp_path / "a", config, hooks=FitHooks(state, _stop_at(3)))
    other = config.model_copy(update={"learning_rate": 2e-3})
    with pytest.raises(TrainingInputError, match="another run"):
        train_sft(policy_dir, [data], tmp_path / "b", other, hooks=FitHooks(state))
    with pytest.raises(TrainingInputError, match="positive"):
        TrainState(tmp_path / "x", every=0)
