"""Linear-probe speed on cached features: 50,000 x 2048 features, 100 classes, 100 L-BFGS
iterations (about 100 passes over the features), as eval.linear_probe fits them.

    python bench/linear_probe.py                 # one fit at one l2 (the target: under 1 minute on 2 cores)
    python bench/linear_probe.py --search        # the whole protocol: l2 search on 80/20, then the refit

The features have a learnable structure (ReLU of a random projection of noisy class means in a
64-d latent space), so the fit does the work of a real probe rather than stopping early.
"""
import argparse
import math
import time

import torch

from eval.linear_probe import MAX_ITER, accuracy, fit_classifier, train_probe


def features(sizes, dim, classes):
    """(x, y) sets of the given sizes from one synthetic feature distribution."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(classes, 64, generator=g) * 0.35
    projection = torch.randn(64, dim, generator=g) / math.sqrt(64)
    sets = []
    for n in sizes:
        y = torch.randint(classes, (n,), generator=g)
        latent = means[y] + torch.randn(n, 64, generator=g)
        sets.append((torch.relu(latent @ projection + 0.1 * torch.randn(n, dim, generator=g)), y))
    return sets


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--search", action="store_true", help="time the l2 search and refit too")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    (x, y), (test_x, test_y) = [(a.to(device), b.to(device))
                                for a, b in features((args.n, 10_000), args.dim, args.classes)]
    # One pass = forward and backward over all features, the unit an L-BFGS iteration costs (or more).
    w = torch.zeros(args.dim, args.classes, device=device)
    start = time.perf_counter()
    for _ in range(3):
        g = torch.softmax(x @ w, 1)
        torch.mm(x.T, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_pass = (time.perf_counter() - start) / 3
    start, cpu = time.perf_counter(), time.process_time()
    if args.search:
        clf, search = train_probe(x, y, args.classes)
        what = f"search over {len(search['l2_grid'])} l2 values + refit (chose l2={search['l2']:g})"
    else:
        clf = fit_classifier(x, y, args.classes, args.l2)
        what = f"one fit, l2={args.l2:g}, at most {MAX_ITER} iterations"
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    # On a shared machine the CPU time of this process shows what the wall time would be alone.
    print(f"{args.n} x {args.dim}, {args.classes} classes, {device.type} ({torch.get_num_threads()} threads): "
          f"{what}: {elapsed:.1f} s wall, {cpu:.1f} s CPU; one pass {per_pass * 1e3:.0f} ms; "
          f"train acc {accuracy(clf, x, y):.1f}%, test acc {accuracy(clf, test_x, test_y):.1f}%")


if __name__ == "__main__":
    main()
