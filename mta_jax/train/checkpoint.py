"""Orbax checkpoints of what training changes (meta-parameters, optimiser state, step, key), never the frozen base.

The frozen backbone is identified instead: its name and a content hash are written next to every
checkpoint and checked on restore, so an adapter is never silently resumed on another base model.
Restore order (big_vision / Flax examples): the workdir's latest checkpoint -> ``init_from`` -> fresh.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

PyTree = Any


def base_fingerprint(base: PyTree) -> str:
    """SHA-256 over the frozen base's leaf paths, shapes, dtypes and bytes (order-stable)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((arr.shape, str(arr.dtype))).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _to_saveable(state: PyTree) -> dict:
    # Typed PRNG keys cannot be serialised: store their raw key data instead, as a host array
    # (a process-local jax.Array cannot be saved by a multi-host run).
    state = jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x))
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key) else x,
        state)
    return serialization.to_state_dict(state)


def _from_saveable(target: PyTree, restored: dict) -> PyTree:
    is_key = lambda x: jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)  # noqa: E731
    data_target = jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, target)
    out = serialization.from_state_dict(data_target, restored)
    return jax.tree.map(lambda t, x: jax.random.wrap_key_data(x) if is_key(t) else x, target, out)


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for training state + identity metadata.

    Args:
      directory: ``<workdir>/checkpoints``.
      max_to_keep: how many recent checkpoints to keep.
      identity: JSON-able description of the run (base model name + fingerprint, config); stored with
        every step and compared on restore.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int, identity: dict):
        self.directory = pathlib.Path(directory).absolute()
        self.identity = identity
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "identity"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, *, force: bool = False) -> None:
        state = jax.device_get(state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            identity=ocp.args.JsonSave(self.identity)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores ``step`` (default latest) into the structure of ``target``; checks the base identity."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(np.asarray, _to_saveable(jax.device_get(target)))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), identity=ocp.args.JsonRestore()))
        identity = dict(restored["identity"])
        check_identity(identity, self.identity, where=f"{self.directory}/{step}")
        return _from_saveable(target, restored["state"]), identity

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_identity(saved: dict, expected: dict, where: str) -> None:
    """Raises if a checkpoint was trained on a different frozen base than the one loaded now."""
    for key in ("base_name", "base_fingerprint"):
        if key in saved and key in expected and saved[key] != expected[key]:
            raise ValueError(f"{where}: checkpoint was trained with {key}={saved[key]!r}, "
                             f"but the loaded base has {expected[key]!r}")


def restore_or_init(ckpt: Checkpointer, fresh: PyTree, init_from: str | None) -> tuple[PyTree, str]:
    """Restore order: this workdir's latest checkpoint, else ``init_from`` (another workdir), else ``fresh``.

    Returns:
      ``(state, origin)`` where origin says which branch was taken (logged by the caller).
    """
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(fresh)
        return state, f"resumed {ckpt.directory} step {ckpt.latest_step()}"
    if init_from:
        other = Checkpointer(pathlib.Path(init_from) / "checkpoints", 1, ckpt.identity)
        try:
            state, _ = other.restore(fresh)
        finally:
            other.close()
        logging.info("Initialised from %s (step counter kept from that run)", init_from)
        return state, f"init_from {init_from}"
    return fresh, "fresh"
