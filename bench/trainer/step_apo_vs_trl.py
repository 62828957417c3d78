"""Step-APO training throughput and peak memory: cpl's trainer against TRL's DPOTrainer, on CPU.

Both train the same random-weight Llama (built by ``build_tiny_models``, widened to make the timing
meaningful) on the same preference pairs, with the same batch size, micro-batch size, learning rate, schedule
and beta, with the reference log-probs precomputed once (TRL: ``precompute_ref_log_probs=True``). Each run is a
fresh subprocess; cpl and TRL runs alternate so machine load drifts hit both; the figures are medians.

Throughput = the tokens a plain implementation processes (prompt + chosen and prompt + rejected per pair, as
tokenised by cpl; TRL's own count agrees) / wall time. ``train`` times the training loop only (cpl: ``fit``,
TRL: ``trainer.train()``); ``job`` adds the set-up: tokenisation, model load and the reference pass (TRL does
those in ``DPOTrainer.__init__``). Neither saves a checkpoint. ``train_cpu_s`` (the training loop's CPU
time) and ``load_avg_1m`` are checks on wall times taken on a shared machine.

Memory = peak resident set size (RSS), sampled every 5 ms by a thread, above a baseline taken after the imports
(``job``) or right before the training loop (``train``); freed heap is handed back to the OS (``malloc_trim``)
before each baseline so one phase's leftovers do not hide the next phase's use. ``ru_maxrss`` (the whole
process's peak, imports included) is reported too.

    .venv/bin/python bench/trainer/step_apo_vs_trl.py --runs 5 --scenario few-shot
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "runs" / "bench_trainer"

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688)


# --- data and model ----------------------------------------------------------------------------------------


def build_inputs(scenario: str, num_pairs: int) -> tuple[Path, Path]:
    """(model_dir, pairs.jsonl); the pairs carry an explicit eos so TRL and cpl score the same tokens."""
    sys.path.insert(0, str(ROOT))
    from cpl.formats import PromptFormat, Step, StepKind, plan_text, render_prompt, render_step, solution_text
    from cpl.models.tiny import _arithmetic_example, build_tiny_models

    model_root = WORK / "model"
    if not (model_root / "policy" / "config.json").is_file():
        build_tiny_models(model_root, seed=0, **MODEL)
    few_shot = scenario == "few-shot"
    rng = random.Random(0)
    fmt = PromptFormat.PLAIN
    rows = []
    for i in range(num_pairs):
        question, plans, impl, answer = _arithmetic_example(rng)
        if i % 2 == 0:  # plan-step pair at depth 1 or 2
            k = i % 4 // 2
            prompt = render_prompt(question, plans[:k], fmt, few_shot=few_shot)
            chosen = render_step(plans[k], fmt)
            rejected = render_step(Step(StepKind.PLAN, plan_text(k + 1, "Guess the answer from the question.")), fmt)
            kind, values = "plan", (0.4, -0.35)
        else:  # solution-step pair
            prompt = render_prompt(question, plans, fmt, few_shot=few_shot)
            chosen = render_step(Step(StepKind.SOLUTION, solution_text(impl, answer, fmt)), fmt)
            wrong = str(int(answer) + rng.randint(1, 9))
            rejected = render_step(Step(StepKind.SOLUTION, solution_text(impl[:1], wrong, fmt)), fmt)
            kind, values = "solution", (1.0, -1.0)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen + "</s>",
                "rejected": rejected + "</s>",
                "chosen_value": values[0],
                "rejected_value": values[1],
                "kind": kind,
            }
        )
    data = WORK / f"pairs-{scenario}-{num_pairs}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_root / "policy", data


# --- one run (subprocess) ------------------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds; ``mark()`` starts a new phase."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def mark(self) -> tuple[int, int]:
        """(peak so far, current RSS after returning freed heap to the OS); resets the peak."""
        peak = max(self.peak, self.rss())
        trim_heap()
        now = self.rss()
        self.peak = now
        return peak, now

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def trim_heap() -> None:
    """glibc keeps freed memory; give it back so a phase's baseline is not inflated by the previous phase."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def setup_cpl(model_dir: Path, data: Path, args: argparse.Namespace):
    """Everything before the training loop (as ``fit_preference``): rows, tokens, model, engine, reference."""
    sys.path.insert(0, str(ROOT))
    import torch

    from cpl.training import PreferenceConfig
    from cpl.training.data import StepPairRow, read_rows, tokenize_pairs
    from cpl.training.jobs import PreferenceJob, _pair_forward, load_policy, load_tokenizer
    from cpl.training.loop import fit
    from cpl.training.runtime import Forward, TrainableModel, resolve_runtime

    config = PreferenceConfig(
        loss="step-apo",
        learning_rate=1e-6,
        epochs=args.epochs,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        reference_batch_size=2 * args.micro_batch_size,
        max_length=1_000_000,
        progress=False,
        prefix_sharing=not args.no_prefix_sharing,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    rows, _ = read_rows([data], StepPairRow)
    tokenizer = load_tokenizer(model_dir)
    pairs, _ = tokenize_pairs(tokenizer, rows, config.max_length, append_eos=False, solution_value_scale=0.3)
    runtime = resolve_runtime(config)
    torch.manual_seed(0)
    model = load_policy(model_dir, runtime, gradient_checkpointing=config.gradient_checkpointing)
    engine = TrainableModel(Forward(model, _pair_forward), config, runtime, config.total_steps(len(pairs)))
    job = PreferenceJob(pairs, config, tokenizer.pad_token_id, runtime.torch_device)
    job.compute_reference(engine, config.reference_batch_size)

    def train() -> dict:
        _, metrics = fit(job, engine, config)
        return {"tokens": metrics["tokens_seen"], "final_loss": metrics["final_step_loss"]}

    return train


def setup_trl(model_dir: Path, data: Path, args: argparse.Namespace):
    """Everything before ``trainer.train()``: TRL tokenises and precomputes the reference in ``__init__``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=str(WORK / "trl_out"),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        num_train_epochs=args.epochs,
        learning_rate=1e-6,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        beta=0.3,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2 * args.micro_batch_size,
        max_length=None,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is True
    )
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset)

    def train() -> dict:
        out = trainer.train()
        return {"final_loss": out.training_loss}

    return train


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(impl: str, args: argparse.Namespace) -> None:
    os.environ["TQDM_DISABLE"] = "1"
    model_dir, data = Path(args.model_dir), Path(args.data)
    # import each stack (transformers' lazy Auto classes included) before the baseline
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if impl == "trl":
        import datasets  # noqa: F401
        import trl  # noqa: F401
    else:
        sys.path.insert(0, str(ROOT))
        import cpl.training.jobs  # noqa: F401
    trim_heap()
    with PeakRSS() as rss:
        start_rss = rss.rss()
        t0 = time.perf_counter()
        train = setup_trl(model_dir, data, args) if impl == "trl" else setup_cpl(model_dir, data, args)
        setup_peak, before_train = rss.mark()
        t1, c1 = time.perf_counter(), _cpu()
        result = train()
        t2, c2 = time.perf_counter(), _cpu()
    result |= {
        "impl": impl,
        "setup_s": t1 - t0,
        "train_s": t2 - t1,
        "job_s": t2 - t0,
        "train_peak_rss_delta_mib": (rss.peak - before_train) / 2**20,
        "job_peak_rss_delta_mib": (max(setup_peak, rss.peak) - start_rss) / 2**20,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_cpu_s": c2 - c1,
        "load_avg_1m": os.getloadavg()[0],
    }
    print("RESULT " + json.dumps(result))


# --- driver ----------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["few-shot", "short"], default="few-shot")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads per run (default 1: on a shared 2-core machine 2 threads stall at every barrier)",
    )
    p.add_argument("--no-prefix-sharing", action="store_true", help="cpl without prefix sharing")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both with gradient checkpointing (TRL's DPOConfig default; cpl then runs without prefix sharing)",
    )
    p.add_argument(
        "--mmap-threshold",
        type=int,
        help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the runs: big buffers are then mmapped and returned on free, so "
        "RSS follows the live tensors instead of glibc's heap retention (default: glibc's dynamic threshold)",
    )
    p.add_argument("--one", choices=["cpl", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args.one, args)
        return

    WORK.mkdir(parents=True, exist_ok=True)
    model_dir, data = build_inputs(args.scenario, args.pairs)
    common = ["--model-dir", str(model_dir), "--data", str(data), "--batch-size", str(args.batch_size)]
    common += ["--micro-batch-size", str(args.micro_batch_size), "--epochs", str(args.epochs)]
    if args.no_prefix_sharing:
        common.append("--no-prefix-sharing")
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    results: dict[str, list[dict]] = {"cpl": [], "trl": []}
    for i in range(args.runs):
        for impl in ("cpl", "trl") if i % 2 == 0 else ("trl", "cpl"):
            env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            proc = subprocess.run(
                [sys.executable, __file__, "--one", impl, *common],
                capture_output=True,
                text=True,
                check=False,
                env=env,
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{impl} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT ") :])
            results[impl].append(r)
            print(
                f"run {i + 1} {impl}: train {r['train_s']:.2f}s job {r['job_s']:.2f}s "
                f"train peak RSS +{r['train_peak_rss_delta_mib']:.0f} MiB "
                f"job peak RSS +{r['job_peak_rss_delta_mib']:.0f} MiB",
                flush=True,
            )
    tokens = results["cpl"][0]["tokens"]
    keys = ("train_s", "job_s", "train_peak_rss_delta_mib", "job_peak_rss_delta_mib", "ru_maxrss_mib", "train_cpu_s")
    med = {impl: {key: statistics.median(r[key] for r in rs) for key in keys} for impl, rs in results.items()}
    summary = {
        "scenario": args.scenario,
        "pairs": args.pairs,
        "tokens": tokens,
        "settings": {k: getattr(args, k) for k in ("batch_size", "micro_batch_size", "epochs", "runs", "threads")}
        | {"gradient_checkpointing": args.gradient_checkpointing, "prefix_sharing": not args.no_prefix_sharing}
        | {"mmap_threshold": args.mmap_threshold},
        "model": MODEL,
        "median": med,
        "train_tokens_per_s": {impl: tokens / m["train_s"] for impl, m in med.items()},
        "job_tokens_per_s": {impl: tokens / m["job_s"] for impl, m in med.items()},
        "train_speedup": med["trl"]["train_s"] / med["cpl"]["train_s"],
        "job_speedup": med["trl"]["job_s"] / med["cpl"]["job_s"],
        "train_peak_rss_ratio": med["cpl"]["train_peak_rss_delta_mib"] / med["trl"]["train_peak_rss_delta_mib"],
        "job_peak_rss_ratio": med["cpl"]["job_peak_rss_delta_mib"] / med["trl"]["job_peak_rss_delta_mib"],
        "runs": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    suffix = ("-gc" if args.gradient_checkpointing else "") + ("-mmap" if args.mmap_threshold else "")
    out = WORK / f"result-{args.scenario}{suffix}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
