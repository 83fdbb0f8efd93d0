"""``analyze``: every table and plot of an experiment folder, printed and written under ``<experiment>/report/``.

Works on any copy of a results folder (local path or ``pyarrow.fs`` URI) with no Ray running: it reads only the
parquet tables, ``search_space.yaml`` when present and the trials' prediction grids (``trial_<id>/images``). What it
writes, by the kinds of trials it finds:
- always: ``status.csv`` (counts by status) and ``top.csv`` (best finished trials, their score, the checkpoint
  behind it and their overrides);
- searches: ``history.csv`` + ``history.png`` (pruned trials at the rung they reached), ``importance.csv`` +
  ``importance.png`` (from ``importance.MIN_IMPORTANCE_TRIALS`` finished trials on; below that the report says so),
  ``marginal_<param>.png``, learning curves of the best trials and their prediction grids over iterations;
- ablations: ``ablation.csv`` + ``ablation.png`` (paired differences from the baseline, n pairs beside every
  interval and test; with fewer than 5 pairs the paired t-test leads), ``curves.csv`` + ``curves_<metric>.png``;
- retrains: ``retrain.csv`` (mean and std over seeds per source trial); and for an experiment that was retrained,
  ``<retrain folder>_summary.csv`` per retrain (``retrain``, ``retrain-2``, …): each source trial's score and the
  retrained runs' mean and std, with the iterations of both;
and ``report.md`` and ``index.html`` (one self-contained page: the tables, the plots and the grids embedded) holding
all of it. Values of fraction metrics (mIoU, IoU) are in percent everywhere here, in columns named ``… (%)``; the
parquet tables keep fractions. Every number says which split it comes from (``val/*`` and ``holdout/*``).
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pandas as pd

from uda_ray.analysis import ablation_stats, importance, plots, summary
from uda_ray.analysis.best import finished, metric_column
from uda_ray.analysis.document import Image, Section, Table, Text, to_html, to_markdown_text
from uda_ray.results import store
from uda_ray.results.schema import FINISHED, LAST_PREFIX, is_percent_metric

REPORT_DIR = "report"
REPORT_FILE = "report.md"
HTML_FILE = "index.html"
CURVE_TRIALS = 5  # learning curves of this many best trials
GRID_TRIALS = 3  # prediction grids of this many best trials
GRIDS_PER_TRIAL = 6  # at most this many iterations per trial, evenly spaced, the last one included


class NoFinishedTrials(RuntimeError):
    """The experiment has no finished trial to analyse; the report (status table) was written anyway."""


def _evaluators() -> tuple[tuple[str, ...], str]:
    """fANOVA needs scikit-learn (Optuna's random forest); without it only PED-ANOVA runs, and the report says so."""
    if importlib.util.find_spec("sklearn") is None:
        note = "fANOVA skipped: scikit-learn is not installed (pip install scikit-learn); PED-ANOVA only."
        warnings.warn(note, stacklevel=3)
        return ("ped_anova",), note
    return ("fanova", "ped_anova"), ""


def _label(metric: str) -> str:
    return f"{metric} (%)" if is_percent_metric(metric) else metric


def _scale(metric: str) -> float:
    return 100.0 if is_percent_metric(metric) else 1.0


def split_note(trials: pd.DataFrame) -> Text:
    """Which data the numbers come from, and the selection bias when the search chose on the split it reports."""
    col = "config/eval.holdout"
    holdout = col in trials.columns and trials[col].fillna(False).astype(bool).any()
    if holdout:
        target = set(trials["config/data.target"].dropna()) if "config/data.target" in trials.columns else set()
        basis = ("by image, seeded (the synthetic pair's val images are all in one city)" if target == {"synthetic"}
                 else "by city, seeded (by image where the val split holds a single city; the run's log says so)")
        return Text("Splits: val/* is the selection half of the target val split (what ASHA, Optuna and the choice "
                    "of the best trial saw); holdout/* is the report half, never used to choose anything: report "
                    f"holdout/* numbers. The split is cut {basis}: the same cut for every trial.")
    return Text("Splits: val/* is the whole target val split, which the search also chose on, so the best trial's "
                "number is optimistic (it is partly the noise of that split). Set eval.holdout: true to select on "
                "one half and report on the other.", kind="note")


def _search(trials: pd.DataFrame, path: str, metric: str, mode: str, out: str,
            tables: dict[str, pd.DataFrame]) -> list[Section]:
    k = _scale(metric)
    hist = summary.history(trials, metric, mode)
    shown = hist.assign(value=hist["value"] * k, best_so_far=hist["best_so_far"] * k)
    tables["history"] = shown.rename(columns={"value": f"value{summary.PERCENT_SUFFIX}",
                                              "best_so_far": f"best_so_far{summary.PERCENT_SUFFIX}"}) \
        if k != 1.0 else shown
    n_done = int((hist["status"] == FINISHED).sum())
    sections = [Section("Optimisation history", [
        Text(f"{n_done} finished trials by their score and {len(hist) - n_done} pruned trials at the rung ASHA "
             "stopped them (hollow): a pruned trial's value is taken early and is not comparable with a finished "
             "one's."),
        Image(plots.plot_history(shown, _label(metric), out))])]

    space = importance.load_search_space(path)
    origin = importance.SEARCH_SPACE_FILE if space is not None else "inferred from the varying config columns"
    imp_section = Section("Parameter importance")
    params: list[str]
    if n_done < importance.MIN_IMPORTANCE_TRIALS:
        imp_section.blocks.append(Text(
            f"Not computed: {n_done} finished trial(s); parameter importance needs at least "
            f"{importance.MIN_IMPORTANCE_TRIALS}. Below that PED-ANOVA's top 10 % is a single trial and fANOVA's "
            "forest fits noise, so any number would mislead. The marginal plots below show the raw trials.",
            kind="note"))
        tables["importance"] = pd.DataFrame(columns=["param", "n_trials"])
        _, dists = importance.search_params(trials, metric, mode, space, with_pruned=True)
        params = list(dists)
    else:
        evaluators, note = _evaluators()
        imp = importance.param_importances(trials, metric, mode, space=space, evaluators=evaluators)
        tables["importance"] = imp
        imp_section.blocks += [
            Text(f"From {n_done} finished trials (pruned ones excluded). Distributions: {origin}. fANOVA sees at "
                 f"most {importance.FANOVA_MAX_TRIALS} of them (seeded sample) and scores only params every trial "
                 "holds."),
            *([Text(note, kind="note")] if note else []), Table(imp)]
        if len(imp):
            imp_section.blocks.append(Image(plots.plot_importance(imp, list(evaluators), n_done, out)))
        params = list(imp["param"])
    sections.append(imp_section)

    frame, dists = importance.search_params(trials, metric, mode, space, with_pruned=True)
    marg = Section("Marginals", [Text("Each searched parameter against the score; pruned trials hollow, at the rung "
                                      "they reached.")])
    for param in params:
        if param in frame.columns:
            marg.blocks.append(Image(plots.plot_marginal(frame[param], frame["value"] * k, frame["status"], param,
                                                         dists.get(param), _label(metric), out)))
    sections.append(marg)
    sections += _best_trials(trials, path, metric, mode, out, tables)
    return sections


def _best_trials(trials: pd.DataFrame, path: str, metric: str, mode: str, out: str,
                 tables: dict[str, pd.DataFrame]) -> list[Section]:
    """Learning curves and prediction grids of the best finished trials."""
    top = summary.top_table(trials, metric, mode, max(CURVE_TRIALS, GRID_TRIALS))
    if top.empty:
        return []
    metrics = store.load_metrics(path)
    ids = list(top["trial_id"])
    sections = []
    if metric in metrics.columns:
        m = metrics[metrics["trial_id"].isin(ids[:CURVE_TRIALS]) & metrics[metric].notna()]
        curves = pd.DataFrame({"trial_id": pd.Categorical(m["trial_id"], categories=ids[:CURVE_TRIALS]),
                               "iteration": m["iteration"], "value": m[metric] * _scale(metric)})
        curves = curves.sort_values(["trial_id", "iteration"], kind="stable")
        curves["trial_id"] = curves["trial_id"].astype(str)
        sections.append(Section("Learning curves of the best trials", [
            Image(plots.plot_trial_curves(curves, _label(metric), out, metric))]))
    grids = Section("Prediction grids of the best trials", [Text(
        "Each grid: target val images with their ground truth and the student's prediction, and target train "
        "images with the teacher's pseudo-labels, at the iterations shown.")])
    for rank, tid in enumerate(ids[:GRID_TRIALS], start=1):
        files = store.list_files(store.trial_images_uri(path, tid), ".png")
        if not files:
            continue
        pick = sorted(set(np.linspace(0, len(files) - 1, min(GRIDS_PER_TRIAL, len(files))).round().astype(int)))
        for i in pick:
            name = files[i].rpartition("/")[2]
            grids.blocks.append(Image(files[i], f"#{rank} trial {tid}, {name.removesuffix('.png').replace('_', ' ')}"))
    if len(grids.blocks) > 1:
        sections.append(grids)
    return sections


def _ablation(trials: pd.DataFrame, path: str, metric: str, mode: str, out: str,
              tables: dict[str, pd.DataFrame]) -> list[Section]:
    k = _scale(metric)
    table = ablation_stats.paired_differences(trials, metric, mode)
    value_cols = ["baseline_mean", "cell_mean", "mean_diff", "ci_low", "ci_high"]
    shown = summary.in_percent(table, value_cols) if k != 1.0 else table
    tables["ablation"] = shown
    section = Section("Ablation: paired differences from the baseline")
    small = table["n_pairs"].between(1, ablation_stats.MIN_PAIRS_BOOTSTRAP - 1)
    if small.any():
        pct = summary.PERCENT_SUFFIX if k != 1.0 else ""
        lead = shown[["cell", "n_pairs", f"mean_diff{pct}", "p_value", "p_holm", "p_improve"]]
        section.blocks += [
            Text(f"{int(small.sum())} cell(s) rest on fewer than {ablation_stats.MIN_PAIRS_BOOTSTRAP} seed pairs: "
                 "their bootstrap intervals are unreliable (ci_reliable = False). Read the paired t-test first.",
                 kind="note"),
            Table(lead, "Paired t-test (two-sided, Holm-adjusted over cells), n = seed pairs:")]
    section.blocks += [
        Text(f"mean_diff = cell - baseline of {metric} (each run at its last evaluation) over the n_pairs seeds both "
             f"finished; 95% percentile bootstrap interval ({ablation_stats.N_BOOT:,} resamples; reliable from "
             f"{ablation_stats.MIN_PAIRS_BOOTSTRAP} pairs); paired t-test p-value, Holm-adjusted over cells; "
             "p_improve = fraction of seed pairs improving, p_improve_boot = bootstrap probability that the mean "
             "improves."),
        Table(shown)]
    if len(table):
        plotted = table.assign(**{c: table[c] * k for c in value_cols})
        section.blocks.append(Image(plots.plot_ablation(plotted, _label(metric), out)))
    curves = ablation_stats.learning_curves(trials, store.load_metrics(path), metric)
    scaled = curves.assign(**{c: curves[c] * k for c in ("mean", "std", "min", "max")})
    tables["curves"] = summary.in_percent(curves, ["mean", "std", "min", "max"]) if k != 1.0 else curves
    return [section, Section("Learning curves", [
        Image(plots.plot_learning_curves(scaled, _label(metric), out, metric))])]


def _retrain(trials: pd.DataFrame, metric: str, tables: dict[str, pd.DataFrame]) -> list[Section]:
    blocks: list = []
    for m in dict.fromkeys([metric, summary.holdout_metric(metric)]):
        if not m or f"{LAST_PREFIX}{m}" not in trials.columns:
            continue
        table = summary.retrain_summary(trials, m)
        shown = summary.in_percent(table, ["mean", "std"]) if is_percent_metric(m) else table
        tables["retrain" if m == metric else "retrain_holdout"] = shown
        blocks.append(Table(shown, f"{m}: each retrained run at its final evaluation (its final checkpoint), "
                                   "mean and sample std over seeds"))
    return [Section("Retrained configurations", blocks)]


def retrain_folders(path: str) -> list[str]:
    """The retrains of an experiment, in order: ``retrain``, ``retrain-2``, … (``uda_ray.tune.retrain``)."""
    names, k = [], 1
    while store.exists(store.join(path, "retrain" if k == 1 else f"retrain-{k}")):
        names.append("retrain" if k == 1 else f"retrain-{k}")
        k += 1
    return names


def _retrains(path: str, trials: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> list[Section]:
    """Every retrain of this experiment: per source trial its score and the retrained runs' mean ± std over seeds,
    each with the iteration it was taken at; a comparison across different lengths is marked."""
    sections = []
    for name in retrain_folders(path):
        folder = store.join(path, name)
        request_uri = store.join(folder, summary.RETRAIN_REQUEST)
        if not store.exists(request_uri):
            continue
        request = json.loads(store.read_bytes(request_uri))
        metric = request["metric"]
        planned = [(str(t), int(s), int(n)) for t, s, n in request["runs"]]
        known = set(trials["trial_id"])
        ids = [t for t in dict.fromkeys(t for t, _, _ in planned) if t in known]
        chosen = trials[trials["trial_id"].isin(ids)].set_index("trial_id").loc[ids].reset_index()
        chosen.insert(0, "rank", range(1, len(chosen) + 1))
        rows = (store.load_trials(folder) if store.exists(store.join(folder, store.TRIALS_DIR))
                else pd.DataFrame(columns=["trial_id", "source_trial_id", "seed", "status"]))
        seeds = sorted({s for _, s, _ in planned})
        table = summary.seed_summary(rows, chosen, metric, seeds, {t: n for t, _, n in planned})
        percent = [m for m in table["metric"] if is_percent_metric(m)]
        shown = summary.in_percent(table, ["source_value", "mean", "std"]) if percent else table
        tables[f"{name}_summary"] = shown
        blocks: list = [Text(
            f"`uda-ray retrain` of the best {len(ids)} trial(s) with seeds {' '.join(map(str, seeds))}, chosen by "
            f"{metric}: source_value is the source trial's score, taken at source_iteration; mean and std (ddof 1) "
            "are over the retrained runs that finished, each at its final evaluation (iterations). A search's best "
            "is an optimistic estimate; the retrained mean is the number to report.")]
        if not table["comparable"].all():
            blocks.append(Text("comparable = False: the retrained runs are of another length than the source's "
                               "score; the two numbers measure different schedules, not a number and its "
                               "replication.", kind="note"))
        blocks.append(Table(shown))
        sections.append(Section(f"Retrained configurations ({name})", blocks))
    return sections


RUN_STATUS = "status.json"  # a `uda-ray train` run folder's status (uda_ray.train.run.STATUS_FILE)


class NotAnExperiment(ValueError):
    """The folder is one ``uda-ray train`` run, not an experiment; the message says what it holds."""


def _refuse_a_train_run(path: str) -> None:
    """A ``uda-ray train`` run folder has no trials table: say what it is (and its status) instead of "no such
    folder <path>/trials"."""
    status_uri = store.join(path, RUN_STATUS)
    if store.exists(store.join(path, store.TRIALS_DIR)) or not (
            store.exists(status_uri) or store.exists(store.join(path, "metrics.parquet"))):
        return
    state = json.loads(store.read_bytes(status_uri)) if store.exists(status_uri) else {}
    status = state.get("status", "unknown: no status.json")
    detail = "".join(f"; {k}: {state[k]}" for k in ("error", "resume") if state.get(k))
    raise NotAnExperiment(f"{path} is one `uda-ray train` run (status {status}{detail}), not an experiment: "
                          "analyze reads the trials of `uda-ray tune`, `ablate` and `retrain`. This run's metrics are "
                          f"in {store.join(path, 'metrics.parquet')}, its prediction grids in "
                          f"{store.join(path, 'images')}; `uda-ray evaluate` scores a checkpoint of it")


def analyze(path: str, *, metric: str = "val/miou", mode: str = "max", top: int = 10,
            out_dir: str | None = None) -> dict[str, pd.DataFrame]:
    """Tables (returned, printed as markdown, written as CSV) and plots of the experiment folder ``path``, with
    ``report.md`` and the self-contained ``index.html``; ``out_dir`` defaults to ``<path>/report``. Keys: status,
    top, and by trial kind history and importance (search), ablation and curves (ablation), retrain (retrain).
    Raises ``NoFinishedTrials`` (after writing the status report) when no trial finished."""
    _refuse_a_train_run(path)
    trials = store.load_trials(path)
    if trials.empty:
        raise ValueError(f"{path}: the experiment has no trial files under {store.join(path, store.TRIALS_DIR)}")
    out = out_dir if out_dir is not None else store.join(path, REPORT_DIR)
    kinds = set(trials["kind"].dropna())
    tables: dict[str, pd.DataFrame] = {"status": summary.status_counts(trials)}
    experiments = ", ".join(sorted(set(trials["experiment"].dropna())))
    title = f"{experiments}: {metric} ({mode})"
    head = Section("Trials by status", [
        Text(f"Results: {path}; trial kinds: {', '.join(sorted(kinds))}. A trial's score is its {metric} at its "
             "last evaluation (the end of training, or the rung where ASHA stopped it), the number the checkpoint "
             "listed with it gives."),
        split_note(trials), Table(tables["status"])])
    sections = [head]
    col = f"{LAST_PREFIX}{metric}"
    if col not in trials.columns and (trials["status"] == FINISHED).any():
        metric_column(trials, metric)  # trials finished without ever reporting it: a wrong name, KeyError
    n_done = len(finished(trials, col)) if col in trials.columns else 0
    if n_done == 0:
        head.blocks.append(Text(f"No trial finished with a finite {metric}: nothing to rank or compare. Statuses "
                                "above; errors are in the trials table's 'error' column.", kind="note"))
        _write(title, sections, tables, out)
        counts = ", ".join(f"{r.count} {r.status}" for r in tables["status"].itertuples()
                           if r.count and r.status != "total")
        raise NoFinishedTrials(f"{path}: no trial finished with a finite {metric} ({counts})")
    top_df = summary.top_table(trials, metric, mode, top)
    tables["top"] = summary.in_percent(top_df, summary.metric_columns(top_df))
    sections.append(Section(f"Top {top} finished trials", [Table(tables["top"])]))
    if "search" in kinds:
        sections += _search(trials[trials["kind"] == "search"], path, metric, mode, out, tables)
    if "ablation" in kinds:
        sections += _ablation(trials[trials["kind"] == "ablation"], path, metric, mode, out, tables)
    if "retrain" in kinds:
        sections += _retrain(trials, metric, tables)
    if kinds & {"search", "ablation"}:
        sections += _retrains(path, trials, tables)
    _write(title, sections, tables, out)
    return tables


def _write(title: str, sections: list[Section], tables: dict[str, pd.DataFrame], out: str) -> None:
    for name, df in tables.items():
        store.write_bytes(df.to_csv(index=False).encode(), store.join(out, f"{name}.csv"))
    text = to_markdown_text(title, sections, out)
    store.write_bytes(text.encode(), store.join(out, REPORT_FILE))
    store.write_bytes(to_html(title, sections).encode(), store.join(out, HTML_FILE))
    # the console gets the text and tables; the figures are in the files
    console = [Section(x.title, [b for b in x.blocks if not isinstance(b, Image)], x.level) for x in sections]
    console = [x for x in console if x.blocks]
    print(to_markdown_text(title, console, out))
    print(f"\nreport written to {out} ({REPORT_FILE}; {HTML_FILE}: open it in a browser, it holds every figure)")
