"""lovasz_softmax against the Lovász extension evaluated from its set definition, a hand value, gradcheck and the
all-ignored case."""

import pytest
import torch

from uda_ray.losses import lovasz_softmax


def jaccard_loss(fg: list[bool], wrong: set[int]) -> float:
    """Δ_J(S) = 1 − |fg ∖ S| / |fg ∪ S| for the set S of mispredicted pixels."""
    fg_set = {i for i, f in enumerate(fg) if f}
    return 1.0 - len(fg_set - wrong) / len(fg_set | wrong)


def reference(probs, labels, ignore=255):
    """Per present class: sort the pixels by error (largest first), add error × the Jaccard loss's increase when that
    pixel joins the wrong set; mean over the present classes."""
    num_classes = probs.shape[1]
    p = [probs[b, :, i, j] for b in range(probs.shape[0]) for i in range(probs.shape[2])
         for j in range(probs.shape[3])]
    y = [int(labels[b, i, j]) for b in range(probs.shape[0]) for i in range(probs.shape[2])
         for j in range(probs.shape[3])]
    keep = [k for k in range(len(y)) if y[k] != ignore]
    per_class = []
    for c in range(num_classes):
        fg = [y[k] == c for k in keep]
        if not any(fg):
            continue
        errors = [((1.0 if fg[n] else 0.0) - p[k][c]).abs() for n, k in enumerate(keep)]
        order = sorted(range(len(keep)), key=lambda n: -errors[n].item())
        total, wrong, previous = probs.sum() * 0, set(), 0.0
        for n in order:
            wrong.add(n)
            now = jaccard_loss(fg, wrong)
            total = total + errors[n] * (now - previous)
            previous = now
        per_class.append(total)
    return sum(per_class) / len(per_class)


def random_case(seed, shape=(2, 4, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    labels = torch.randint(0, shape[1] - 1, (shape[0], *shape[2:]), generator=g)  # the last class is absent
    labels[torch.rand(labels.shape, generator=g) < 0.25] = 255
    return probs, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_set_definition(seed):
    probs, labels = random_case(seed)
    got = lovasz_softmax(probs, labels)
    want = reference(probs, labels)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, probs)
    (g2,) = torch.autograd.grad(want, probs)
    torch.testing.assert_close(g1, g2)
    assert g1[:, -1].abs().max() == 0  # an absent class is not averaged over


def test_hand_value():
    # two pixels of class 0: errors 0.2 (fg, p = 0.8) and 0.6 (bg, p = 0.6), sorted (0.6 bg, 0.2 fg):
    # Δ({bg}) = 1 − 1/2, Δ({bg, fg}) = 1 − 0/2 → L_0 = 0.6 · 0.5 + 0.2 · 0.5 = 0.4; class 1 (fg pixel 1, error 0.6;
    # bg pixel 0, error 0.2): sorted (0.6 fg, 0.2 bg): Δ = 1, then 1 → L_1 = 0.6 · 1 + 0.2 · 0 = 0.6. Mean 0.5.
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]]).T.reshape(1, 2, 1, 2)  # pixel 0: (0.8, 0.2), pixel 1: (0.6, 0.4)
    labels = torch.tensor([[[0, 1]]])
    assert lovasz_softmax(probs, labels).item() == pytest.approx(0.5)


def test_gradcheck():
    probs, labels = random_case(3, shape=(1, 3, 2, 3))
    assert torch.autograd.gradcheck(lambda p: lovasz_softmax(p, labels), (probs,))


def test_all_ignored_is_zero_with_zero_gradient():
    probs = torch.softmax(torch.randn(2, 3, 2, 2), dim=1).requires_grad_()
    loss = lovasz_softmax(probs, torch.full((2, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0 and probs.grad.abs().max() == 0


def test_bad_input_is_an_error():
    probs = torch.softmax(torch.randn(1, 3, 2, 2), dim=1)
    with pytest.raises(ValueError, match="labels must lie in"):
        lovasz_softmax(probs, torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="expected probs"):
        lovasz_softmax(probs, torch.zeros(1, 2, 3, dtype=torch.long))
