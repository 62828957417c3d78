"""``python -m services.trainer.run SPEC.json``: run one training job (a :class:`TrainingSpec` as JSON) with the
``CPL_TRAINER_*`` settings, resuming it if it was interrupted; prints the published manifest's summary.

Exit codes: 0 done, 2 bad input (the message says what), 1 anything else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from cpl.training.data import TrainingInputError
from services.trainer.checkpoints import CheckpointNameError
from services.trainer.jobs import TrainingSpec, run_training
from services.trainer.settings import TrainerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.run", description=__doc__)
    parser.add_argument("spec", type=Path, help="training spec (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = TrainingSpec.model_validate_json(args.spec.read_text())
        settings = TrainerSettings()  # type: ignore[call-arg]
        manifest = run_training(spec, settings)
    except (OSError, ValidationError, TrainingInputError, CheckpointNameError) as exc:
        print(f"cpl: error: {exc}", file=sys.stderr)
        return 2
    metrics = manifest.metrics
    print(
        json.dumps(
            {
                "name": spec.name,
                "checkpoint_id": manifest.checkpoint_id,
                "steps": metrics["steps"],
                "resumed_from_step": metrics.get("resumed_from_step"),
                "final_step_loss": metrics["final_step_loss"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
