"""Shared fixtures: a tiny synthetic-pair configuration that trains in about a second per run on one CPU, and one
local Ray for the tests that need one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "search_spaces" / "base" / "synthetic.yaml"


def tiny_overrides(cache: Path, **extra: Any) -> dict[str, Any]:
    """Overrides of base/synthetic.yaml: 32×64 images, 6+6 train and 3 val images, a 0.4M-parameter model."""
    out: dict[str, Any] = {
        "data.synthetic.cache_dir": str(cache), "data.synthetic.num_source": 6, "data.synthetic.num_target": 6,
        "data.synthetic.num_val": 3, "data.synthetic.height": 32, "data.synthetic.width": 64,
        "data.source_resize": [32, 64], "data.target_resize": [32, 64], "data.val_resize": [32, 64],
        "data.crop": [32, 32], "data.batch_size": 2,
        "model.backbone": "test_resnet", "model.embed_dim": 8, "model.dropout": 0.0,
        "optim.lr": 1e-3, "optim.warmup_iters": 2, "teacher.pseudo_threshold": 0.5,
        "run.iterations": 6, "run.eval_every": 3, "run.checkpoint_every": 3, "run.log_every": 1, "run.threads": 1,
    }
    out.update(extra)
    return out


def edited(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of a YAML mapping with changes; ``a__b=v`` sets spec["a"]["b"], ``a__b=None`` deletes it."""
    out = copy.deepcopy(spec)
    for key, value in changes.items():
        node = out
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return out


SHALLOW_DEPTHS = (1, 1, 2, 1)  # blocks per ResNet stage of the quick DeepLabV2 networks; the widths stay ResNet-101's


@pytest.fixture
def shallow_resnets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segmenter builds both DeepLabV2 ResNets (caffe and torchvision) with ``SHALLOW_DEPTHS`` blocks: the recipes,
    shapes and loaders stay those of ResNet-101 (whose full depth its own tests check), at a fraction of the time."""
    import uda_ray.models.segmenter as segmenter
    from uda_ray.models.backbones.deeplabv2 import DeepLabV2ResNet
    from uda_ray.models.backbones.torchvision_resnet import TorchvisionResNet

    monkeypatch.setattr(segmenter, "DeepLabV2ResNet", lambda: DeepLabV2ResNet(SHALLOW_DEPTHS))
    monkeypatch.setattr(segmenter, "TorchvisionResNet",
                        lambda frozen_bn: TorchvisionResNet(frozen_bn=frozen_bn, depths=SHALLOW_DEPTHS))


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic cache folder for the whole session (the tiny pair is generated once)."""
    return tmp_path_factory.mktemp("synthetic-cache")


# ------------------------------------------------------------------------------------------------------------ Ray
def _shares_ray(item: pytest.Item) -> bool:
    return "ray_local" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``ray`` run last, first those on the shared local Ray (``ray_local``) one after another, then
    those that start their own (a cluster, the README's and the CLI's commands); each group in its usual order."""
    items.sort(key=lambda item: (item.get_closest_marker("ray") is not None, not _shares_ray(item)))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``ray`` that does not take ``ray_local`` starts a Ray of its own: the shared one is ended first,
    so that no two Rays share the machine's cores."""
    if item.get_closest_marker("ray") is not None and not _shares_ray(item):
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray of 2 CPUs shared by the tests that take it (started by the first, ended after the last), with its
    dashboard: Ray's state API is what cleans up the workers of a Train run that Tune stopped. Started as
    ``init_ray`` starts one (``uda_ray.tune.local_ray.start``: every process of the job finds its state API and has
    ``TUNE_DISABLE_STRICT_METRIC_CHECKING``), with one thread per process."""
    import os

    import ray

    from uda_ray.tune import local_ray

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    local_ray.start(num_cpus=2,
                    runtime_env={"env_vars": {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()
