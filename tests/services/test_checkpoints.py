"""Checkpoint path validation (no traversal, no symlink escape) and content validation before a hot-swap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.gateway.checkpoints import CheckpointError, check_compatible, read_manifest, resolve_checkpoint_path

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "vocab_size": 16,
}


def _checkpoint(directory: Path, *, hidden: int = 8, drop: str | None = None, vocab: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**CONFIG, "hidden_size": hidden}))
    tensors = {
        "model.embed_tokens.weight": torch.zeros(16, hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.zeros(16, hidden),
    }
    if drop:
        tensors.pop(drop)
    save_file(tensors, str(directory / "model.safetensors"))
    tokenizer = {"model": {"type": "BPE", "vocab": vocab or {"a": 0, "b": 1}}, "added_tokens": []}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


def _status(fn, *args, **kwargs) -> int:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    assert info.value.message
    return info.value.status


def test_paths_resolve_under_the_root(tmp_path: Path):
    root = tmp_path / "root"
    good = _checkpoint(root / "run1" / "step10")
    assert resolve_checkpoint_path(root, "run1/step10") == good.resolve()
    assert resolve_checkpoint_path(root, str(good)) == good.resolve()
    assert resolve_checkpoint_path(root, "run1/../run1/step10") == good.resolve()


def test_traversal_and_symlink_escape_are_refused(tmp_path: Path):
    root = tmp_path / "root"
    _checkpoint(root / "ok")
    outside = _checkpoint(tmp_path / "outside")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "inner").symlink_to(root / "ok", target_is_directory=True)
    assert _status(resolve_checkpoint_path, root, "../outside") == 400
    assert _status(resolve_checkpoint_path, root, str(outside)) == 400
    assert _status(resolve_checkpoint_path, root, "link") == 400
    assert _status(resolve_checkpoint_path, root, "ok/../../outside") == 400
    assert resolve_checkpoint_path(root, "inner") == (root / "ok").resolve()  # a link that stays inside is fine
    assert _status(resolve_checkpoint_path, root, "missing") == 404
    assert _status(resolve_checkpoint_path, root, "ok/config.json") == 400
    assert _status(resolve_checkpoint_path, root, "") == 400
    assert _status(resolve_checkpoint_path, None, "ok") == 409


def test_weight_file_linking_outside_the_root_is_refused(tmp_path: Path):
    root = tmp_path / "root"
    outside = _checkpoint(tmp_path / "outside")
    sneaky = _checkpoint(root / "sneaky")
    (sneaky / "model.safetensors").unlink()
    (sneaky / "model.safetensors").symlink_to(outside / "model.safetensors")
    assert _status(read_manifest, sneaky, root=root) == 400


def test_compatible_checkpoint_passes(tmp_path: Path):
    served = read_manifest(_checkpoint(tmp_path / "a"))
    check_compatible(served, read_manifest(_checkpoint(tmp_path / "b"), root=tmp_path, verify_tensors=True))


def test_incompatible_or_corrupt_checkpoints_are_refused(tmp_path: Path):
    served = read_manifest(_checkpoint(tmp_path / "served"))
    wide = read_manifest(_checkpoint(tmp_path / "wide", hidden=16))
    assert _status(check_compatible, served, wide) == 422
    missing = read_manifest(_checkpoint(tmp_path / "missing", drop="lm_head.weight"))
    assert _status(check_compatible, served, missing) == 422
    other_tok = read_manifest(_checkpoint(tmp_path / "tok", vocab={"a": 0, "c": 1}))
    assert _status(check_compatible, served, other_tok) == 422

    truncated = _checkpoint(tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-10])
    assert _status(read_manifest, truncated) == 422

    padded = _checkpoint(tmp_path / "padded")
    (padded / "model.safetensors").write_bytes(data + b"junk")
    assert _status(read_manifest, padded) == 422

    garbage = _checkpoint(tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    assert _status(read_manifest, garbage) == 422

    no_config = _checkpoint(tmp_path / "no_config")
    (no_config / "config.json").unlink()
    assert _status(read_manifest, no_config) == 422

    pickled = tmp_path / "pickled"
    shutil.copytree(tmp_path / "served", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert _status(read_manifest, pickled) == 422


def test_verify_tensors_catches_non_finite_weights(tmp_path: Path):
    bad = _checkpoint(tmp_path / "nan")
    save_file(
        {
            "model.embed_tokens.weight": torch.full((16, 8), float("nan")),
            "model.norm.weight": torch.ones(8),
            "lm_head.weight": torch.zeros(16, 8),
        },
        str(bad / "model.safetensors"),
    )
    read_manifest(bad)  # headers are fine
    assert _status(read_manifest, bad, verify_tensors=True) == 422


def test_sharded_checkpoints_are_read_through_their_index(tmp_path: Path):
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    save_file({"a": torch.zeros(2)}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(directory / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    manifest = read_manifest(directory)
    assert {name: info.shape for name, info in manifest.tensors.items()} == {"a": (2,), "b": (3,)}
    (directory / "model-00002-of-00002.safetensors").unlink()
    assert _status(read_manifest, directory) == 422
