"""Linear probe on a frozen backbone: the study's transfer evaluation (its Figure 4, Tables 1, 4, 5).

    python -m eval.linear_probe --checkpoint RUN/backbone.pth --dataset stl10 --data-root DATA
    python -m eval.linear_probe --checkpoint RUN/backbone.pth --dataset stl10 --data-root DATA --crop random
    python -m eval.linear_probe --checkpoint RUN/backbone.pth --dataset embedded --split unseen

Protocol (SimCLR's transfer protocol: an L2-regularised multinomial logistic regression on frozen
features, fitted with L-BFGS, the regularisation chosen on a validation split; Chen et al. 2020):
1. Features: the global-pooled backbone output, backbone in eval mode (BN statistics frozen), of
   the centre view of every training and test image (eval.datasets: resize the short side to
   img_size and centre-crop img_size, which keeps the whole of a square image). Training images get
   no augmentation, so features are computed once per checkpoint and cached in RUN/features/.
2. Each feature is standardised with the mean and std of the set being fitted.
3. Classifier: softmax regression minimising mean cross-entropy + l2/2 * ||W||^2 (bias not
   penalised), full-batch L-BFGS from zero (strong Wolfe line search, history 20) for at most
   MAX_ITER = 100 iterations, i.e. about 100 passes over the features.
4. l2 is chosen from L2_GRID (10^0 down to 10^-6, one per decade; `--l2-per-decade 4` searches
   ssl-transfer's spacing, `--l2` fixes it) by accuracy on a stratified, seeded 20% of the
   training set, held out from a fit on the other 80%; ties go to the larger l2.
5. Refit on the whole training set with that l2 and evaluate once on the test set: the centre
   view, or with --crop random the random partial crops of the Table 4 test (eval.datasets; the
   classifier is always trained on centre views).
The result JSON (schema in eval/report.py) holds the accuracy, the settings above and the
validation accuracy of every l2.
"""
import argparse
import contextlib
import json
import time
from dataclasses import dataclass

import torch

from common import flags
from common.utils import run_main
from eval import report
from eval.datasets import add_eval_args, dataset_features, load_for_eval, result_path, view_protocol


def l2_grid(per_decade=1):
    """l2 from 1 down to 1e-6, `per_decade` values to a decade (ssl-transfer's linear.py searches
    4 a decade: 45 values over 11 decades)."""
    return tuple(10.0 ** (-k / per_decade) for k in range(6 * per_decade + 1))


L2_GRID = l2_grid()
VAL_FRACTION = 0.2
MAX_ITER = 100
# Below this many multiply-adds per matmul (N x D x C) a CPU fit runs on one thread: its per-op
# synchronisation costs more than a second thread gives (14x slower at 1000 x 256 x 100 on a
# busy 2-core machine; BENCHMARKS.md).
ONE_THREAD_BELOW = 10**8


@dataclass
class LinearClassifier:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x):
        return torch.addmm(self.bias, (x - self.mean) / self.std, self.weight)


def standardiser(x):
    """Per-feature mean and std (constant features keep a std of 1e-6 and end up at zero)."""
    return x.mean(0), x.std(0).clamp_min(1e-6)


def fit_logistic(x, y, num_classes, l2, max_iter=MAX_ITER):
    """(weight, bias) minimising mean cross-entropy(x @ weight + bias, y) + l2/2 ||weight||^2 with
    full-batch L-BFGS from zero. Gradients are written by hand: no autograd graph over the logits."""
    n, dim = x.shape
    weight, bias = x.new_zeros(dim, num_classes), x.new_zeros(num_classes)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    rows = torch.arange(n, device=x.device)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        logp = torch.addmm(bias, x, weight).log_softmax(1)
        loss = 0.5 * l2 * weight.square().sum() - logp[rows, y].mean()
        grad = logp.exp_()
        grad[rows, y] -= 1
        grad /= n
        torch.mm(x.T, grad, out=weight.grad)
        weight.grad.add_(weight, alpha=l2)
        torch.sum(grad, 0, out=bias.grad)
        return loss

    with cpu_threads(1 if x.device.type == "cpu" and n * dim * num_classes < ONE_THREAD_BELOW else None):
        optimizer.step(closure)
    return weight, bias


