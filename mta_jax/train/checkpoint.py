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

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int, identity: dict, *, create: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no checkpoints folder")
        self.identity = identity
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
            item_names=("state", "identity"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_identity(self, step: int | None = None) -> dict:
        """The identity stored with ``step`` (default latest), without reading the state."""
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))["identity"])

    def save(self, step: int, state: PyTree, *, force: bool = False) -> None:
        state = jax.device_get(state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            identity=ocp.args.JsonSave(self.identity)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, target: PyTree, step: int | None = None, *, params_only: bool = False) -> tuple[PyTree, dict]:
        """Restores ``step`` (default latest) into the structure of ``target``; checks the base identity
        and that every leaf has the target's shape and dtype.

        With ``params_only`` (``target`` a :class:`~mta_jax.train.state.TrainState`), only the
        meta-parameters are read and returned, in the structure of ``target.meta.params``: the
        rest of the saved state (step, optimiser state of possibly another optimiser, key) is ignored.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        where = f"{self.directory}/{step}"
        if params_only:
            target = target.meta.params
        abstract = jax.tree.map(np.asarray, _to_saveable(jax.device_get(target)))
        # params_only reads the saved state as it is (its optimiser state may be another optimiser's)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(None if params_only else abstract), identity=ocp.args.JsonRestore()))
        saved = restored["state"]
        if params_only:
            saved = saved.get("meta", {}).get("params")
            if saved is None:
                raise ValueError(f"{where}: no meta-parameters in this checkpoint")
        identity = dict(restored["identity"])
        check_identity(identity, self.identity, where=where)
        _check_like(saved, abstract, where)
        return _from_saveable(target, saved), identity

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_like(restored: PyTree, abstract: PyTree, where: str) -> None:
    """Raises unless every restored leaf has the shape and dtype of the state it restores into
    (orbax restores what was saved, whatever the target says: a LoRA of another rank or placement
    would otherwise be taken as is)."""
    got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        have = got.get(path)
        if have is None or np.shape(have) != np.shape(want) or np.asarray(have).dtype != np.asarray(want).dtype:
            desc = "missing" if have is None else f"{np.shape(have)} {np.asarray(have).dtype}"
            raise ValueError(f"{where}: checkpoint leaf {jax.tree_util.keystr(path)} is {desc}, but this "
                             f"config's state has {np.shape(want)} {np.asarray(want).dtype} (another LoRA "
                             f"rank / placement / algorithm?)")


def check_identity(saved: dict, expected: dict, where: str) -> None:
    """Raises if a checkpoint was trained on a different frozen base than the one loaded now.

    The base is compared by its content fingerprint; its name (a path, for local checkpoints)
    may differ between machines or virtual environments and is only logged.
    """
    key = "base_fingerprint"
    if key in saved and key in expected and saved[key] != expected[key]:
        raise ValueError(f"{where}: checkpoint was trained on base {saved.get('base_name')!r} "
                         f"(fingerprint {saved[key][:12]}...), but the loaded base {expected.get('base_name')!r} "
                         f"has fingerprint {expected[key][:12]}...")
    if saved.get("base_name") != expected.get("base_name"):
        logging.info("%s: base %r loaded from %r (same content as at training time)", where,
                     saved.get("base_name"), expected.get("base_name"))


# Config fields a resumed run may change: when and how it logs, checkpoints, evaluates, shards and
# rematerialises, and how long it runs. Anything else changes what the saved state means.
RESUMABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "init_from",
                    "prefetch", "mesh", "eval", "model.path", "model.remat", "meta.remat", "meta.task_chunk",
                    "meta.inner_hvp")


def is_resumable(field: str) -> bool:
    """Whether a resume may change the dotted config ``field`` (a :data:`RESUMABLE_FIELDS` entry or under one)."""
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


# Config fields added to the library after runs were saved, each with the value that reproduces the
# runs saved before it existed. A saved config without such a field reads as holding that value, so a
# workdir trained by an older version resumes (or is reused by a sweep) instead of being refused.
ADDED_FIELDS = {"loss.dataset_scale": ""}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (saved value, current value)}`` for the config fields that differ between a
    checkpoint's run and this one, except :data:`RESUMABLE_FIELDS` (``"<absent>"`` for a missing one;
    a field of :data:`ADDED_FIELDS` missing from ``saved`` holds its neutral value there)."""
    a, b = _flat(saved), _flat(current)
    a.update({k: v for k, v in ADDED_FIELDS.items() if k in b and k not in a})
    pairs = {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if not is_resumable(k)}
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


def restore_or_init(ckpt: Checkpointer, fresh: PyTree, init_from: str | None) -> tuple[PyTree, str]:
    """Restore order: this workdir's latest checkpoint, else ``init_from`` (another workdir), else ``fresh``.

    Returns:
      ``(state, origin)`` where origin says which branch was taken (logged by the caller).
    """
    if ckpt.latest_step() is not None:
        identity = ckpt.saved_identity()
        if "config" in identity and "config" in ckpt.identity:
            changed = config_changes(identity["config"], ckpt.identity["config"])
            if changed:
                diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:6])
                raise ValueError(f"{ckpt.directory}: this workdir holds a run of another config ({diff}"
                                 f"{', ...' if len(changed) > 6 else ''}); resuming would mix the two. Use a "
                                 f"new workdir (or --config.init_from={ckpt.directory.parent} to start from "
                                 f"its parameters)")
        state, _ = ckpt.restore(fresh)
        return state, f"resumed {ckpt.directory} step {ckpt.latest_step()}"
    if init_from:
        directory = pathlib.Path(init_from) / "checkpoints"
        if not directory.is_dir():
            raise FileNotFoundError(f"init_from={init_from!r}: {directory} does not exist")
        other = Checkpointer(directory, 1, ckpt.identity, create=False)
        try:
            # Only the other run's parameters: a new run starts its own step counter (schedule,
            # episode stream) and optimiser state.
            source, _ = other.restore(fresh, params_only=True)
        finally:
            other.close()
        state = fresh._replace(meta=fresh.meta._replace(params=source))
        logging.info("Initialised the parameters from %s (step 0, fresh optimiser state)", init_from)
        return state, f"init_from {init_from}"
    return fresh, "fresh"
