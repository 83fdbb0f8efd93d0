"""Analysis of results folders with pandas: top trials, parameter importance, ablation statistics, plots."""

from uda_ray.analysis.ablation_stats import holm, learning_curves, paired_differences
from uda_ray.analysis.best import best_trials, config_from_row
from uda_ray.analysis.importance import param_importances, study_from_trials
from uda_ray.analysis.report import analyze

__all__ = [
    "analyze", "best_trials", "config_from_row", "holm", "learning_curves", "paired_differences",
    "param_importances", "study_from_trials",
]
