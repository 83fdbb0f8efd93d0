"""Selection and report halves of the target val split (``eval.holdout``).

Searching on the split you report inflates the reported number: ASHA, Optuna and the choice of the best trial all
pick whatever scored highest on those images, so part of the winner's margin is the noise of that split. With
``eval.holdout`` the val split is cut once, the same way for every trial of a search, into a *selection* half
(reported as ``val/*``: what ASHA, Optuna and the best trial see) and a *report* half (``holdout/*``: what retrain
and the final tables report, never used to choose anything).

The cut is by group: for Cityscapes a group is a city (``leftImg8bit/val/<city>/``), so the same streets never
appear in both halves; for data without groups every image is its own group. The groups are put in a seeded random
order and each is added to the half that holds fewer images so far (the selection half on ties), so the halves are
as even as whole groups allow (Cityscapes val: 267 + 59 + 174 images in three cities, e.g. 233 / 267).

A val split whose images are all in one group (the built-in synthetic pair's one city ``synthcity``, a Cityscapes
folder holding one city) cannot be cut by group; it is cut by image instead, seeded the same way, and the run says
so. The halves then share a city, so they are less independent than two cities would be (``holdout_basis``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def holdout_basis(groups: Sequence[str]) -> str:
    """What the cut is made by: ``"group"`` (e.g. city), or ``"image"`` when every image is in one group."""
    return "group" if len(set(groups)) > 1 else "image"


def holdout_split(groups: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """``(selection, report)``: sorted image indices of the two halves for per-image ``groups`` (see above); by
    image when there is a single group, with one line saying so."""
    if len(groups) < 2:
        raise ValueError(f"eval.holdout: the val split has {len(groups)} image(s): need at least 2 to split it")
    if holdout_basis(groups) == "image":
        print(f"[uda-ray] eval.holdout: the {len(groups)} val images are all in one group ({groups[0]!r}), so the "
              "split is cut by image (seeded by eval.holdout_seed) instead of by group", flush=True)
        groups = [f"{i:09d}" for i in range(len(groups))]
    names = sorted(set(groups))
    members: dict[str, list[int]] = {g: [] for g in names}
    for i, g in enumerate(groups):
        members[g].append(i)
    order = np.random.default_rng([seed, 7]).permutation(len(names))
    halves: tuple[list[int], list[int]] = ([], [])
    for k in order:
        target = halves[0] if len(halves[0]) <= len(halves[1]) else halves[1]
        target.extend(members[names[k]])
    return sorted(halves[0]), sorted(halves[1])


def image_groups(dataset: str, images: Sequence[Path]) -> list[str]:
    """The group of each val image: its city folder for Cityscapes, the image itself otherwise."""
    if dataset == "cityscapes":
        return [Path(p).parent.name for p in images]
    return [str(p) for p in images]
