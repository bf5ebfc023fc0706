"""results.json schema (good and bad files), the markdown table and the PNG bar chart."""
import json

import pytest

from mta_jax.eval import report

GOOD = {
    "metatool/test_sd": {"zero_shot": {"accuracy": 0.86, "std": 0.004, "n": 3423, "seeds": 5,
                                       "protocol_seeds": [0, 1, 2, 3, 4]},
                         "bm25": {"accuracy": 0.5, "std": 0.01, "n": 3423, "seeds": 5, "seconds": 1.5}},
    "bfcl/multiple": {"zero_shot": {"accuracy": 0.975, "std": None, "n": 200}},
    "toy/pool": {"bm25": {"accuracy": 0.25, "std": None, "n": 4, "recall@5": 0.5, "ndcg@10": 0.4,
                          "skipped_empty_gold": 2}},
    "toollens/val_sd": {"mta": {"accuracy": 0.5, "std": None, "n": 500, "n_total": 4618, "protocol_seeds": [0]}},
}


def test_roundtrip(tmp_path):
    path = report.write_results(tmp_path / "out" / "results.json", GOOD)
    assert report.read_results(path) == GOOD


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r["bfcl/multiple"]["zero_shot"].update(accuracy=97.5), "accuracy"),
    (lambda r: r["bfcl/multiple"]["zero_shot"].pop("n"), "missing fields ['n']"),
    (lambda r: r["bfcl/multiple"]["zero_shot"].update(acc=0.5), "unknown fields ['acc']"),
    (lambda r: r["metatool/test_sd"]["bm25"].update(std=-0.1), "std"),
    (lambda r: r["metatool/test_sd"]["bm25"].update(n=0), "'n'"),
    (lambda r: r["metatool/test_sd"]["bm25"].update(n=True), "'n'"),
    (lambda r: r["toy/pool"]["bm25"].update({"recall@5": float("nan")}), "recall@5"),
    (lambda r: r["toy/pool"]["bm25"].update(skipped_empty_gold=-1), "skipped_empty_gold"),
    (lambda r: r.update({"x": [1]}), "'x'"),
    (lambda r: r["metatool/test_sd"]["zero_shot"].update(protocol_seeds=[]), "protocol_seeds"),
    (lambda r: r["metatool/test_sd"]["zero_shot"].update(protocol_seeds=[0.5]), "protocol_seeds"),
    (lambda r: r["toollens/val_sd"]["mta"].update(n_total=499), "n_total"),
    (lambda r: r["toollens/val_sd"]["mta"].update(n_total=500.0), "n_total"),
])
def test_schema_catches_bad_file(tmp_path, mutate, field):
    bad = json.loads(json.dumps(GOOD))
    mutate(bad)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(report.ResultsSchemaError) as e:
        report.read_results(path)
    assert str(path) in str(e.value) and field in str(e.value)
    with pytest.raises(report.ResultsSchemaError):
        report.write_results(tmp_path / "never.json", bad)
    assert not (tmp_path / "never.json").exists()


def test_not_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"a": \n{')
    with pytest.raises(report.ResultsSchemaError, match="line 2"):
        report.read_results(path)


def test_markdown_table():
    md = report.markdown_table(GOOD)
    lines = md.strip().splitlines()
    assert lines[0] == "| eval set | n | zero_shot | bm25 | mta |"
    assert lines[2] == "| metatool/test_sd | 3423 | 86.0 ± 0.4 | 50.0 ± 1.0 | – |"
    assert lines[3] == "| bfcl/multiple | 200 | 97.5 | – | – |"
    assert lines[5] == "| toollens/val_sd | 500 of 4618 | – | – | 50.0 |"
    assert len(lines) == 2 + len(GOOD)


def test_bar_chart_png(tmp_path):
    import matplotlib.image

    path = report.bar_chart(GOOD, tmp_path / "plots" / "accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
