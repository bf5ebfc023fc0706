"""``mta_jax.data.fetch``: sources, wheel extraction, offline errors, and BFCL built from its PyPI wheel."""
import filecmp
import subprocess
import sys
import urllib.error
import zipfile

import pytest

from mta_jax.data import fetch


def _wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    return path


def test_source_needs_exactly_one_location():
    with pytest.raises(ValueError, match="exactly one of url and wheel"):
        fetch.Source(files=("a.json",))
    with pytest.raises(ValueError, match="exactly one of url and wheel"):
        fetch.Source(files=("a.json",), url="https://x", wheel="x==1")
    for name, src in fetch.SOURCES.items():
        assert src.files, name
        assert src.wheel is None or "==" in src.wheel, f"{name}: a wheel source must pin its version"


def test_wheel_source_extracts_only_missing_files(tmp_path, monkeypatch):
    src = fetch.Source(files=("a.json", "sub/b.json"), wheel="pkg==1.0", wheel_dir="pkg/data")
    calls = []

    def fake_pip(requirement, folder):
        calls.append(requirement)
        return _wheel(folder / "pkg-1.0-py3-none-any.whl",
                      {"pkg/data/a.json": b"A", "pkg/data/sub/b.json": b"B", "pkg/other.py": b""})

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    dest = tmp_path / "raw" / "pkg"
    fetch._download_source(src, dest)
    assert (dest / "a.json").read_bytes() == b"A" and (dest / "sub/b.json").read_bytes() == b"B"
    assert not (dest / "pkg").exists() and not list(dest.rglob("*.part"))
    assert calls == ["pkg==1.0"]
    fetch._download_source(src, dest)  # everything present: no second download
    assert calls == ["pkg==1.0"]


def test_wheel_without_a_listed_file_is_an_error(tmp_path, monkeypatch):
    src = fetch.Source(files=("a.json", "c.json"), wheel="pkg==1.0", wheel_dir="pkg/data")
    monkeypatch.setattr(fetch, "_pip_download",
                        lambda req, folder: _wheel(folder / "pkg-1.0-py3-none-any.whl", {"pkg/data/a.json": b"A"}))
    with pytest.raises(FileNotFoundError, match=r"pkg-1.0-py3-none-any.whl has no 'pkg/data/c.json'"):
        fetch._download_source(src, tmp_path)


def test_unreachable_sources_fail_with_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"cannot reach https://raw\.githubusercontent\.com/.*MTA_DATA_DIR"):
        fetch.fetch(["api_bank"], cache=tmp_path)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found for bfcl-eval")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ConnectionError, match=r"pip: bfcl-eval==.*pip exited 1: ERROR: No matching distribution"):
        fetch.fetch(["bfcl"], cache=tmp_path)
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        fetch.fetch(["nope"], cache=tmp_path)


def test_bfcl_from_its_wheel_reproduces_the_normalized_copy(tmp_path, data_dir):
    """The real thing: pip downloads the pinned wheel, the raw parser normalizes it, and every file
    equals the shipped normalized copy byte for byte (needs a reachable package index)."""
    try:
        root = fetch.fetch(["bfcl"], cache=tmp_path)
    except ConnectionError as e:
        # Skip only when the index itself is unreachable (asked for pip, which every index has):
        # a reachable index that refuses the pinned wheel (yanked, renamed) is a failure.
        probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pip"],
                               capture_output=True, text=True, timeout=fetch.PIP_TIMEOUT_S)
        if probe.returncode == 0:
            raise AssertionError(f"the package index answers, but fetching BFCL failed: {e}") from e
        pytest.skip(f"package index unreachable: {e}")
    ref = data_dir / "normalized" / "bfcl"
    shipped = sorted(p.name for p in ref.glob("*.jsonl"))
    assert "multiple.jsonl" in shipped and "tools.jsonl" in shipped
    assert sorted(p.name for p in (root / "normalized" / "bfcl").glob("*.jsonl")) == shipped
    for name in shipped:
        assert filecmp.cmp(ref / name, root / "normalized" / "bfcl" / name, shallow=False), name
