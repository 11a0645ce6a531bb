"""View pipelines: the methods' augmentation recipes, the paper's ablations, evaluation transforms.

Every pipeline maps a PIL RGB image to a normalised float tensor. Per-method settings follow
each method's original publication (shared/reference/recipes.md); `ablation` removes parts
as in the paper's Figure 5.
"""
import random

import torch
from PIL import ImageFilter, ImageOps
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ABLATIONS = ("full", "no_gray", "no_color", "only_crop")

# method: (colour jitter (brightness, contrast, saturation, hue), blur p per view, solarize p per view)
RECIPES = {
    "simclr": ((0.8, 0.8, 0.8, 0.2), (0.5, 0.5), (0.0, 0.0)),
    "byol": ((0.4, 0.4, 0.2, 0.1), (1.0, 0.1), (0.0, 0.2)),
    "vicreg": ((0.4, 0.4, 0.2, 0.1), (1.0, 0.1), (0.0, 0.2)),
    "dino": ((0.4, 0.4, 0.2, 0.1), (1.0, 0.1), (0.0, 0.2)),
}


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U(0.1, 2.0) at 224 px, scaled with the image side so the
    kernel stays about 10% of it (at 32 px the blur is nearly a no-op, as in CIFAR recipes)."""

    def __init__(self, img_size, sigma=(0.1, 2.0)):
        self.sigma = tuple(s * img_size / 224 for s in sigma)

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    def __call__(self, img):
        return ImageOps.solarize(img, 128)


def to_tensor():
    return v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def view_pipeline(img_size, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5, solarize_p=0.0, ablation="full",
                  crop_scale=(0.08, 1.0)):
    """One stochastic view: random resized crop, flip, colour jitter, grayscale, blur, solarize."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}")
    ops = [v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if ablation != "only_crop":
        ops.append(v2.RandomHorizontalFlip())
        if ablation != "no_color":
            ops.append(v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8))
            if ablation != "no_gray":
                ops.append(v2.RandomGrayscale(p=0.2))
        if blur_p > 0:
            ops.append(v2.RandomApply([GaussianBlur(img_size)], p=blur_p))
        if solarize_p > 0:
            ops.append(v2.RandomApply([Solarize()], p=solarize_p))
    return v2.Compose(ops + [to_tensor()])


def pair_views(method, img_size, ablation="full", crop_scale=(0.08, 1.0)):
    """[(view 1, 0), (view 2, 1)]: the two view pipelines of `method`, view 1 applied to image_a
    and view 2 to image_b (for augmented pairs both images are the same)."""
    jitter, blur, solarize = RECIPES[method]
    return [(view_pipeline(img_size, jitter, blur[i], solarize[i], ablation, crop_scale), i) for i in range(2)]


def eval_transform(img_size, resize_ratio=256 / 224):
    """Resize the short side then centre-crop: the standard frozen-feature evaluation view."""
    return v2.Compose([
        v2.Resize(round(img_size * resize_ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        to_tensor(),
    ])
