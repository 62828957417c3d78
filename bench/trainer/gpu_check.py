"""GPU check of the trainer: bf16 + DeepSpeed ZeRO-2 + FlashAttention-2 steps of Step-APO, SFT and the value model.

Run by ``bench/gpu_check.sh`` on a machine with one NVIDIA GPU (no internet, no vLLM needed):

    bench/gpu_check.sh              # GPU: DeepSpeed ZeRO-2 when installed, FlashAttention-2 when installed
    bench/gpu_check.sh --cpu-smoke  # the same steps on CPU, fp32, no DeepSpeed (checks the script itself)

It builds a small random-weight Llama locally (``build_tiny_models``, widened), writes a few preference pairs
with the paper's few-shot prompts (~1000 tokens), then checks:

1. step log-probs on the device (bf16, FA2/SDPA) with and without prefix sharing agree with each other and
   with an fp32 CPU reference;
2. one Step-APO optimizer step (2 micro-batches) through ``train_preference``: the runtime is the expected one
   (DeepSpeed/ZeRO stage, attention kernel, bf16), the loss is finite, the weights moved, the checkpoint loads
   with plain transformers on CPU;
3. one SFT step and one value-model step the same way, the value checkpoint scoring like ``transformers_values``;
4. vLLM was never imported.

Prints one PASS/FAIL line per check and a summary; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            start = time.perf_counter()
            try:
                detail = fn() or ""
                ok = True
            except Exception as exc:  # a failed check must not stop the others
                detail = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                ok = False
            detail = f"{detail} ({time.perf_counter() - start:.1f}s)"
            RESULTS.append((name, ok, detail))
            print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
            return detail

        return run

    return wrap


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="run the same steps on CPU in fp32 without DeepSpeed")
    p.add_argument("--hidden-size", type=int, help="model width (default 768 on GPU, 128 on CPU)")
    p.add_argument("--layers", type=int, help="decoder layers (default 6 on GPU, 2 on CPU)")
    p.add_argument("--no-deepspeed", action="store_true", help="GPU without DeepSpeed (bf16 autocast, fp32 weights)")
    p.add_argument(
        "--keep", type=Path, help="write the models and checkpoints here (default: a temporary dir, removed on PASS)"
    )
    args = p.parse_args()

    import torch

    cpu = args.cpu_smoke
    device = "cpu" if cpu else "cuda"
    hidden = args.hidden_size or (128 if cpu else 768)
    layers = args.layers or (2 if cpu else 6)
    from cpl.training.runtime import flash_attn_available

    has_fa2 = flash_attn_available()
    has_ds = importlib.util.find_spec("deepspeed") is not None
    expect_attn = "flash_attention_2" if (has_fa2 and not cpu) else "sdpa"
    expect_ds = has_ds and not cpu and not args.no_deepspeed
    print(
        json.dumps(
            {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "bf16": torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None,
                "flash_attn": has_fa2,
                "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
                "deepspeed": has_ds,
                "mode": "cpu-smoke" if cpu else "gpu",
                "model": {"hidden_size": hidden, "layers": layers},
            }
        ),
        flush=True,
    )
    if not cpu and not torch.cuda.is_available():
        print("[FAIL] cuda: torch.cuda.is_available() is False (use --cpu-smoke on a CPU machine)")
        print("SUMMARY: FAIL (no GPU)")
        return 1

    from cpl.models import build_tiny_models, transformers_values
    from cpl.training import (
        PreferenceConfig,
        SFTConfig,
        ValueConfig,
        pair_log_probs,
        train_preference,
        train_sft,
        train_value,
    )
    from cpl.training.data import StepPairRow, tokenize_pairs

    work = args.keep or Path(tempfile.mkdtemp(prefix="cpl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    policy_dir, value_dir = build_tiny_models(
        work / "models",
        seed=0,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
    )
    data = write_data(work / "data")
    common = dict(
        epochs=1,
        batch_size=8,
        micro_batch_size=4,
        warmup_ratio=0.0,
        device=device,
        precision="fp32" if cpu else "auto",
        deepspeed="off" if (cpu or args.no_deepspeed) else "auto",
        progress=False,
    )

    def expect_runtime(rt: dict) -> str:
        want = {"precision": "fp32" if cpu else "bf16", "attn_implementation": expect_attn}
        want |= {"deepspeed": expect_ds, "zero_stage": 2 if expect_ds else None}
        got = {k: rt[k] for k in want}
        if not rt["device"].startswith(device):
            raise AssertionError(f"device {rt['device']}, expected {device}")
        if got != want:
            raise AssertionError(f"runtime {got}, expected {want}")
        return f"{rt['precision']}, attn={rt['attn_implementation']}, deepspeed={rt['deepspeed']}"

    def changed(before: dict, after_dir: Path) -> float:
        from safetensors.torch import load_file

        after = load_file(str(after_dir / "model.safetensors"))
        return max(float((after[k].float() - v.float()).abs().max()) for k, v in before.items() if k in after)

    def snapshot(model_dir: Path) -> dict:
        from safetensors.torch import load_file

        return load_file(str(model_dir / "model.safetensors"))

    @check("step log-probs on the device (bf16, both layouts) match fp32 CPU")
    def logps() -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cpl.training.runtime import resolve_runtime

        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        rows = [StepPairRow.model_validate(json.loads(x)) for x in data["plan"].read_text().splitlines()]
        pairs, _ = tokenize_pairs(tokenizer, rows, 1 << 20, append_eos=False, solution_value_scale=None)
        ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        rc, rr = pair_log_probs(ref, pairs, tokenizer.pad_token_id, batch_size=4)
        runtime = resolve_runtime(PreferenceConfig(**common))
        dtype = torch.float32 if cpu else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(
            policy_dir, dtype=dtype, attn_implementation=runtime.attn_implementation
        ).to(device)
        worst = 0.0
        for sharing in (True, False):
            c, r = pair_log_probs(model, pairs, tokenizer.pad_token_id, batch_size=4, prefix_sharing=sharing)
            for got, want in ((c, rc), (r, rr)):
                err = float(((got - want).abs() / (want.abs() * 0.02 + 0.5)).max())
                worst = max(worst, err)
        if worst > 1.0:
            raise AssertionError(f"log-probs off by {worst:.2f}x the tolerance (2% + 0.5 nats)")
        return (
            f"attn={runtime.attn_implementation}, worst error {worst:.2f}x tolerance, mean |logp| {rc.abs().mean():.1f}"
        )

    @check("Step-APO step (ZeRO-2/bf16/FA2 as available)")
    def step_apo() -> str:
        before = snapshot(policy_dir)
        config = PreferenceConfig(learning_rate=1e-4, **common)
        if not cpu:
            torch.cuda.reset_peak_memory_stats()
        result = train_preference(policy_dir, [data["plan"], data["solution"]], work / "apo", config, overwrite=True)
        loss = result.history[0]["loss"]
        if not math.isfinite(loss):
            raise AssertionError(f"loss {loss}")
        moved = changed(before, result.out_dir)
        if not moved > 0:
            raise AssertionError("no weight changed")
        load_on_cpu(result.out_dir, "causal")
        m = result.metrics
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if not cpu else ""
        return (
            f"{expect_runtime(result.manifest.runtime)}, loss {loss:.4f}, max |dW| {moved:.2e}, "
            f"{m['tokens_per_second']:.0f} tokens/s{mem}"
        )

    @check("SFT step")
    def sft() -> str:
        config = SFTConfig(learning_rate=1e-4, **common)
        result = train_sft(policy_dir, [data["sft"]], work / "sft", config, overwrite=True)
        loss = result.history[0]["loss"]
        if not math.isfinite(loss):
            raise AssertionError(f"loss {loss}")
        load_on_cpu(result.out_dir, "causal")
        return f"{expect_runtime(result.manifest.runtime)}, loss {loss:.4f}"

    @check("value step + checkpoint scores like transformers_values")
    def value() -> str:
        config = ValueConfig(learning_rate=1e-4, **common)
        result = train_value(value_dir, [data["value"]], work / "value", config, overwrite=True)
        loss = result.history[0]["loss"]
        if not math.isfinite(loss):
            raise AssertionError(f"loss {loss}")
        model = load_on_cpu(result.out_dir, "value")
        from transformers import AutoTokenizer

        from cpl.training import predict_values

        texts = [json.loads(x)["text"] for x in data["value"].read_text().splitlines()[:4]]
        ours = predict_values(model, AutoTokenizer.from_pretrained(result.out_dir), texts, batch_size=4)
        ref = transformers_values(result.out_dir, texts)
        diff = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
        if diff > 1e-4:
            raise AssertionError(f"batched values differ from transformers_values by {diff}")
        return f"{expect_runtime(result.manifest.runtime)}, loss {loss:.4f}, values {[round(v, 3) for v in ref]}"

    @check("vLLM not imported")
    def no_vllm() -> str:
        loaded = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
        if loaded:
            raise AssertionError(f"imported: {loaded[:5]}")
        return "ok"

    for fn in (logps, step_apo, sft, value, no_vllm):
        fn()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"SUMMARY: {'PASS' if not failed else 'FAIL'} ({len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed)")
    for name in failed:
        print(f"  failed: {name}")
    if args.keep is None and not failed:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work dir: {work}")
    return 1 if failed else 0


def load_on_cpu(model_dir: Path, kind: str):
    """The checkpoint must load without flash_attn/DeepSpeed (where vLLM or a CPU box reads it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = json.loads((model_dir / "config.json").read_text())
    if "flash" in json.dumps(config):
        raise AssertionError("config.json mentions flash attention")
    arch = AutoConfig.from_pretrained(model_dir).architectures[0]
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    if kind == "value" and not arch.endswith("ForSequenceClassification"):
        raise AssertionError(f"value checkpoint architecture {arch}")
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    for required in ("manifest.json", "tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / required).is_file():
            raise AssertionError(f"{required} missing")
    return model


def write_data(out: Path) -> dict[str, Path]:
    import random

    from cpl.formats import (
        PromptFormat,
        Step,
        StepKind,
        plan_text,
        render_prompt,
        render_response,
        render_step,
        solution_text,
    )
    from cpl.models.tiny import _arithmetic_example

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    fmt = PromptFormat.PLAIN
    plan, solution, sft, value = [], [], [], []
    for i in range(12):
        question, plans, impl, answer = _arithmetic_example(rng)
        prompt = render_prompt(question, [], fmt, few_shot=True)  # ~1000 tokens: the paper's 2-shot prompt
        wrong = Step(StepKind.PLAN, plan_text(1, "Guess the answer."))
        plan.append(
            {"prompt": prompt, "chosen": render_step(plans[0], fmt), "rejected": render_step(wrong, fmt)}
            | {"chosen_value": 0.4, "rejected_value": -0.3, "kind": "plan"}
        )
        good = Step(StepKind.SOLUTION, solution_text(impl, answer, fmt))
        bad = Step(StepKind.SOLUTION, solution_text(impl[:1], str(int(answer) + 1), fmt))
        solution.append(
            {"prompt": render_prompt(question, plans, fmt, few_shot=True)}
            | {"chosen": render_step(good, fmt), "rejected": render_step(bad, fmt)}
            | {"chosen_value": 1.0, "rejected_value": -1.0, "kind": "solution"}
        )
        sft.append({"prompt": prompt, "response": render_response([*plans, good], fmt)})
        value.append({"text": render_prompt(question, plans[: i % 3], fmt, few_shot=False), "value": 0.5 - i / 12})
    files = {"plan": plan, "solution": solution, "sft": sft, "value": value}
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


if __name__ == "__main__":
    sys.exit(main())
