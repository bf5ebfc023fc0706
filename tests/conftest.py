"""Test-wide setup: 8 fake CPU devices, a persistent compilation cache, the data directory."""
import os
import pathlib

# Must happen before JAX is imported anywhere: sharding tests need several devices, so the flag is
# appended to the user's XLA_FLAGS rather than skipped when they set some (the tests assert >= 8).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
_REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_SHARED = _REPO.parent / "shared" / "data"
if "MTA_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["MTA_DATA_DIR"] = str(_SHARED)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The benchmark data directory (MTA_DATA_DIR); tests needing it skip when it is absent."""
    d = os.environ.get("MTA_DATA_DIR")
    if not d or not pathlib.Path(d).is_dir():
        pytest.skip("benchmark data not available: set MTA_DATA_DIR")
    return pathlib.Path(d)


def with_overrides(config, overrides: dict):
    """``config`` with each dotted ``field: value`` of ``overrides`` set, e.g. ``{"mesh.data": 1}``."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def load_config(name: str, **overrides):
    """``configs/<name>.py``'s ``get_config()`` with dotted overrides, e.g. ``**{"mesh.data": 1}``."""
    from mta_jax import config_files

    return with_overrides(config_files.load(_REPO / "configs" / f"{name}.py"), overrides)


def pytest_sessionfinish(session, exitstatus):
    """With ``MTA_FAIL_ON_SKIP=1`` (``tests/run_tests.sh``, which installs every optional test
    dependency) a skipped test fails the run: a skip there means a check silently stopped running."""
    if os.environ.get("MTA_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        reporter.ensure_newline()
        for rep in skipped:
            reporter.write_line(f"MTA_FAIL_ON_SKIP: skipped {rep.nodeid}: {rep.longrepr}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
