"""Speed of the C4 detector (eval/detection.py): seconds per training iteration and per test image
on synthetic images with a few boxes each, random-init backbone.

    python bench/detection_speed.py                                  # embedded-world settings, CPU
    python bench/detection_speed.py --arch resnet50 --size 800 --batch 2 --roi-size 14 \
        --rois-per-image 512 --test-proposals 1000 --device cuda    # the VOC configuration, per GPU
"""
import argparse
import time

import torch

from common.backbones import build_backbone
from eval.detection import build_detector, param_groups


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    p.add_argument("--size", type=int, default=96, help="image side (square images, no rescaling)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--roi-size", type=int, default=4)
    p.add_argument("--rois-per-image", type=int, default=16)
    p.add_argument("--test-proposals", type=int, default=50)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_detector(build_backbone(args.arch)[0], 20, (args.size,), args.size, args.roi_size,
                           args.rois_per_image, args.test_proposals).to(device)
    optimizer = torch.optim.SGD(param_groups(model, 1e-4), lr=1e-3, momentum=0.9)
    images = [torch.rand(3, args.size, args.size, device=device) for _ in range(args.batch)]
    corners = torch.rand(args.batch, 4, 2, device=device) * args.size * 0.6
    targets = [{"boxes": torch.cat([c, c + args.size * 0.3], 1), "labels": torch.randint(1, 21, (4,), device=device)}
               for c in corners]

    def timed(step):
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.iters

    def train_step():
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    train = timed(train_step)
    model.eval()
    with torch.no_grad():
        test = timed(lambda: model(images)) / args.batch
    print(f"{args.arch} C4, {args.batch} x {args.size} px, RoI {args.roi_size}, {args.rois_per_image} RoIs/img, "
          f"{torch.get_num_threads()} threads on {device}: train {train:.3f} s/iter, test {test:.3f} s/img")


if __name__ == "__main__":
    main()
