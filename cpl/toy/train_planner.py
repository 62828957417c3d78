"""Train the embedded default planner: a tiny Llama, from scratch, on CPU, on the toy world's plan solutions.

    python -m cpl.toy.train_planner --out cpl/assets/planner --minutes 40 --seed 0

The corpus is regenerated deterministically from ``--seed``: training-split problems (``arith`` and a minority of
the shared-grammar families, `SHARED_GRAMMAR_SHARE`),
each with one solution of the noisy demonstrator (`cpl.toy.world.demonstrator_solution`, so imperfect plans
are in it), rendered as ``render_prompt(question, [], fmt, few_shot=False) + render_response(steps, fmt)`` and
the end-of-sequence token, half in the plain and half in the XML format; the loss is on the response tokens
only. The tokenizer is a byte-level BPE trained on toy text (digits split one by one, every marker of
`cpl.formats.MARKERS` one normal token). The model has head_dim 64 so vLLM's CPU attention serves it.

With ``--minutes`` the learning-rate schedule runs on wall-clock time (the run ends on time however busy the
machine is); with ``--steps`` it runs on steps (bit-for-bit repeatable on the same machine and thread count).
Afterwards the policy is written to ``OUT/policy``, an untrained value model to ``OUT/value`` and the greedy
accuracy (`cpl.toy.evaluate`) to ``OUT/MODEL_CARD.md`` and ``OUT/training.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cpl.formats import PromptFormat, few_shot_header, render_prompt, render_response
from cpl.toy import world

logger = logging.getLogger(__name__)

HEAD_DIM = 64


@dataclass
class PlannerTrainingConfig:
    seed: int = 0
    minutes: float | None = 40.0
    steps: int | None = None
    layers: int = 4
    hidden: int = 256
    intermediate: int = 768
    vocab_size: int = 1024
    batch_tokens: int = 4096
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1
    threads: int = 2
    device: str = "cpu"
    bf16: bool = True
    """bfloat16 autocast (float32 master weights): about 3x faster on CPUs with AVX512-BF16."""
    eval_n: int = 200
    eval_ood_n: int = 50
    corpus_problems: int = 150_000
    max_position_embeddings: int = 2048


# ----------------------------------------------------------------------------------------------- corpus


SHARED_GRAMMAR_SHARE = 0.15
"""Share of the corpus from the out-of-domain families that share the in-domain grammar (`world.SHARED_GRAMMAR`,
split evenly): enough for the planner to read their surface, a minority so that they stay out of domain."""


def corpus_problems(n: int, seed: int) -> list[world.ToyProblem]:
    """The corpus's problems: training-split ``arith`` and a `SHARED_GRAMMAR_SHARE` of the shared-grammar
    families, interleaved (seeded)."""
    per_family = round(n * SHARED_GRAMMAR_SHARE / len(world.SHARED_GRAMMAR))
    problems = world.generate("arith", n - per_family * len(world.SHARED_GRAMMAR), seed=seed, split="train")
    for family in world.SHARED_GRAMMAR:
        problems += world.generate(family, per_family, seed=seed, split="train")
    random.Random(f"cpl.toy.corpus-order:{seed}").shuffle(problems)
    return problems


def corpus_examples(n: int, seed: int) -> Iterator[tuple[str, str]]:
    """``(prompt, response)`` pairs of the training corpus, deterministic under ``seed``."""
    problems = corpus_problems(n, seed)
    rng = random.Random(f"cpl.toy.corpus:{seed}")
    for i, problem in enumerate(problems):
        fmt = PromptFormat.PLAIN if i % 2 == 0 else PromptFormat.XML
        steps = world.demonstrator_solution(problem, fmt, rng)
        yield render_prompt(problem.question, [], fmt, few_shot=False), render_response(steps, fmt)


def tokenizer_corpus(seed: int) -> list[str]:
    """Text the BPE is trained on: corpus examples and the few-shot headers (not the other out-of-domain families,
    so that editing those never changes the shipped model's tokenizer)."""
    texts = [p + r for p, r in corpus_examples(3000, seed + 1)]
    return texts + [few_shot_header(fmt) for fmt in PromptFormat]


def build_planner_tokenizer(seed: int, vocab_size: int):
    from cpl.models.tiny import build_tokenizer

    return build_tokenizer(tokenizer_corpus(seed), vocab_size=vocab_size)


def encode_examples(tokenizer, examples: Iterable[tuple[str, str]], chunk: int = 4096) -> list[tuple[np.ndarray, int]]:
    """Token ids of ``prompt + response + eos`` (prompt and response tokenised apart, as a server would see
    them) and the prompt length (no loss there)."""
    eos = tokenizer.eos_token_id
    encoded: list[tuple[np.ndarray, int]] = []
    iterator = iter(examples)
    while part := list(itertools.islice(iterator, chunk)):
        prompts = tokenizer([p for p, _ in part], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r for _, r in part], add_special_tokens=False)["input_ids"]
        encoded += [(np.array(p + r + [eos], dtype=np.int32), len(p)) for p, r in zip(prompts, responses, strict=True)]
    return encoded


