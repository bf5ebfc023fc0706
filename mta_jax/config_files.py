"""Loading ``configs/*.py`` files by path: one place for what derived configs and tests need.

Config files are scripts with ``get_config(arg=None) -> ConfigDict`` (the ``ml_collections``
``config_flags`` convention), not a package, so a config built on another one loads it by path.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def load(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_mta_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config()")
    return module.get_config(arg)


def sibling(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config ``name`` from the folder of ``this_file`` (a config's ``__file__``)."""
    return load(pathlib.Path(this_file).with_name(f"{name}.py"), arg)


def ft_baseline(c: ml_collections.ConfigDict, methods: tuple[str, ...] = ("ft",)) -> ml_collections.ConfigDict:
    """``c`` turned into its FT baseline, in place: pooled fine-tuning of the same LoRA on the same
    episodes and budget, no inner loop (all support and query items are already in its loss, so no
    separate support term); ``eval.methods`` set to ``methods``. Returns ``c``."""
    c.meta.algorithm = "pooled"
    c.meta.inner_steps = 0
    c.meta.support_weight = 0.0
    c.eval.methods = methods
    return c
