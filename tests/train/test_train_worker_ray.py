"""Ray Train workers: DDP over 2 gloo workers equals one process with the doubled batch; early-stopped DDP trials
release their workers, also beside another Ray; a 2-node cluster runs trials on both nodes."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SYNTHETIC, tiny_overrides
from uda_ray.config import apply_overrides, load_config
from uda_ray.results.store import load_trials
from uda_ray.train.loop import fit
from uda_ray.train.worker import Scaling, run_trainer

pytestmark = pytest.mark.ray



def _ddp_config(cache: Path, batch: int):
    # per-sample norms only (LayerNorm backbone, GroupNorm decoder) and source-only, so the loss of a batch does
    # not depend on how it is split over workers; the crop is the whole image so every split sees the same pixels
    return apply_overrides(load_config(SYNTHETIC), tiny_overrides(
        cache, **{"model.backbone": "test_convnext", "model.decoder_norm": "group", "loss.mix_weight": 0.0,
                  "data.crop": [32, 64], "data.batch_size": batch, "run.iterations": 3, "run.eval_every": 3,
                  "run.checkpoint_every": 3, "optim.warmup_iters": 0}))


def test_two_workers_match_one_process_with_double_batch(ray_local, tmp_path: Path, synthetic_cache: Path):
    reports: list[dict] = []
    fit(_ddp_config(synthetic_cache, 4), work_dir=tmp_path / "single", report=lambda m, c: reports.append(m))
    result = run_trainer(_ddp_config(synthetic_cache, 2), Scaling(num_workers=2, cpus_per_worker=1),
                         name="ddp", storage_path=str(tmp_path / "storage"))
    assert result.error is None
    ddp, single = result.metrics, reports[-1]
    assert int(ddp["iteration"]) == 3
    # the loss after two synchronised updates, and the mIoU from the all-reduced confusion matrix
    assert ddp["train/loss"] == pytest.approx(single["train/loss"], rel=2e-3)
    assert ddp["val/miou"] == pytest.approx(single["val/miou"], abs=1e-6)
    assert result.checkpoint is not None  # reported by rank 0


# every term of the DeepLabV2 methods at once (CFContra's banks, SDCA's statistics, the target-information views and
# target→source mix, multi-level MinEnt): their cross-rank state under DDP on the network they published on
DEEPLABV2_METHODS = {"loss.entropy.weight": 0.001, "loss.entropy.aux_weight": 0.0002, "loss.cfcontra.weight": 0.001,
                     "loss.cfcontra.proj_dim": 64, "loss.sdca.weight_feat": 1.0, "loss.sdca.weight_out": 1.0,
                     "loss.cross_view.pixel_weight": 0.01, "loss.cross_view.proto_weight": 0.01,
                     "loss.cross_view.grid_size": 16, "mix.target_to_source.enabled": True}


@pytest.mark.parametrize("recipe", ["deeplabv2_methods", "hrda_all"])
@pytest.mark.filterwarnings("ignore:RCS. no source image:UserWarning")
def test_recipes_train_under_two_worker_ddp(ray_local, tmp_path: Path, synthetic_cache: Path, recipe: str):
    """DeepLabV2's recipe (frozen BatchNorm, auxiliary classifier, SGD) with every DeepLabV2 method's term, and
    DAFormer's recipe under HRDA with CLUDA's multi-resolution contrast and MIC (RCS statistics computed by rank 0
    while rank 1 waits, FD, the teacher's batch statistics; the feature weighter and the scale attention get
    gradients on every rank; slide evaluation) run on 2 gloo workers and report one finite loss per iteration,
    evaluation included."""
    from tests.train.test_train_recipes import recipe_config

    base = {"hrda_all": "cluda_hrda", "deeplabv2_methods": "deeplabv2"}.get(recipe, recipe)
    cfg = recipe_config(synthetic_cache, base)
    if recipe == "deeplabv2_methods":
        cfg = apply_overrides(cfg, DEEPLABV2_METHODS)
    if recipe == "hrda_all":
        cfg = apply_overrides(cfg, {"loss.mic.weight": 1.0, "loss.mic.block_size": 8})
    cfg = apply_overrides(cfg, {"data.rcs.stats_dir": str(tmp_path / "rcs")})
    result = run_trainer(cfg, Scaling(num_workers=2, cpus_per_worker=1), name=f"ddp-{recipe}",
                         storage_path=str(tmp_path / "storage"))
    assert result.error is None, result.error
    assert int(result.metrics["iteration"]) == cfg.run.iterations
    assert math.isfinite(result.metrics["train/loss"]) and "val/miou" in result.metrics
    assert result.checkpoint is not None


@pytest.fixture()
def another_ray():
    """A second Ray on the machine, in a process of its own, as a `ray start` cluster or another search would be."""
    code = ("import sys, ray; ray.init(address='local', num_cpus=0, include_dashboard=False, log_to_driver=False); "
            "print('up', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield
    finally:
        proc.stdin.close()  # the process ends its Ray as it exits
        proc.wait(timeout=60)


@pytest.mark.timeout(1200)  # about 100 s on an idle 2-core machine; Ray's niced workers slow down under load
def test_early_stopped_ddp_trials_release_their_workers(ray_local, another_ray, tmp_path: Path,
                                                        synthetic_cache: Path):
    """Each trial's Train worker takes both CPUs: a leaked worker would leave the next trial waiting forever. With
    another Ray on the machine, Ray Train's cleaner of a stopped run's placement group must still ask the search's
    own Ray whether the run's controller is alive (``uda_ray.tune.local_ray.start``)."""
    import ray
    import yaml
    from ray.util.state import list_actors

    from uda_ray.tune.search import run_search

    space = {
        "experiment": "ddp", "base": {"config": str(SYNTHETIC), "overrides": tiny_overrides(synthetic_cache)},
        "metric": "train/loss", "mode": "min", "sampler": {"type": "random", "seed": 46}, "num_samples": 3,
        "max_concurrent": 1, "scheduler": {"type": "asha", "grace_period": 2, "max_t": 6, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 2},
        # seed 46 draws 0.1, 50, 50: the second trial is stopped at the first rung and the third must still start
        "params": {"loss.source_weight": {"choice": [0.1, 50.0]}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space))
    out = run_search(path, storage=str(tmp_path / "results"))
    trials = load_trials(out.experiment.uri).sort_values("started_at").reset_index(drop=True)
    assert len(trials) == 3
    assert set(trials["status"]) <= {"PRUNED", "TERMINATED"}
    pruned = trials.index[trials["status"] == "PRUNED"]
    assert len(pruned) >= 1 and (trials.loc[pruned, "iterations"] < 6).all()
    # a trial started after the first stopped one, and ran to the end or its own rung
    later = trials.loc[pruned[0] + 1:]
    assert len(later) >= 1 and (later["iterations"] >= 2).all()
    # and nothing is left holding the CPUs once the last trial's process has exited
    deadline = time.monotonic() + 60
    while True:
        workers = list_actors(address=ray.get_runtime_context().gcs_address, limit=100,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        free = ray.available_resources().get("CPU", 0.0)
        if (not workers and free == 2.0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert workers == [] and free == 2.0


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path: Path, synthetic_cache: Path):
    import ray
    import yaml
    from ray.cluster_utils import Cluster

    from uda_ray.tune.search import run_search

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    try:
        space = {
            "experiment": "two", "base": {"config": str(SYNTHETIC), "overrides": tiny_overrides(synthetic_cache)},
            "metric": "val/miou", "mode": "max", "sampler": {"type": "random", "seed": 0}, "num_samples": 2,
            "max_concurrent": 2, "resources": {"workers": 0, "cpus_per_worker": 1},
            "params": {"teacher.pseudo_threshold": {"uniform": [0.3, 0.9]}},
        }
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(space))
        out = run_search(path, address=cluster.address, storage=str(tmp_path / "results"))
        trials = load_trials(out.experiment.uri)
        assert len(trials) == 2
        # the trials' actors as this cluster's GCS lists them (the state API goes through whichever dashboard the
        # machine's newest Ray names, which on a machine running other Rays may not be this cluster's)
        actors = cluster.global_state.actor_table(None).values()
        nodes = {a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "ImplicitFunc"}
        # Late in a full run, once through the state API and once through the GCS itself, no ended trial's actor was
        # listed at all (never when run alone). Each node has one CPU and a trial's actor holds one while the trial
        # runs, so two trials that ran at the same time ran on both nodes: that is the evidence then.
        overlapped = trials["started_at"].max() < trials["ended_at"].min()
        assert len(nodes) == 2 or (not nodes and overlapped), (nodes, trials[["started_at", "ended_at"]])
    finally:
        ray.shutdown()
        cluster.shutdown()