def batches(
    encoded: Sequence[tuple[np.ndarray, int]], batch_tokens: int, pad_id: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless length-bucketed padded batches of about ``batch_tokens`` tokens: (input_ids, mask, labels)."""
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), 4096):
            chunk = sorted(order[start : start + 4096], key=lambda i: len(encoded[i][0]))
            groups, group, longest = [], [], 0
            for i in chunk:
                length = len(encoded[i][0])
                if group and max(longest, length) * (len(group) + 1) > batch_tokens:
                    groups.append(group)
                    group, longest = [], 0
                group.append(i)
                longest = max(longest, length)
            if group:
                groups.append(group)
            rng.shuffle(groups)
            for g in groups:
                width = max(len(encoded[i][0]) for i in g)
                ids = torch.full((len(g), width), pad_id, dtype=torch.long)
                labels = torch.full((len(g), width), -100, dtype=torch.long)
                mask = torch.zeros((len(g), width), dtype=torch.long)
                for row, i in enumerate(g):
                    seq, prompt_len = encoded[i]
                    ids[row, : len(seq)] = torch.from_numpy(seq)
                    mask[row, : len(seq)] = 1
                    labels[row, prompt_len : len(seq)] = torch.from_numpy(seq[prompt_len:])
                yield ids, mask, labels


# ------------------------------------------------------------------------------------------------ model


def make_config(tokenizer, cfg: PlannerTrainingConfig):
    from transformers import LlamaConfig

    if cfg.hidden % HEAD_DIM:
        raise ValueError(f"hidden size must be a multiple of head_dim {HEAD_DIM} (vLLM CPU attention)")
    heads = cfg.hidden // HEAD_DIM
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _lr_factor(progress: float, step: int, cfg: PlannerTrainingConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: PlannerTrainingConfig, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    if cfg.minutes is None and cfg.steps is None:
        raise ValueError("give --minutes or --steps")
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    policy_dir = out / "policy"

    t0 = time.time()
    tokenizer = build_planner_tokenizer(cfg.seed, cfg.vocab_size)
    encoded = encode_examples(tokenizer, corpus_examples(cfg.corpus_problems, cfg.seed))
    n_tokens = sum(len(s) for s, _ in encoded)
    logger.info(
        "corpus: %d examples, %d tokens (%.0f per example), vocab %d, built in %.0f s",
        len(encoded),
        n_tokens,
        n_tokens / len(encoded),
        len(tokenizer),
        time.time() - t0,
    )

    model = AutoModelForCausalLM.from_config(make_config(tokenizer, cfg), dtype=torch.float32).to(cfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters", n_params)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    batch_iter = batches(encoded, cfg.batch_tokens, tokenizer.pad_token_id, random.Random(cfg.seed))

    model.train()
    start = time.time()
    step, seen_tokens, loss_ema = 0, 0, None
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else None
    while True:
        elapsed = time.time() - start
        if cfg.steps is not None and step >= cfg.steps:
            break
        if budget_s is not None and elapsed >= budget_s:
            break
        progress = step / cfg.steps if cfg.steps is not None else elapsed / budget_s  # type: ignore[operator]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(progress, step, cfg)
        ids, mask, labels = (t.to(cfg.device) for t in next(batch_iter))
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen_tokens += int(mask.sum())
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 50 == 0:
            logger.info(
                "step %d  loss %.4f  lr %.2e  %.1f min  %.2fM tokens  %.0f tok/s",
                step,
                loss_ema,
                optimizer.param_groups[0]["lr"],
                (time.time() - start) / 60,
                seen_tokens / 1e6,
                seen_tokens / (time.time() - start),
            )
    train_s = time.time() - start
    logger.info("trained %d steps, %.2fM tokens in %.1f min", step, seen_tokens / 1e6, train_s / 60)

    model = model.to("cpu").eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(policy_dir, safe_serialization=True)
    tokenizer.save_pretrained(policy_dir)

    from cpl.models.value_head import make_value_model

    make_value_model(policy_dir, out / "value", seed=cfg.seed)
    return {
        "config": asdict(cfg),
        "parameters": n_params,
        "steps": step,
        "train_minutes": round(train_s / 60, 2),
        "train_tokens": seen_tokens,
        "corpus_examples": len(encoded),
        "corpus_tokens": n_tokens,
        "final_loss": round(loss_ema or float("nan"), 4),
        "vocab": len(tokenizer),
    }


# -------------------------------------------------------------------------------------------- reporting


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def write_model_card(out: Path, info: dict, results: dict, command: str) -> None:
    policy, value = out / "policy", out / "value"
    cfg = info["config"]

    def split(r: dict) -> str:
        if r.get("n_with_trap") is None:
            return "n/a"
        return (
            f"{_pct(r.get('accuracy_without_trap'))} of {r['n_without_trap']} / "
            f"{_pct(r.get('accuracy_with_trap'))} of {r['n_with_trap']}"
        )

    rows = "\n".join(
        f"| {name} | {r['n']} | {r['accuracy']:.1%} | {r['boxed']:.1%} | {split(r)} |" for name, r in results.items()
    )
    text = f"""# Embedded default planner (toy world)

A tiny Llama trained from scratch on CPU on the toy world's plan-formatted solutions (`cpl.toy.world`,
`docs/toy-world.md`). It is the project's default model when no other checkpoint is configured: `policy/` is
the causal LM, `value/` the same backbone with an untrained scalar `score` head (`cpl.models.value_head`).