@contextlib.contextmanager
def cpu_threads(count=None):
    """Runs the block with `count` torch CPU threads (None: unchanged)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_classifier(x, y, num_classes, l2, max_iter=MAX_ITER):
    """Steps 2-3 of the protocol: standardise, then fit."""
    mean, std = standardiser(x)
    weight, bias = fit_logistic((x - mean) / std, y, num_classes, l2, max_iter)
    return LinearClassifier(mean, std, weight, bias)


def accuracy(classifier, x, y):
    """Top-1 accuracy in percent."""
    return 100.0 * (classifier.logits(x).argmax(1) == y).float().mean().item()


def stratified_split(labels, fraction=VAL_FRACTION, seed=0):
    """(fit indices, validation indices): `fraction` of each class (at least one image of every
    class with two or more, never its last one), drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    held = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    val = torch.cat(held).sort().values
    if len(val) == 0:
        raise ValueError("too few training images to hold out a validation split (every class has one)")
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def train_probe(x, y, num_classes, grid=L2_GRID, val_fraction=VAL_FRACTION, seed=0, max_iter=MAX_ITER):
    """The protocol's steps 2-5 on training features: returns (classifier fitted on all of x,
    search) with search = {"l2": chosen, "l2_grid": [...], "val_accuracy": [...] per l2}."""
    fit_idx, val_idx = (i.to(x.device) for i in stratified_split(y, val_fraction, seed))
    grid = sorted(grid, reverse=True)
    scores = [accuracy(fit_classifier(x[fit_idx], y[fit_idx], num_classes, l2, max_iter), x[val_idx], y[val_idx])
              for l2 in grid]
    l2 = max(zip(scores, grid))[1]  # the best validation accuracy, ties to the larger l2
    classifier = fit_classifier(x, y, num_classes, l2, max_iter)
    search = {"l2": l2, "l2_grid": grid, "val_accuracy": scores, "num_fit": len(fit_idx), "num_val": len(val_idx)}
    return classifier, search


def protocol(args, search):
    selection = "fixed by --l2" if args.l2 else "validation accuracy"
    return {"name": "l2-logistic-regression", "features": "global-pooled, backbone in eval mode, centre view",
            "train_view": view_protocol(args.img_size, "center", args.seed),
            "test_view": view_protocol(args.img_size, args.crop, args.seed),
            "standardise": "fitting set mean/std", "optimizer": "full-batch L-BFGS, strong Wolfe, history 20",
            "max_iter": MAX_ITER, "val_fraction": VAL_FRACTION, "selection": selection, **search}


def main(argv=None):
    parser = flags.Parser(prog="python -m eval.linear_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--l2-per-decade", type=flags.POSITIVE_INT, default=1,
                      help="l2 values searched per decade from 1 to 1e-6 (ssl-transfer's spacing is 4)")
    grid.add_argument("--l2", type=flags.POSITIVE, help="a fixed l2, no search (as ssl-transfer's --C fixes its C)")
    args = parser.parse_args(argv)
    start = time.time()
    backbone, _ = load_for_eval(args)
    train_x, train_y, classes = dataset_features(args, backbone, "train")
    test_x, test_y, _ = dataset_features(args, backbone, "test", args.crop)
    device = torch.device(args.device)
    classifier, search = train_probe(train_x.to(device), train_y.to(device), len(classes),
                                     (args.l2,) if args.l2 else l2_grid(args.l2_per_decade), seed=args.seed)
    acc = accuracy(classifier, test_x.to(device), test_y.to(device))
    record = report.result_record(args, "linear", accuracy=acc, num_classes=len(classes), num_train=len(train_y),
                                  num_test=len(test_y), protocol=protocol(args, search), time_s=time.time() - start)
    path = report.write_result(record, result_path(args, "linear", args.crop))
    print(json.dumps({k: record[k] for k in ("eval", "dataset", "split", "crop", "accuracy")} | {"out": str(path)}))


if __name__ == "__main__":
    run_main(main)
