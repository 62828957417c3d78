"""Tiny models the project builds itself: a local byte-level BPE tokenizer and random-weight Llama/Qwen2.

There is no model hub at run time (docs/architecture.md, environment), so tests and development use these.
The tokenizer keeps every
prompt marker of :data:`cpl.formats.MARKERS` as one *normal* token (a special token would be removed by
``skip_special_tokens`` and the stop strings would never match) and splits digits one by one so that
arithmetic is learnable. The models' head_dim is 64: vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cpl.formats import (
    DEMONSTRATIONS,
    MARKERS,
    PromptFormat,
    Step,
    StepKind,
    demonstration_steps,
    plan_text,
    render_prompt,
    render_response,
    solution_text,
)
from cpl.models.hf import quiet_transformers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
HEAD_DIM = 64

Arch = Literal["llama", "qwen2"]


# --- corpus ----------------------------------------------------------------------------------------------


def _arithmetic_example(rng: random.Random) -> tuple[str, list[Step], list[str], str]:
    """A simple word problem with its plan and solution (numbers are random, the shapes are few)."""
    name = rng.choice(["Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Gina", "Hugo"])
    item = rng.choice(["apples", "books", "coins", "pencils", "stickers", "marbles"])
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    if op == "+":
        question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        plans = [f"Take the starting number of {item}.", "Add the number bought to the starting number."]
        impl = [f"{name} starts with {a} {item}.", f"After buying {b} more, {name} has ${a}+{b}={a + b}$."]
        answer = a + b
    elif op == "-":
        a, b = max(a, b), min(a, b)
        question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        plans = [f"Take the starting number of {item}.", "Subtract the number given away."]
        impl = [f"{name} had {a} {item}.", f"After giving away {b}, {name} has ${a}-{b}={a - b}$ left."]
        answer = a - b
    else:
        a, b = a % 12 + 2, b % 12 + 2
        question = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there?"
        plans = ["Find the number of boxes and the number per box.", "Multiply the two numbers."]
        impl = [f"There are {a} boxes of {b} {item}.", f"In total there are ${a}\\times{b}={a * b}$ {item}."]
        answer = a * b
    return question, [Step(StepKind.PLAN, plan_text(i, p)) for i, p in enumerate(plans, 1)], impl, str(answer)


def default_corpus(num_arithmetic: int = 400, seed: int = 0) -> list[str]:
    """Plan-format text in both prompt formats: the demonstrations and generated arithmetic problems."""
    rng = random.Random(seed)
    corpus: list[str] = []
    for fmt in PromptFormat:
        corpus.append(render_prompt("What is 1+1?", [], fmt, few_shot=True))
        for demo in DEMONSTRATIONS:
            corpus.append(render_prompt(demo.question, [], fmt, few_shot=False))
            corpus.append(render_response(demonstration_steps(demo, fmt), fmt))
    for i in range(num_arithmetic):
        question, plans, impl, answer = _arithmetic_example(rng)
        fmt = PromptFormat.PLAIN if i % 2 == 0 else PromptFormat.XML
        steps = [*plans, Step(StepKind.SOLUTION, solution_text(impl, answer, fmt))]
        corpus.append(render_prompt(question, [], fmt, few_shot=False) + render_response(steps, fmt))
    return corpus


# --- tokenizer -------------------------------------------------------------------------------------------


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus``; markers are single normal tokens, digits are split.

    The total vocabulary (BPE + specials + markers) is at most ``vocab_size``. Encoding adds ``<s>`` in front
    (like Llama tokenizers); ``</s>`` is the end-of-sequence token and ``<pad>`` the padding token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKERS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save as ``tokenizer.json`` + ``tokenizer_config.json``, loadable by transformers 4.x and 5.x and vLLM."""
    tokenizer.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes "TokenizersBackend", unknown to 4.x
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# --- models ----------------------------------------------------------------------------------------------


def _causal_lm_config(
    arch: Arch,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
):
    from transformers import LlamaConfig, Qwen2Config

    if hidden_size // num_heads != HEAD_DIM or hidden_size % num_heads:
        raise ValueError(
            f"head_dim must be {HEAD_DIM} (vLLM CPU attention): hidden_size={hidden_size}, num_heads={num_heads}"
        )
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(head_dim=HEAD_DIM, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown arch {arch!r}")


def build_tiny_models(
    out_dir: Path,
    *,
    arch: Arch = "llama",
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    vocab_size: int = 1024,
    corpus: Iterable[str] | None = None,
) -> tuple[Path, Path]:
    """Write a random-weight policy to ``out_dir/policy`` and its untrained value model to ``out_dir/value``.

    Deterministic under ``seed``. Returns ``(policy_dir, value_dir)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from cpl.models.value_head import make_value_model

    out_dir = Path(out_dir)
    policy_dir, value_dir = out_dir / "policy", out_dir / "value"
    tokenizer = build_tokenizer(default_corpus(seed=seed) if corpus is None else corpus, vocab_size)
    config = _causal_lm_config(
        arch,
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(policy_dir, safe_serialization=True)
    save_tokenizer(tokenizer, policy_dir)
    make_value_model(policy_dir, value_dir, seed=seed)
    return policy_dir, value_dir
