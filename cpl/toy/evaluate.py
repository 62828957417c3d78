"""Greedy accuracy of a planner on held-out toy problems, through transformers ``generate``.

    python -m cpl.toy.evaluate --model cpl/assets/planner/policy --n 100

The problems are the toy world's held-out ``test`` split (never in a training corpus). The prompt is
``render_prompt(question, [], fmt, few_shot=False)``; generation is greedy and stops at ``<endsolution>`` (plain)
or ``</solution>`` (XML) or the end-of-sequence token; the answer is the last ``\\boxed{}`` (`cpl.grading`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cpl.formats import END_SOLUTION, XML_SOLUTION_CLOSE, PromptFormat, render_prompt
from cpl.grading import extract_answer, is_equivalent
from cpl.toy import world

EVAL_SEED = 1234


@torch.no_grad()
def generate_greedy(
    model_dir: Path | str,
    prompts: Sequence[str],
    fmt: PromptFormat,
    *,
    max_new_tokens: int = 400,
    batch_size: int = 50,
    device: str = "cpu",
) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    stop = END_SOLUTION if fmt is PromptFormat.PLAIN else XML_SOLUTION_CLOSE
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(stop)]
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
        generated = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def evaluate_planner(
    model_dir: Path | str,
    n: int = 100,
    *,
    family: str = "arith",
    seed: int = EVAL_SEED,
    fmt: PromptFormat = PromptFormat.PLAIN,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Greedy accuracy on ``n`` held-out problems of ``family``: ``accuracy``, ``boxed`` (share with an
    answer), for ``arith`` the accuracy with and without an inverted comparison, and the ``samples``."""
    if threads:
        torch.set_num_threads(threads)
    problems = world.generate(family, n, seed=seed, split="test")
    prompts = [render_prompt(p.question, [], fmt, few_shot=False) for p in problems]
    outputs = generate_greedy(model_dir, prompts, fmt, device=device)
    samples = []
    for problem, output in zip(problems, outputs, strict=True):
        predicted = extract_answer(output)
        samples.append(
            {
                "question": problem.question,
                "gold": problem.gold,
                "predicted": predicted,
                "correct": is_equivalent(predicted, problem.gold),
                "trap": bool(world.inverted_comparisons(problem)),
                "output": output,
            }
        )
    result: dict[str, Any] = {
        "family": family,
        "n": n,
        "accuracy": sum(s["correct"] for s in samples) / n,
        "boxed": sum(s["predicted"] is not None for s in samples) / n,
    }
    if family in world.ARITH_GRAMMAR:
        for trap in (False, True):
            group = [s for s in samples if s["trap"] is trap]
            key = "accuracy_with_trap" if trap else "accuracy_without_trap"
            result[key] = sum(s["correct"] for s in group) / len(group) if group else None
            result["n_with_trap" if trap else "n_without_trap"] = len(group)
    result["samples"] = samples
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Greedy accuracy of a toy planner on held-out problems.")
    p.add_argument("--model", type=Path, default=Path("cpl/assets/planner/policy"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--family", default="arith", choices=world.FAMILIES)
    p.add_argument("--format", default="plain", choices=[f.value for f in PromptFormat])
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--show", type=int, default=0, help="print this many generations")
    p.add_argument("--json", type=Path, default=None, help="write the result, samples included, here")
    args = p.parse_args(argv)
    result = evaluate_planner(
        args.model,
        args.n,
        family=args.family,
        seed=args.seed,
        fmt=PromptFormat(args.format),
        device=args.device,
        threads=args.threads,
    )
    for s in result["samples"][: args.show]:
        print(f"--- {'RIGHT' if s['correct'] else 'WRONG'} gold {s['gold']}\n{s['question']}\n{s['output']}\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))


if __name__ == "__main__":
    main()
