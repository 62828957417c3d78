"""Gradient accumulation: micro-batches (and a short last batch) give the update of the whole batch."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpl.training import PreferenceConfig, SFTConfig
from cpl.training.data import SFTRow, StepPairRow, tokenize_pairs, tokenize_sft
from cpl.training.jobs import PreferenceJob, SFTJob, _pair_forward, _sft_forward
from cpl.training.loop import fit
from cpl.training.runtime import Forward, TrainableModel, resolve_runtime

from .helpers import pair_rows, sft_rows


class _GradRecorder(TrainableModel):
    """Keeps the accumulated gradient of every step (Adam's first step would amplify float noise)."""

    grads: list[torch.Tensor]

    def step(self):
        self.grads = [*getattr(self, "grads", []), torch.cat([p.grad.flatten() for p in self.model.parameters()])]
        return super().step()


def _sft_run(policy_dir, batch_size, micro, n=5):
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    examples, _ = tokenize_sft(tokenizer, [SFTRow.model_validate(r) for r in sft_rows(n, seed=4)], 4096)
    config = SFTConfig(
        learning_rate=1e-3,
        epochs=1,
        batch_size=batch_size,
        micro_batch_size=micro,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_grad_norm=None,
        shuffle=False,
        progress=False,
    )
    runtime = resolve_runtime(config)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    engine = _GradRecorder(Forward(model, _sft_forward), config, runtime, config.total_steps(n))
    history, _ = fit(SFTJob(examples, tokenizer.pad_token_id, runtime.torch_device), engine, config)
    return engine.grads, history


def test_sft_micro_batches_match_one_batch(policy_dir):
    whole, h1 = _sft_run(policy_dir, batch_size=5, micro=5)
    split, h2 = _sft_run(policy_dir, batch_size=5, micro=2)  # 2 + 2 + 1
    assert len(h1) == len(h2) == 1
    assert abs(h1[0]["loss"] - h2[0]["loss"]) < 1e-5
    assert whole[0].abs().max() > 0
    torch.testing.assert_close(whole[0], split[0], rtol=1e-4, atol=1e-6)


def test_partial_last_batch_is_a_mean_over_its_examples(policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    rows = [StepPairRow.model_validate(r) for r in pair_rows(5, seed=8, chosen_value=0.4, rejected_value=-0.4)]
    pairs, _ = tokenize_pairs(tokenizer, rows, 4096, append_eos=False, solution_value_scale=1.0)
    config = PreferenceConfig(learning_rate=1e-12, epochs=1, batch_size=4, micro_batch_size=3, progress=False)
    runtime = resolve_runtime(config)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    engine = TrainableModel(Forward(model, _pair_forward), config, runtime, config.total_steps(5))
    job = PreferenceJob(pairs, config, tokenizer.pad_token_id, runtime.torch_device)
    job.compute_reference(engine, 2)
    history, metrics = fit(job, engine, config)
    assert [h["examples"] for h in history] == [4, 1]
    # with policy = reference every pair's loss is -log sigmoid(-(Vw - Vl)) whatever the batch size
    expected = float(torch.nn.functional.softplus(torch.tensor(0.8)))
    assert all(abs(h["loss"] - expected) < 1e-4 for h in history)
    assert metrics["examples_seen"] == 5


def test_gradient_checkpointing_gives_the_same_gradient(policy_dir):
    """With checkpointing the trainer drops prefix sharing (no KV cache in training); the gradient is unchanged."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    rows = [StepPairRow.model_validate(r) for r in pair_rows(4, seed=9, chosen_value=0.3, rejected_value=-0.6)]
    pairs, _ = tokenize_pairs(tokenizer, rows, 4096, append_eos=False, solution_value_scale=1.0)
    grads = []
    for checkpointing in (False, True):
        config = PreferenceConfig(
            learning_rate=1e-3, epochs=1, batch_size=4, gradient_checkpointing=checkpointing, progress=False
        )
        runtime = resolve_runtime(config)
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine = _GradRecorder(Forward(model, _pair_forward), config, runtime, 1)
        job = PreferenceJob(pairs, config, tokenizer.pad_token_id, runtime.torch_device)
        assert job.prefix_sharing is not checkpointing and job.reference_prefix_sharing
        job.compute_reference(engine, 4)
        fit(job, engine, config)
        grads.append(engine.grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
