"""Backbones: torchvision ResNets, timm's ViT-S/8, and a small convnet and a small ViT sized for
the embedded world on 2 CPU cores.

`build_backbone` returns a model that maps images to pooled features (no classifier). Its
state dict is what a run saves as `backbone.pth`; `load_backbone` rebuilds the model from such a
file alone, so evaluation needs nothing but the file.
"""
from pathlib import Path

import torch
import torchvision
from torch import nn

ARCHS = ("resnet50", "resnet18", "convnet", "vit_small_patch8", "vit_tiny6_patch8")
CONVNET_WIDTH = 16  # the embedded world's default (--width)


class ConvNet(nn.Module):
    """Seven 3x3 conv-BN-ReLU layers, width doubling at each of three 2x downsamplings, then
    global average pooling (8 x width features). At width 16 about 1 ms of one CPU core per
    32-px training view, the embedded world's default backbone."""

    def __init__(self, width=CONVNET_WIDTH):
        super().__init__()
        widths = [width, width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width]
        strides = [1, 1, 2, 1, 2, 1, 2]
        layers, cin = [], 3
        for cout, stride in zip(widths, strides):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.num_features = cin

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


def build_backbone(arch, img_size=224, width=CONVNET_WIDTH, drop_path_rate=0.0, weights=None, zero_init_residual=False):
    """Returns (backbone, feature dimension), newly initialised or, with `weights` (a backbone.pth of
    the same architecture, or its state dict), starting from those. zero_init_residual (ResNets):
    the last BatchNorm scale of each residual block starts at 0, so each block starts as the identity."""
    if arch in ("resnet50", "resnet18"):
        model = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
        dim = model.fc.in_features
        model.fc = nn.Identity()
    elif arch == "convnet":
        model = ConvNet(width)
        dim = model.num_features
    elif arch == "vit_small_patch8":
        import timm

        model = timm.create_model("vit_small_patch8_224", num_classes=0, img_size=img_size,
                                  drop_path_rate=drop_path_rate, dynamic_img_size=True)
        dim = model.num_features
    elif arch == "vit_tiny6_patch8":
        # The world's ViT for DINO (Table 3): ViT-Ti's width (192, 3 heads) at half its depth, with
        # ViT-S/8's patch size, so 16 patches of a 32-px image: sized for the CPU budget.
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                                  num_classes=0, drop_path_rate=drop_path_rate, dynamic_img_size=True)
        dim = model.num_features
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")
    if isinstance(weights, (str, Path)):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    return model, dim


def infer_arch(state_dict):
    """Architecture (and convnet width) of a backbone state dict, from its keys and shapes."""
    if "features.0.weight" in state_dict:
        return "convnet", state_dict["features.0.weight"].shape[0]
    if "cls_token" in state_dict:
        return ("vit_small_patch8" if state_dict["cls_token"].shape[-1] == 384 else "vit_tiny6_patch8"), None
    if "layer1.0.conv3.weight" in state_dict:
        return "resnet50", None
    if "layer1.0.conv1.weight" in state_dict:
        return "resnet18", None
    raise ValueError("state dict matches none of the known backbones " + str(ARCHS))


def load_backbone(path, img_size=224):
    """Rebuilds a backbone from its `backbone.pth`; returns (model, feature dimension)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    arch, width = infer_arch(state)
    return build_backbone(arch, img_size, width=width or CONVNET_WIDTH, weights=state)
