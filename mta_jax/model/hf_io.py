"""Reads Hugging Face checkpoints (``config.json`` + safetensors, sharded or not) into NumPy, checked.

No torch: tensors are read with ``safetensors.numpy``; bf16 arrives as ``ml_dtypes.bfloat16``.
Every failure raises :class:`CheckpointError` naming the file and the tensor, so a bad checkpoint
never yields a partially loaded model.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterable

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy before safetensors reads it)
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, incomplete or does not match the architecture."""


def read_config(model_dir: str | pathlib.Path) -> dict:
    """Returns the parsed ``config.json`` of a HF model folder."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in model folder {model_dir}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def read_tensors(model_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads every tensor of ``model.safetensors`` or of the shards listed in its ``.index.json``."""
    d = pathlib.Path(model_dir)
    if (d / SINGLE).is_file():
        return _load(d / SINGLE)
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{d / INDEX}: not a safetensors index ({e})") from e
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            part = _load(d / shard)
            tensors.update(part)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{d / INDEX}: tensors listed but absent from shards: {missing[:5]}")
        return tensors
    raise CheckpointError(f"{d}: neither {SINGLE} nor {INDEX} found")


class TensorReader:
    """Hands out named tensors with shape checks and remembers which were used.

    Args:
      tensors: name -> array, as from :func:`read_tensors`.
      source: where they came from (used in error messages).
      prefix: optional name prefix to strip-or-add (e.g. ``"bert."`` or ``"model."``); a name is
        looked up as given first, then with the prefix.
    """

    def __init__(self, tensors: dict[str, np.ndarray], source: str, prefixes: Iterable[str] = ("",)):
        self.tensors = tensors
        self.source = source
        self.prefixes = tuple(prefixes)
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return any(p + name in self.tensors for p in self.prefixes)

    def take(self, name: str, shape: tuple[int, ...], *, transpose: bool = False) -> np.ndarray:
        """Returns tensor ``name`` (transposed if asked), checking it has ``shape`` afterwards."""
        for p in self.prefixes:
            if p + name in self.tensors:
                full = p + name
                break
        else:
            raise CheckpointError(f"{self.source}: missing tensor {name!r} "
                                  f"(tried prefixes {list(self.prefixes)})")
        x = self.tensors[full]
        if transpose:
            x = x.T
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: tensor {full!r} has shape {tuple(x.shape)}"
                                  f"{' after transpose' if transpose else ''}, expected {tuple(shape)}")
        self.used.add(full)
        return x

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)
