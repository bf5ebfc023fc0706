"""Frozen experiment settings read once from the ``ConfigDict``, and the training state."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import ml_collections

from mta_jax import meta
from mta_jax.model import lora as lora_lib
from mta_jax.tasks import episodes
from mta_jax.train import sharding
from mta_jax.train import validation


class TrainState(NamedTuple):
    """Everything a checkpoint holds: the meta-learner's state plus the run's PRNG key."""

    meta: meta.MetaState
    key: jax.Array

    @property
    def step(self):
        return self.meta.step


@dataclasses.dataclass(frozen=True)
class DataSettings:
    datasets: tuple[str, ...]
    doc_style: str
    query_len: int
    doc_len: int


@dataclasses.dataclass(frozen=True)
class Settings:
    """The config as typed, frozen values: library code below the launch scripts reads only this."""

    seed: int
    steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    val: validation.ValSettings
    init_from: str
    model_kind: str
    model_path: str
    model_dtype: str
    remat_layers: bool | str
    loss_scale: float
    loss_dataset_scale: tuple[tuple[str, float], ...]  # (dataset, scale) overriding loss_scale for its episodes
    data: DataSettings
    episode: episodes.EpisodeConfig
    lora: lora_lib.LoRAConfig
    meta: meta.MetaConfig
    outer_lr: float
    outer_warmup: int
    outer_clip: float
    tasks_per_step: int
    mesh: sharding.MeshConfig
    prefetch: int

    def dataset_loss_scale(self, dataset: str) -> float:
        """The inverse temperature trained for ``dataset``'s episodes (``loss.dataset_scale``, else ``loss.scale``)."""
        return dict(self.loss_dataset_scale).get(dataset, self.loss_scale)


def _dc(cls, d: ml_collections.ConfigDict | dict, **extra) -> Any:
    """Builds dataclass ``cls`` from a config section; unknown fields are an error, not ignored."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} config field(s): {unknown}; valid: {sorted(names)}")
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = tuple(v)
    return cls(**d, **extra)


def meta_config(m: ml_collections.ConfigDict) -> meta.MetaConfig:
    """``config.meta`` -> :class:`mta_jax.meta.MetaConfig` (inner-loop fields flattened in the config)."""
    inner = meta.InnerConfig(steps=m.inner_steps, lr=m.inner_lr, first_order=m.first_order, remat=m.remat,
                             optimizer=m.inner_optimizer, clip_norm=m.inner_clip or None,
                             adapt_pattern=m.adapt_pattern or None,
                             hvp=m.get("inner_hvp", "reverse"))  # absent in older workdirs
    return meta.MetaConfig(name=m.algorithm, inner=inner, imaml_lambda=m.imaml_lambda,
                           imaml_cg_steps=m.imaml_cg_steps, task_chunk=m.task_chunk or None,
                           support_weight=m.get("support_weight", 0.0))  # absent in older workdirs


def parse_dataset_scale(spec: str, datasets) -> tuple[tuple[str, float], ...]:
    """``config.loss.dataset_scale``: ``"metatool=10,toollens=40"`` -> ``(("metatool", 10.0), ("toollens", 40.0))``.

    Each listed train dataset's episodes score with their own inverse temperature; the others keep
    ``loss.scale``. Raises ValueError naming the field on a malformed entry, a dataset not in
    ``config.data.datasets``, a repeated dataset or a scale that is not a positive number.
    """
    out: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in (spec or "").split(","))):
        name, _, value = entry.partition("=")
        name = name.strip()
        try:
            scale = float(value)  # "" (no '=') raises too
        except ValueError:
            scale = float("nan")
        if not scale > 0:
            raise ValueError(f"config.loss.dataset_scale: entry {entry!r} must be 'dataset=scale' with a "
                             f"positive scale (got {spec!r})")
        if name not in tuple(datasets):
            raise ValueError(f"config.loss.dataset_scale: {name!r} is not a train dataset of "
                             f"config.data.datasets={tuple(datasets)}")
        if name in out:
            raise ValueError(f"config.loss.dataset_scale: {name!r} is given twice in {spec!r}")
        out[name] = scale
    return tuple(out.items())


def settings_from_config(config: ml_collections.ConfigDict) -> Settings:
    """Converts the experiment config once; every field must be present in the config file."""
    c = config
    for field in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "tasks_per_step"):
        if not isinstance(c[field], int) or isinstance(c[field], bool) or c[field] < 1:
            raise ValueError(f"config.{field} must be an integer >= 1, got {c[field]!r}")
    settings = Settings(
        seed=c.seed, steps=c.steps, log_every=c.log_every, checkpoint_every=c.checkpoint_every,
        keep_checkpoints=c.keep_checkpoints, val=validation.val_settings(c.eval_every, c.eval), init_from=c.init_from,
        model_kind=c.model.kind, model_path=c.model.path, model_dtype=c.model.dtype, remat_layers=c.model.remat,
        loss_scale=c.loss.scale,
        # decoder configs have no loss.dataset_scale, nor workdirs saved before it (checkpoint.ADDED_FIELDS)
        loss_dataset_scale=parse_dataset_scale(c.loss.get("dataset_scale", ""), c.data.datasets),
        data=_dc(DataSettings, c.data),
        episode=_dc(episodes.EpisodeConfig, c.episode),
        lora=_dc(lora_lib.LoRAConfig, c.lora),
        meta=meta_config(c.meta),
        outer_lr=c.outer.lr, outer_warmup=c.outer.warmup, outer_clip=c.outer.clip,
        tasks_per_step=c.tasks_per_step,
        mesh=_dc(sharding.MeshConfig, c.mesh),
        prefetch=c.prefetch,
    )
    _check_support(settings)
    if settings.loss_dataset_scale and settings.model_kind != "encoder":
        raise ValueError(f"config.loss.dataset_scale is implemented for the encoder workload only, not "
                         f"model.kind={settings.model_kind!r} (whose loss has no temperature)")
    return settings


def _check_support(s: Settings) -> None:
    """Checks the episode's support options against the workload and the meta-algorithm.

    Raises:
      ValueError: ``episode.support_labels="hidden"`` or ``episode.support_source="docs"`` with a
        decoder (both are encoder-only); hidden labels with no inner loop, with an algorithm that
        trains on the support items directly (pooled, reptile, imaml), or with ``meta.support_weight
        > 0`` (whose term would be the support *entropy*, not a supervised loss): unlabelled support
        items only make sense for an inner loop whose outer loss never sees them.
    """
    ep, m = s.episode, s.meta
    options = [f"episode.{k}={v!r}" for k, v, default in (("support_labels", ep.support_labels, "gold"),
                                                          ("support_source", ep.support_source, "items"))
               if v != default]
    if options and s.model_kind != "encoder":
        raise ValueError(f"config.{', config.'.join(options)} is implemented for the encoder workload only, "
                         f"not model.kind={s.model_kind!r}")
    if ep.support_labels != "hidden":
        return
    if m.name in ("pooled", "reptile", "imaml") or m.inner.steps == 0:
        raise ValueError(f"config.episode.support_labels='hidden' needs an inner loop that adapts on the "
                         f"unlabelled support items (maml, fomaml, anil, meta_sgd with inner_steps > 0); "
                         f"got meta.algorithm={m.name!r}, inner_steps={m.inner.steps}")
    if m.support_weight:
        raise ValueError("config.episode.support_labels='hidden' needs config.meta.support_weight=0: its "
                         "term would train the initialisation on the support items' entropy")
