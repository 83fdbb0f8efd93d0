"""``analyze`` on generated experiments: returned tables, CSV files with the same numbers, PNG plots, report.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import ABLATION_SEEDS, BASELINE, DIFFS, N_SEARCH

from uda_ray.analysis import ablation_stats, analyze
from uda_ray.analysis.summary import in_percent
from uda_ray.results import store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path  # a real, non-empty image


def _same_csv(path: Path, df: pd.DataFrame) -> None:
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(back.columns) == list(df.columns)
    for col in df.columns:
        if pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
            got = np.array([float(x) if x else np.nan for x in back[col]])
            np.testing.assert_allclose(got, df[col].to_numpy(np.float64), rtol=1e-15)
        else:
            want = ["" if pd.isna(v) else str(v) for v in df[col]]
            assert back[col].tolist() == want, col


@pytest.fixture(scope="module")
def search_report(search_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    copy = tmp_path_factory.mktemp("copied") / "fixture_search"  # a copied results folder, no Ray anywhere
    shutil.copytree(search_dir, copy)
    return copy, analyze(str(copy), top=5)


def test_search_tables(search_report: tuple[Path, dict]) -> None:
    _, tables = search_report
    assert set(tables) == {"status", "top", "history", "importance"}
    status = tables["status"].set_index("status")["count"]
    assert status["TERMINATED"] == N_SEARCH - 3 and status["PRUNED"] == 2 and status["ERROR"] == 1
    assert status["total"] == N_SEARCH
    top = tables["top"]
    assert len(top) == 5 and top["rank"].tolist() == [1, 2, 3, 4, 5]
    score = top["last/val/miou (%)"]  # the score, in percent for people
    assert score.is_monotonic_decreasing and score.max() < 99.0  # no pruned row
    assert top["overrides"].str.contains("loss.cluda.weight").all()
    hist = tables["history"]
    assert len(hist) == N_SEARCH - 1  # finished and pruned trials; the crashed one has no score
    assert (hist["status"] == "PRUNED").sum() == 2
    done = hist["status"] == "TERMINATED"
    # the running best is over finished trials only: a pruned trial's early value is not comparable
    np.testing.assert_array_equal(hist["best_so_far (%)"][done],
                                  np.maximum.accumulate(hist["value (%)"][done].to_numpy()))
    assert hist["best_so_far (%)"].iloc[-1] == score.iloc[0]
    assert tables["importance"]["param"].iloc[0] == "loss.cluda.weight"


def test_search_files(search_report: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    path, tables = search_report
    out = path / "report"
    for name, df in tables.items():
        _same_csv(out / f"{name}.csv", df)
    for name in ("history", "importance", "marginal_loss.cluda.weight", "marginal_optim.name",
                 "marginal_optim.momentum"):
        _png(out / f"{name}.png")
    md = (out / "report.md").read_text()
    assert "## Parameter importance" in md and "![](history.png)" in md
    assert "| 1 | " in md and "search_space.yaml" in md
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "Parameter importance" in page  # self-contained


def test_ablation_report(ablation_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "elsewhere"
    tables = analyze(ablation_dir, out_dir=str(out))
    printed = capsys.readouterr().out
    assert set(tables) == {"status", "top", "ablation", "curves"}
    abl = tables["ablation"].set_index("cell")
    for cell, d in DIFFS.items():
        assert abl.loc[cell, "mean_diff (%)"] == pytest.approx(100 * np.mean(d), abs=1e-10)
        assert abl.loc[cell, "n_pairs"] == len(ABLATION_SEEDS)
    expected = ablation_stats.paired_differences(store.load_trials(ablation_dir), "val/miou", "max")
    pd.testing.assert_frame_equal(tables["ablation"], in_percent(
        expected, ["baseline_mean", "cell_mean", "mean_diff", "ci_low", "ci_high"]))
    curves = tables["curves"]
    final = curves[(curves["cell"] == "baseline") & (curves["iteration"] == 200)]
    assert final["mean (%)"].iloc[0] == pytest.approx(100 * np.mean([BASELINE[s] for s in ABLATION_SEEDS]),
                                                      abs=1e-10)
    assert tables["status"].set_index("status").loc["ERROR", "count"] == 1
    for name, df in tables.items():
        _same_csv(out / f"{name}.csv", df)
    _png(out / "ablation.png")
    _png(out / "curves_val_miou.png")
    assert not (Path(ablation_dir) / "report").exists()  # out_dir was honoured
    assert "## Ablation: paired differences from the baseline" in printed and "| cluda | 4 |" in printed
    # 4 seed pairs: the report leads with the paired t-test and says the intervals are unreliable
    assert printed.index("Paired t-test") < printed.index("95% percentile bootstrap interval")
    assert "bootstrap intervals are unreliable" in printed
    # the console shows the report's text and tables; the figures are only in the files
    md = (out / "report.md").read_text()
    assert "![](ablation.png)" in md and "![](" not in printed
    assert [ln for ln in md.splitlines() if ln.startswith("|")] == [ln for ln in printed.splitlines()
                                                                    if ln.startswith("|")]


def test_analyze_errors(ablation_dir: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trials"):
        analyze(str(tmp_path / "nothing"))
    with pytest.raises(KeyError, match="val/acc"):
        analyze(ablation_dir, metric="val/acc", out_dir=str(tmp_path / "r"))


def test_retrain_rows_get_mean_and_std_over_seeds(tmp_path: Path) -> None:
    from uda_ray.config import Config

    finals = {("s1", 0): 0.60, ("s1", 1): 0.62, ("s1", 2): 0.67, ("s2", 0): 0.50, ("s2", 1): 0.40}
    for i, ((src, seed), v) in enumerate(finals.items()):
        row = store.trial_row(experiment="exp", trial_id=f"r{i}", kind="retrain", status="TERMINATED",
                              config=Config(), overrides={}, reports=[{"iteration": 10, "val/miou": v}],
                              metric="val/miou", mode="max", source_trial_id=src, seed=seed)
        store.write_trial(str(tmp_path), row)
    crashed = store.trial_row(experiment="exp", trial_id="r9", kind="retrain", status="ERROR", config=Config(),
                              overrides={}, reports=[{"iteration": 10, "val/miou": 0.99}], metric="val/miou",
                              mode="max", source_trial_id="s2", seed=2)
    store.write_trial(str(tmp_path), crashed)
    tables = analyze(str(tmp_path / "exp"))
    r = tables["retrain"].set_index("source_trial_id")
    assert r.loc["s1", "n_seeds"] == 3 and r.loc["s2", "n_seeds"] == 2  # the crashed seed is left out
    assert r.loc["s1", "mean (%)"] == pytest.approx(100 * np.mean([0.60, 0.62, 0.67]), abs=1e-10)
    assert r.loc["s1", "std (%)"] == pytest.approx(100 * np.std([0.60, 0.62, 0.67], ddof=1), abs=1e-10)
    assert r.loc["s2", "mean (%)"] == pytest.approx(45.0, abs=1e-10)
    _same_csv(tmp_path / "exp" / "report" / "retrain.csv", tables["retrain"])
