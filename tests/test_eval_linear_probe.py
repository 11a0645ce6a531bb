"""The linear probe's classifier: the optimum it reaches, separable data, the validation split and
the choice of l2 on it."""
import pytest
import torch
import torch.nn.functional as F

from eval.linear_probe import L2_GRID, accuracy, fit_logistic, stratified_split, train_probe
from tests.test_eval_datasets import one_thread  # noqa: F401  (autouse fixture)


def test_fit_reaches_the_regularised_optimum():
    """In float64 the autograd gradient of the objective vanishes at the returned weights (the
    hand-written gradient is right and L-BFGS converged); float32 lands next to that optimum."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 16, generator=g, dtype=torch.float64), torch.randint(5, (200,), generator=g)
    l2 = 0.05
    weight, bias = fit_logistic(x, y, 5, l2)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (F.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.square().sum()).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    weight32, bias32 = fit_logistic(x.float(), y, 5, l2)
    torch.testing.assert_close(weight32, weight.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(bias32, bias.float(), atol=2e-3, rtol=0)


def test_separable_classes_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    means = 10 * torch.randn(6, 32, generator=g)
    y = torch.arange(6).repeat(30)
    x = means[y] + torch.randn(len(y), 32, generator=g)
    test_y = torch.arange(6).repeat(20)
    test_x = means[test_y] + torch.randn(len(test_y), 32, generator=g)
    classifier, _ = train_probe(x, y, 6)
    assert accuracy(classifier, test_x, test_y) == 100.0


def test_l2_is_the_best_on_validation_ties_to_the_larger():
    """Two features share a large noise that only their difference cancels: strong shrinkage
    (towards the class means) misses it, so validation must move l2 down from the largest."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat(150)
    shared = 5 * torch.randn(300, generator=g)
    x = torch.stack([y + 0.1 * torch.randn(300, generator=g) + shared, shared + 0.1 * torch.randn(300, generator=g)], 1)
    _, search = train_probe(x, y, 2)
    scores = dict(zip(search["l2_grid"], search["val_accuracy"]))
    best = max(scores.values())
    assert search["l2"] == max(l2 for l2, s in scores.items() if s == best)
    assert search["l2"] < max(L2_GRID) and scores[search["l2"]] > scores[max(L2_GRID)]
    assert (search["num_fit"], search["num_val"]) == (240, 60)


def test_validation_split_is_stratified_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    fit, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(len(labels)))
    assert [int((labels[val] == c).sum()) for c in range(4)] == [2, 1, 1, 0]  # the lone class 3 stays in fit
    assert all((labels[fit] == c).any() for c in range(4))
    again, other = stratified_split(labels, 0.2, seed=0)[1], stratified_split(labels, 0.2, seed=1)[1]
    assert torch.equal(again, val) and not torch.equal(other, val)
    with pytest.raises(ValueError, match="validation"):
        stratified_split(torch.arange(5), 0.2)
