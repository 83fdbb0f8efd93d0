"""``analyze``: every table and plot of an experiment folder, printed and written under ``<experiment>/report/``.

Works on any copy of a results folder (local path or ``pyarrow.fs`` URI) with no Ray running: it reads only the
parquet tables (and ``search_space.yaml`` when present). What it writes, by the kinds of trials it finds:
- always: ``status.csv`` (counts by status) and ``top.csv`` (best finished trials with their overrides);
- searches: ``history.csv`` + ``history.png``, ``importance.csv`` + ``importance.png``, ``marginal_<param>.png``;
- ablations: ``ablation.csv`` + ``ablation.png`` (paired differences from the baseline), ``curves.csv`` +
  ``curves_<metric>.png`` (learning curves per cell);
- retrains: ``retrain.csv`` (mean and std over seeds per source trial);
and ``report.md`` holding all tables, notes and plot links.
"""

from __future__ import annotations

import importlib.util
import warnings

import pandas as pd

from uda_ray.analysis import ablation_stats, importance, plots, summary
from uda_ray.results import store

REPORT_DIR = "report"
REPORT_FILE = "report.md"


def _evaluators() -> tuple[tuple[str, ...], str]:
    """fANOVA needs scikit-learn (Optuna's random forest); without it only PED-ANOVA runs, and the report says so."""
    if importlib.util.find_spec("sklearn") is None:
        note = "fANOVA skipped: scikit-learn is not installed (pip install scikit-learn); PED-ANOVA only."
        warnings.warn(note, stacklevel=3)
        return ("ped_anova",), note
    return ("fanova", "ped_anova"), ""


def _search(trials: pd.DataFrame, path: str, metric: str, mode: str, out: str,
            tables: dict[str, pd.DataFrame], md: list[str]) -> None:
    hist = summary.history(trials, metric, mode)
    tables["history"] = hist
    space = importance.load_search_space(path)
    evaluators, note = _evaluators()
    imp = importance.param_importances(trials, metric, mode, space=space, evaluators=evaluators)
    tables["importance"] = imp
    origin = f"{importance.SEARCH_SPACE_FILE}" if space is not None else "inferred from the varying config columns"
    md += ["## Parameter importance", "",
           f"Distributions: {origin}. {len(hist)} finished trials; fANOVA sees at most "
           f"{importance.FANOVA_MAX_TRIALS} of them (seeded sample) and scores only params every trial holds.",
           *([note] if note else []), "", summary.to_markdown(imp), ""]
    md += ["## Optimisation history", "", f"![history]({plots.plot_history(hist, metric, out).rpartition('/')[2]})",
           ""]
    if len(imp):
        md += [f"![importance]({plots.plot_importance(imp, list(evaluators), out).rpartition('/')[2]})", ""]
    frame, dists = importance.search_params(trials, metric, mode, space)
    md += ["## Marginals", ""]
    for param in imp["param"]:
        uri = plots.plot_marginal(frame[param], frame["value"], param, dists.get(param), metric, out)
        md += [f"![{param}]({uri.rpartition('/')[2]})"]
    md += [""]


def _ablation(trials: pd.DataFrame, path: str, metric: str, mode: str, out: str,
              tables: dict[str, pd.DataFrame], md: list[str]) -> None:
    table = ablation_stats.paired_differences(trials, metric, mode)
    tables["ablation"] = table
    md += ["## Ablation: paired differences from the baseline", "",
           f"`mean_diff` = cell - baseline of best/{metric} over the seeds both finished; 95% percentile "
           f"bootstrap interval ({ablation_stats.N_BOOT:,} resamples); paired t-test p-value, Holm-adjusted over "
           "cells; `p_improve` = fraction of seed pairs improving, `p_improve_boot` = bootstrap probability that the "
           "mean improves.", "",
           summary.to_markdown(table), ""]
    if len(table):
        md += [f"![ablation]({plots.plot_ablation(table, metric, out).rpartition('/')[2]})", ""]
    curves = ablation_stats.learning_curves(trials, store.load_metrics(path), metric)
    tables["curves"] = curves
    md += ["## Learning curves", "", f"![curves]({plots.plot_learning_curves(curves, metric, out).rpartition('/')[2]})",
           ""]


def analyze(path: str, *, metric: str = "val/miou", mode: str = "max", top: int = 10,
            out_dir: str | None = None) -> dict[str, pd.DataFrame]:
    """Tables (returned, printed as markdown, written as CSV) and PNG plots of the experiment folder ``path``;
    ``out_dir`` defaults to ``<path>/report``. Keys: status, top, and by trial kind history and importance
    (search), ablation and curves (ablation), retrain (retrain)."""
    trials = store.load_trials(path)
    if trials.empty:
        raise ValueError(f"{path}: the experiment has no trial files under {store.join(path, store.TRIALS_DIR)}")
    out = out_dir if out_dir is not None else store.join(path, REPORT_DIR)
    kinds = set(trials["kind"].dropna())
    tables: dict[str, pd.DataFrame] = {"status": summary.status_counts(trials),
                                       "top": summary.top_table(trials, metric, mode, top)}
    experiments = ", ".join(sorted(set(trials["experiment"].dropna())))
    md = [f"# {experiments}: {metric} ({mode})", "", f"Results: `{path}`; trial kinds: {', '.join(sorted(kinds))}.",
          "", "## Trials by status", "", summary.to_markdown(tables["status"]), "",
          f"## Top {top} finished trials", "", summary.to_markdown(tables["top"]), ""]
    if "search" in kinds:
        _search(trials[trials["kind"] == "search"], path, metric, mode, out, tables, md)
    if "ablation" in kinds:
        _ablation(trials[trials["kind"] == "ablation"], path, metric, mode, out, tables, md)
    if "retrain" in kinds:
        tables["retrain"] = summary.retrain_summary(trials, metric)
        md += ["## Retrained configurations (mean and std over seeds)", "",
               summary.to_markdown(tables["retrain"]), ""]
    for name, df in tables.items():
        store.write_bytes(df.to_csv(index=False).encode(), store.join(out, f"{name}.csv"))
    text = "\n".join(md)
    store.write_bytes(text.encode(), store.join(out, REPORT_FILE))
    print(text)
    print(f"\nreport written to {out}")
    return tables