It was trained on prompts **without** the few-shot demonstrations:
`render_prompt(question, [], fmt, few_shot=False)` in both formats (plain and XML); use `few_shot=False`.

## Training

    {command}

| | |
| --- | --- |
| parameters | {info["parameters"]:,} ({cfg["layers"]} layers, hidden {cfg["hidden"]}, \
{cfg["hidden"] // HEAD_DIM} heads of 64, MLP {cfg["intermediate"]}, vocab {info["vocab"]}) |
| training | {info["steps"]} steps, {info["train_tokens"] / 1e6:.1f}M tokens, {info["train_minutes"]} min on \
{cfg["threads"]} CPU threads (device {cfg["device"]}, bf16 autocast {cfg["bf16"]}) |
| corpus | {info["corpus_examples"]:,} examples ({info["corpus_tokens"] / 1e6:.1f}M tokens) of the noisy \
demonstrator, seed {cfg["seed"]} |
| final training loss | {info["final_loss"]} (response tokens) |
| size | policy {_size_mb(policy):.1f} MB, value {_size_mb(value):.1f} MB (float32 safetensors) |

## Base accuracy (greedy, plain format, held-out test split)

    python -m cpl.toy.evaluate --model {policy} --n {results.get("arith", {}).get("n", 100)}

| family | problems | accuracy | answered (boxed) | without / with an inverted comparison |
| --- | --- | --- | --- | --- |
{rows}

`arith` is in-domain. `heights` and `money` share its grammar on another surface and are a minority
({SHARED_GRAMMAR_SHARE:.0%}) of the corpus, never CPL's training problems; `ages`, `units` and `sequence` were
never trained on (add `--family units` etc. to the command; docs/toy-world.md).
 An inverted comparison ("Ann has 3 more apples than Ben" with Ann the one known) is the critical
plan step of the toy world, which the training corpus's demonstrator misreads 60% of the time.
"""
    (out / "MODEL_CARD.md").write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("cpl/assets/planner"))
    p.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (default 40)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    p.add_argument("--seed", type=int, default=0)
    for name in ("layers", "hidden", "intermediate", "vocab_size", "batch_tokens", "threads", "eval_n", "eval_ood_n"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(PlannerTrainingConfig, name))
    p.add_argument("--corpus-problems", type=int, default=PlannerTrainingConfig.corpus_problems)
    p.add_argument("--lr", type=float, default=PlannerTrainingConfig.lr)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in plain float32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    minutes = args.minutes if args.minutes is not None or args.steps is not None else 40.0
    cfg = PlannerTrainingConfig(
        seed=args.seed,
        minutes=minutes,
        steps=args.steps,
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        vocab_size=args.vocab_size,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        threads=args.threads,
        device=args.device,
        bf16=args.bf16,
        eval_n=args.eval_n,
        eval_ood_n=args.eval_ood_n,
        corpus_problems=args.corpus_problems,
    )
    info = train(cfg, args.out)

    from cpl.toy.evaluate import evaluate_planner

    results = {"arith": evaluate_planner(args.out / "policy", n=cfg.eval_n, family="arith", device=cfg.device)}
    for family in world.OUT_OF_DOMAIN:
        if cfg.eval_ood_n:
            results[family] = evaluate_planner(args.out / "policy", n=cfg.eval_ood_n, family=family, device=cfg.device)
    summary = {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
    logger.info("accuracy: %s", json.dumps(summary))
    command = "python -m cpl.toy.train_planner " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (args.out / "training.json").write_text(json.dumps({**info, "eval": summary, "command": command}, indent=2))
    write_model_card(args.out, info, summary, command)


if __name__ == "__main__":
    main()
