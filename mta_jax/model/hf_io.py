"""Reads Hugging Face checkpoints (``config.json`` + safetensors, sharded or not) into NumPy, checked.

No torch: tensors are read with ``safetensors``' NumPy backend; bf16 arrives as
``ml_dtypes.bfloat16``. Tensors are read lazily, one at a time when a loader takes them, so a
loader that stacks and converts as it goes holds about one copy of the checkpoint, not two.
Every failure raises :class:`CheckpointError` naming the file and the tensor, so a bad checkpoint
never yields a partially loaded model.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterable, Iterator, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy before safetensors reads it)
import numpy as np
from safetensors import SafetensorError, safe_open

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


_READ_ERRORS = (SafetensorError, OSError, ValueError, TypeError)


class LazyTensors(Mapping):
    """``name -> np.ndarray`` over one or more safetensors files, reading a tensor only when asked.

    The files' headers are parsed up front (a corrupt or truncated file fails here, named); the data
    of a tensor is copied out of the file on each ``lazy[name]``.
    """

    def __init__(self, files: Iterable[pathlib.Path]):
        self._handles, self._where = {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="numpy")
                names = list(handle.keys())
            except _READ_ERRORS as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
            self._handles[path] = handle
            self._where.update(dict.fromkeys(names, path))

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._where[name]  # KeyError for unknown names, as a dict
        try:
            return self._handles[path].get_tensor(name)
        except _READ_ERRORS as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_tensors(model_dir: str | pathlib.Path) -> LazyTensors:
    """The tensors of ``model.safetensors`` or of the shards listed in its ``.index.json`` (lazily)."""
    d = pathlib.Path(model_dir)
    if (d / SINGLE).is_file():
        return LazyTensors([d / SINGLE])
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{d / INDEX}: not a safetensors index ({e})") from e
        tensors = LazyTensors([d / shard for shard in sorted(set(weight_map.values()))])
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{d / INDEX}: tensors listed but absent from shards: {missing[:5]}")
        return tensors
    raise CheckpointError(f"{d}: neither {SINGLE} nor {INDEX} found")


class TensorReader:
    """Hands out named tensors with shape checks and remembers which were used.

    Args:
      tensors: name -> array, as from :func:`read_tensors` (each read once, when taken).
      source: where they came from (used in error messages).
      prefixes: name prefixes tried in the order given (e.g. ``("model.", "")``: the prefixed name
        first, then the bare one); the first that exists is taken.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, prefixes: Iterable[str] = ("",)):
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


def nest(flat: dict[str, np.ndarray], param_dtype) -> dict:
    """``{"a/b/c": array}`` -> nested ``{"a": {"b": {"c": jax.Array}}}`` cast to ``param_dtype``.

    Empties ``flat`` as it goes, so the host holds one copy of each tensor at a time (the last step of
    a loader, after every check: a failed check leaves nothing half-built).
    """
    import jax.numpy as jnp  # here, so reading a checkpoint's tensors needs no JAX

    pdt = jnp.dtype(param_dtype)
    params: dict = {}
    for path in list(flat):
        x = flat.pop(path)
        *parents, leaf = path.split("/")
        node = params
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = jnp.asarray(np.asarray(x).astype(pdt))
        del x
    return params

