"""``cpl train``: manifests with data hashes, exit code 2 on bad input."""

from __future__ import annotations

import hashlib
import json

import pytest

from cpl.training.cli import main

from .helpers import pair_rows, sft_rows, write_jsonl


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_data_hashes_and_lineage(policy_dir, tmp_path, capsys):
    plan = write_jsonl(tmp_path / "plan_pairs.jsonl", pair_rows(3, seed=1, chosen_value=0.5, rejected_value=-0.5))
    sol = write_jsonl(
        tmp_path / "solution_pairs.jsonl", pair_rows(2, seed=2, chosen_value=1, rejected_value=-1, kind="solution")
    )
    out = tmp_path / "apo"
    argv = ["train", "step-apo", "--model", str(policy_dir), "--data", str(plan), "--data", str(sol)]
    argv += ["--out", str(out), "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-5", "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["out"] == str(out)  # 5 pairs, batch 4, 2 epochs

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "step-apo"
    assert [d["sha256"] for d in manifest["data"]] == [_sha(plan), _sha(sol)]
    assert [d["rows"] for d in manifest["data"]] == [3, 2]
    assert manifest["base_model"] == str(policy_dir.resolve())
    assert manifest["parent_checkpoint"]["path"] == str(policy_dir.resolve())
    hp = manifest["hyperparameters"]
    assert (hp["learning_rate"], hp["batch_size"], hp["micro_batch_size"], hp["beta"]) == (1e-5, 4, 2, 0.3)
    assert hp["epochs"] == 2 and hp["lr_scheduler"] == "cosine" and hp["warmup_ratio"] == 0.1
    assert manifest["metrics"]["steps"] == 4 and manifest["created_at"]
    assert manifest["runtime"]["device"] == "cpu"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name


def test_sft_round_presets():
    from cpl.training.cli import build_config, build_parser

    def config(*extra):
        args = build_parser().parse_args(["train", "sft", "--model", "m", "--data", "d", "--out", "o", *extra])
        return build_config(args)

    assert (config().epochs, config().learning_rate, config().batch_size) == (5, 1e-5, 512)
    assert config("--round", "2").epochs == 3
    assert config("--round", "2", "--epochs", "7").epochs == 7
    assert config().max_grad_norm == 1.0 and config("--max-grad-norm", "0").max_grad_norm is None


BAD_INPUTS = {
    "missing data file": (lambda d: d / "nope.jsonl", "no such file"),
    "empty dataset": (lambda d: write_jsonl(d / "empty.jsonl", []), "empty dataset"),
    "malformed json": (lambda d: _text(d / "bad.jsonl", '{"prompt": "q", "response"\n'), "not valid JSON"),
    "missing field": (lambda d: write_jsonl(d / "bad.jsonl", [{"prompt": "q"}]), "response"),
    "not an object": (lambda d: _text(d / "bad.jsonl", "[1, 2]\n"), "JSON object"),
}


def _text(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_exits_2(policy_dir, tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    data = make(tmp_path)
    code = main(["train", "sft", "--model", str(policy_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("cpl: error:") and message in err, err
    assert not (tmp_path / "o").exists()


def test_bad_arguments_exit_2(policy_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "sft.jsonl", sft_rows(2))
    base = ["train", "sft", "--data", str(good)]
    assert main([*base, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main([*base, "--model", str(policy_dir), "--out", str(tmp_path / "o"), "--lr", "-1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main([*base, "--model", str(policy_dir), "--out", str(tmp_path / "o"), "--max-length", "5"]) == 2
    assert "longer than --max-length" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main([*base, "--model", str(policy_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    rows = write_jsonl(tmp_path / "no_values.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    argv = ["train", "step-apo", "--model", str(policy_dir), "--data", str(rows), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "chosen_value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "sft", "--model", str(policy_dir)])  # argparse: missing --data/--out
    assert exc.value.code == 2
