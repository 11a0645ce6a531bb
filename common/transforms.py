"""View pipelines: the methods' augmentation recipes, the paper's ablations, evaluation transforms.

Training views (View) come in two stages: per image in the loader's workers, the crop and flip
to uint8 pixels plus the colour parameters drawn; per batch on the training device
(`colourise`), the colour operations and normalisation. Per-method settings follow each
method's original publication (shared/reference/recipes.md); `ablation` removes parts as in
the paper's Figure 5. Evaluation transforms map a PIL image to a normalised float tensor.
"""
import math
import random

import torch
import torch.nn.functional as F
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


# The colour parameters of one view (a row of View's second output): jitter factors (identity when
# jitter is not applied), the order of the four jitter operations, grayscale, blur sigma (0: no
# blur), solarize.
BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, SIGMA, SOLARIZE = 0, 1, 2, 3, slice(4, 8), 8, 9, 10
NUM_PARAMS = 11


class View:
    """One stochastic view, in two stages. Calling it (per image, in the loader's workers) does the
    geometry, a random resized crop and flip, to uint8 pixels, and draws the colour parameters
    (colour jitter, grayscale, blur with sigma ~ U(0.1, 2) at 224 px scaled with the image side,
    solarize); `colourise` applies them to a batch on any device and normalises. On a GPU the
    loader's CPUs then only decode and crop: the colour operations cost several times the crop."""

    def __init__(self, img_size, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5, solarize_p=0.0, ablation="full",
                 crop_scale=(0.08, 1.0)):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}")
        crop = v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC,
                                    antialias=True)
        flip = [] if ablation == "only_crop" else [v2.RandomHorizontalFlip()]
        self.geometry = v2.Compose([crop, *flip, v2.PILToTensor()])
        self.jitter = jitter if ablation in ("full", "no_gray") else None
        self.gray_p = 0.2 if ablation == "full" else 0.0
        self.blur_p = blur_p if ablation != "only_crop" else 0.0
        self.solarize_p = solarize_p if ablation != "only_crop" else 0.0
        self.sigma = (0.1 * img_size / 224, 2.0 * img_size / 224)

    def __call__(self, img):
        pixels = self.geometry(img)
        params = [1.0, 1.0, 1.0, 0.0, 0, 1, 2, 3, 0.0, 0.0, 0.0]
        if self.jitter and random.random() < 0.8:
            b, c, s, h = self.jitter
            params[:4] = [random.uniform(max(0, 1 - x), 1 + x) for x in (b, c, s)] + [random.uniform(-h, h)]
            params[ORDER] = random.sample(range(4), 4)
        params[GRAY] = float(random.random() < self.gray_p)
        if random.random() < self.blur_p:
            params[SIGMA] = random.uniform(*self.sigma)
        params[SOLARIZE] = float(random.random() < self.solarize_p)
        return pixels, torch.tensor(params)


def colourise(pixels, params):
    """Normalised float views from a batch of View outputs: uint8 pixels (B, 3, H, W) on the device
    that does the work, colour parameters (B, NUM_PARAMS) anywhere. The jitter operations follow
    torchvision's definitions (blends clamped to [0, 1], contrast around the mean gray level, hue
    rotated in HSV). Which images get which operation is decided on a CPU copy of the parameters;
    the choices reach the device in non-blocking copies, so on a GPU nothing here waits for it."""
    params = params.cpu()
    order = params[:, ORDER].long()
    # (jitter operation, images it applies to), in the order of application
    jittered = [(k, ((order[:, position] == k) & (params[:, k] != (0 if k == HUE else 1))).nonzero()[:, 0])
                for position in range(4) for k in range(4)]
    blurred = (params[:, SIGMA] > 0).nonzero()[:, 0]
    chosen = [images for _, images in jittered] + [blurred]
    *jittered_at, blurred_at = _copy_to(torch.cat(chosen), pixels.device).split([len(c) for c in chosen])
    values = _copy_to(params, pixels.device)
    x = pixels.float() / 255

    jitter_ops = (_brightness, _contrast, _saturation, _hue)
    for (k, images), at in zip(jittered, jittered_at):
        if len(images):
            x[at] = jitter_ops[k](x[at], values[at, k].view(-1, 1, 1, 1))
    x = torch.where(values[:, GRAY].view(-1, 1, 1, 1) > 0, _gray(x).expand_as(x), x)
    if len(blurred):
        x[blurred_at] = _gaussian_blur(x[blurred_at], values[blurred_at, SIGMA], params[blurred, SIGMA].max().item())
    x = torch.where((values[:, SOLARIZE].view(-1, 1, 1, 1) > 0) & (x >= 128 / 255), 1 - x, x)
    mean, std = _copy_to(_MEAN_STD, x.device)
    return (x - mean) / std


_MEAN_STD = torch.tensor([IMAGENET_MEAN, IMAGENET_STD]).view(2, 1, 3, 1, 1)


def _copy_to(tensor, device):
    """A CPU tensor on `device`. To a GPU from pinned memory without blocking: a plain copy there
    waits for all the work queued before it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _gray(x):
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # torchvision's weights


def _blend(x, other, ratio):
    return (ratio * x + (1 - ratio) * other).clamp_(0, 1)


def _brightness(x, factor):
    return _blend(x, 0, factor)


def _contrast(x, factor):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x, factor):
    return _blend(x, _gray(x), factor)


def _hue(x, shift):
    """Rotates the hue by `shift` turns, keeping saturation and value (RGB -> HSV -> RGB)."""
    value, _ = x.max(dim=1, keepdim=True)
    low, _ = x.min(dim=1, keepdim=True)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift, 1.0)
    # Each channel of an HSV colour: value - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6.
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # made there: no copy
    k = torch.remainder(n + 6 * hue, 6)
    return value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)


def _gaussian_blur(x, sigma, max_sigma):
    """Separable Gaussian blur, one sigma per image, reflect-padded to 3 sigma of the largest."""
    n, c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * max_sigma), h - 1, w - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets.square() / (2 * sigma.view(-1, 1).square()))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, 2 radius + 1)
    x = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    return x.view(n, c, h, w)


def to_tensor():
    return v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pair_views(method, img_size, ablation="full", crop_scale=(0.08, 1.0)):
    """[(view 1, 0), (view 2, 1)]: the two view pipelines of `method`, view 1 applied to image_a
    and view 2 to image_b (for augmented pairs both images are the same)."""
    jitter, blur, solarize = RECIPES[method]
    return [(View(img_size, jitter, blur[i], solarize[i], ablation, crop_scale), i) for i in range(2)]


def eval_transform(img_size, resize_ratio=256 / 224):
    """Resize the short side then centre-crop: the standard frozen-feature evaluation view."""
    return v2.Compose([
        v2.Resize(round(img_size * resize_ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        to_tensor(),
    ])
