"""The real-data recipes' structure where it follows the original code (RECIPES.md): ResNet
initialisation, SimCLR v1's head and loss, DINO's crops, teacher momentum and ViT precision."""
import pytest
import torch
from torch import nn

import byol
import dino
import simclr
import vicreg
from common.monitor import embedding_std


class DeviceOnly:
    """The part of utils.Run that build() uses, on the CPU without processes."""
    device = torch.device("cpu")

    @staticmethod
    def prepare(model):
        return model


def real_args(script, *argv):
    return script.parse_args(["--pairs", "semantic", "--arch", "resnet18", *argv], real_data=True)


SMALL_HEADS = {simclr: {"proj_dim": 16}, vicreg: {"expander": "32-32-32"}, byol: {"hidden_dim": 32, "proj_dim": 16},
               dino: {"out_dim": 64}}


def last_bn_scales(backbone):
    return [block.bn2.weight for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
            for block in layer]


@pytest.mark.parametrize("script, zero", [(simclr, True), (vicreg, True), (byol, True), (dino, False)])
def test_resnets_zero_init_the_last_bn_of_each_block_where_the_original_does(script, zero):
    args = real_args(script, "--img-size", "32")
    vars(args).update(SMALL_HEADS[script])
    model = script.build(args, DeviceOnly())[0]
    backbone = model.encoder.backbone if script is byol else model.backbone
    scales = last_bn_scales(backbone)
    assert all(bool((s == 0).all()) is zero for s in scales)
    assert all(bool((b.bn1.weight == 1).all()) for layer in (backbone.layer1,) for b in layer)


def test_simclr_v1_head_ends_in_batchnorm_without_shift_and_sums_both_directions():
    args = real_args(simclr, "--proj-dim", "16")
    assert (args.proj_out_bn, args.loss_scale) == (True, 2.0)
    model = simclr.SimCLR(nn.Identity(), 32, 16, out_bn=True)
    linear, bn = model.projector[-2], model.projector[-1]
    assert isinstance(bn, nn.BatchNorm1d) and linear.bias is None
    assert not bn.bias.requires_grad and bn.weight.requires_grad
    z = model(torch.randn(8, 32))[0]
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)  # BN output, no shift
    x1, x2 = torch.randn(4, 32), torch.randn(4, 32)
    mean = simclr.simclr_loss(model, x1, x2, 0.1)[0]
    # v1: loss_a + loss_b, each direction's cross-entropy averaged over its N anchors
    z1, z2 = nn.functional.normalize(model(torch.cat([x1, x2]))[0], dim=1).chunk(2)
    mask = torch.eye(4, dtype=torch.bool)
    labels = torch.arange(4)

    def direction(a, b):
        logits = torch.cat([a @ b.T, (a @ a.T).masked_fill(mask, float("-inf"))], 1) / 0.1
        return nn.functional.cross_entropy(logits, labels)

    torch.testing.assert_close(simclr.simclr_loss(model, x1, x2, 0.1, 2.0)[0], direction(z1, z2) + direction(z2, z1))
    torch.testing.assert_close(2 * mean, direction(z1, z2) + direction(z2, z1))


def test_simclr_world_keeps_v1s_output_batchnorm_and_a_mean_loss():
    args = simclr.parse_args(["--pairs", "semantic"])
    assert (args.proj_out_bn, args.loss_scale) == (True, 1.0)
    assert isinstance(simclr.SimCLR(nn.Identity(), 32, 16).projector[-1], nn.Linear)


def test_simclr_collapse_monitor_reads_the_projection_before_its_output_batchnorm():
    # A head collapsed to one output direction (a rank-1 last Linear fed by the ReLU's non-negative
    # activations): the BatchNorm after it still spreads its output evenly, so only the projection
    # before the BatchNorm can show the collapse.
    torch.manual_seed(0)
    model = simclr.SimCLR(nn.Identity(), 32, 16, out_bn=True)
    with torch.no_grad():
        model.projector[3].weight.copy_(torch.outer(torch.randn(16), torch.rand(32)))
    x = torch.randn(64, 32)
    z, before_bn = model(x)
    assert embedding_std(before_bn).item() < 0.01 and embedding_std(z).item() > 0.9
    torch.testing.assert_close(simclr.simclr_loss(model, *x.chunk(2), 0.2)[1], before_bn[:32])


def test_dino_global_crops_momentum_and_vit_precision_follow_dino():
    real = dino.parse_args(["--pairs", "semantic"], real_data=True)
    assert (real.min_crop_scale, real.momentum_teacher, real.precision) == (0.14, 0.9995, "auto")
    world = dino.parse_args(["--pairs", "semantic"])
    assert (world.min_crop_scale, world.momentum_teacher) == (0.2, 0.99)
    assert simclr.parse_args(["--pairs", "semantic"], real_data=True).min_crop_scale == 0.08
    vit = dino.parse_args(["--pairs", "semantic", "--arch", "vit_small_patch8"], real_data=True)
    assert vit.precision == "fp32"
    asked = dino.parse_args(["--pairs", "semantic", "--arch", "vit_small_patch8", "--precision", "bf16"])
    assert asked.precision == "bf16"
