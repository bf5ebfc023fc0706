"""The device mesh and every sharding decision, in one place (big_vision, MaxText's logical axes).

Meta-tasks are sharded on the ``data`` axis, so ``vmap`` over tasks becomes data parallelism; the
(small) meta-parameters and optimiser state are replicated; the frozen base is replicated or, for
large decoders, sharded over ``fsdp`` on its largest divisible axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA, FSDP = "data", "fsdp"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; ``data=-1`` takes all devices not used by ``fsdp``."""

    data: int = -1
    fsdp: int = 1


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """Builds a ``(data, fsdp)`` mesh with Auto axis types (sharding propagated by XLA).

    ``data=-1`` uses every device; an explicit ``data * fsdp`` smaller than the device count uses
    the first devices (e.g. ``data=1`` for a single-device reference run).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = cfg.fsdp
    data = n // fsdp if cfg.data == -1 else cfg.data
    if data < 1 or fsdp < 1 or data * fsdp > n or (cfg.data == -1 and data * fsdp != n):
        raise ValueError(f"mesh data={cfg.data} x fsdp={cfg.fsdp} does not fit {n} devices")
    arr = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
    return Mesh(arr, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def task_sharded(mesh: Mesh, tree: PyTree) -> PyTree:
    """Shardings that split every leaf's leading (task) axis over ``data``."""
    return jax.tree.map(lambda x: NamedSharding(mesh, P(DATA)) if np.ndim(x) else replicated(mesh), tree)


def base_sharding(mesh: Mesh, base: PyTree) -> PyTree:
    """Replicates the frozen base, or shards each leaf's largest ``fsdp``-divisible axis when fsdp > 1."""
    n = mesh.shape[FSDP]

    def spec(x):
        if n == 1 or np.ndim(x) == 0:
            return replicated(mesh)
        dims = sorted(range(np.ndim(x)), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % n == 0:
                parts = [None] * np.ndim(x)
                parts[d] = FSDP
                return NamedSharding(mesh, P(*parts))
        return replicated(mesh)

    return jax.tree.map(spec, base)


def put(tree: PyTree, shardings: Any) -> PyTree:
    """``jax.device_put`` of host values that also works when the mesh spans several processes.

    Every process passes the same values (episodes are deterministic in (seed, step), the base and
    the initial state are identical everywhere) and keeps only the shards of its own devices.

    Args:
      tree: arrays (NumPy or JAX, typed PRNG keys included).
      shardings: one ``Sharding`` for every leaf, or a tree of them matching ``tree``.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sh):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sh))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def check_tasks_divisible(num_tasks: int, mesh: Mesh) -> None:
    """Tasks per step must split evenly over the data axis (fixed shapes, no padding tasks)."""
    if num_tasks % mesh.shape[DATA]:
        raise ValueError(f"tasks_per_step={num_tasks} is not divisible by the mesh's data axis "
                         f"({mesh.shape[DATA]} devices); change one of them")
