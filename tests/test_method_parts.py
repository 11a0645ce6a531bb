"""The pieces of vicreg.py, byol.py and dino.py against small hand-computed cases: the EMA teacher
and its momentum schedule; DINO's loss, centre, sharpening, head, gradient clipping and views;
BYOL's loss; the VICReg and BYOL heads; the collapse monitor."""
import argparse
import math

import pytest
import torch
from PIL import Image
from torch import nn

import byol
import dino
import vicreg
from common import ema, monitor, optim, utils

LN3 = math.log(3)


def test_momentum_schedule_is_byols_cosine_to_one():
    # K = 4 steps, tau_k = 1 - (1 - 0.99) * (cos(pi k / 4) + 1) / 2, worked by hand.
    expected = [0.99, 0.99146447, 0.995, 0.99853553]
    assert ema.momentum_schedule(0.99, epochs=2, steps_per_epoch=2).tolist() == pytest.approx(expected, abs=1e-8)


def test_ema_update_moves_parameters_and_leaves_buffers():
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        student.weight.fill_(3.0)
        teacher.weight.fill_(1.0)
        teacher.running_mean.fill_(7.0)
    ema.ema_update(teacher, student, 0.75)
    assert teacher.weight.tolist() == [1.5, 1.5]  # 0.75 * 1 + 0.25 * 3
    ema.ema_update(teacher, student, 0.5)
    assert teacher.weight.tolist() == [2.25, 2.25]  # 0.5 * 1.5 + 0.5 * 3
    assert teacher.running_mean.tolist() == [7.0, 7.0] and student.weight.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError):
        ema.ema_update(teacher, nn.Linear(2, 2), 0.5)


def logits(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# Two views, one sample, two dimensions. Student (temperature 0.1): view 0 gives softmax (1/2, 1/2),
# view 1 gives (3/4, 1/4). Teacher (temperature 0.04): global view 0 gives (3/4, 1/4), view 1 (1/2, 1/2).
STUDENT = logits([0.0, 0.0], [0.1 * LN3, 0.0])
TEACHER = logits([0.04 * LN3, 0.0], [0.0, 0.0])
H_34_vs_34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623351
H_half_vs_34 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))  # 0.8369882


def test_dino_loss_pairs_each_teacher_view_with_the_other_student_views():
    zero = torch.zeros(2)
    # (teacher 0, student 1) and (teacher 1, student 0); same-view pairs are left out.
    targets = dino.teacher_targets(TEACHER, zero, 0.04)
    assert targets.tolist() == [pytest.approx([0.75, 0.25]), pytest.approx([0.5, 0.5])]
    loss = dino.dino_loss(STUDENT, targets, 0.1)
    assert loss.item() == pytest.approx((H_34_vs_34 + math.log(2)) / 2, abs=1e-6)  # 0.6277412
    # A third (local) student view pairs with both teacher views: four terms.
    local = torch.cat([STUDENT, logits([0.0, 0.0])])
    loss = dino.dino_loss(local, targets, 0.1)
    assert loss.item() == pytest.approx((H_34_vs_34 + 3 * math.log(2)) / 4, abs=1e-6)  # 0.6604442


def test_dino_loss_centres_and_sharpens_the_teacher():
    # Centring by (0.04 ln 3, 0): teacher view 0 becomes (1/2, 1/2), view 1 becomes (1/4, 3/4).
    center = torch.tensor([0.04 * LN3, 0.0])
    targets = dino.teacher_targets(TEACHER, center, 0.04)
    assert targets.tolist() == [pytest.approx([0.5, 0.5]), pytest.approx([0.25, 0.75])]
    loss = dino.dino_loss(STUDENT, targets, 0.1)
    assert loss.item() == pytest.approx((H_half_vs_34 + math.log(2)) / 2, abs=1e-6)  # 0.7650677
    # Halving the teacher temperature squares the odds: view 0 becomes (9/10, 1/10).
    targets = dino.teacher_targets(TEACHER, torch.zeros(2), 0.02)
    assert targets[0].tolist() == pytest.approx([0.9, 0.1])
    loss = dino.dino_loss(STUDENT, targets, 0.1)
    sharp = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))  # 0.3975433
    assert loss.item() == pytest.approx((sharp + math.log(2)) / 2, abs=1e-6)


def test_dino_loss_sends_gradient_to_the_student_only():
    student, teacher = STUDENT.clone().requires_grad_(), TEACHER.clone().requires_grad_()
    dino.dino_loss(student, dino.teacher_targets(teacher, torch.zeros(2), 0.04), 0.1).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_center_is_a_running_mean_of_teacher_outputs():
    center = torch.zeros(2)
    dino.update_center(center, logits([1.0, 2.0], [3.0, 4.0]), 0.9)
    assert center.tolist() == pytest.approx([0.2, 0.3])  # 0.9 * 0 + 0.1 * (2, 3)
    dino.update_center(center, logits([1.0, 2.0], [3.0, 4.0]), 0.9)
    assert center.tolist() == pytest.approx([0.38, 0.57])  # 0.9 * (0.2, 0.3) + 0.1 * (2, 3)


def test_gradients_are_clipped_per_parameter():
    model = nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5: scaled to norm 1
    model.bias.grad = torch.tensor([0.5])  # norm 0.5: left alone (a global clip would scale it too)
    dino.clip_gradients(model, 1.0)
    assert model.weight.grad.tolist()[0] == pytest.approx([0.6, 0.8], abs=1e-6)
    assert model.bias.grad.tolist() == [0.5]


@pytest.mark.parametrize("norm_last_layer, bn", [(True, False), (False, False), (True, True)])
def test_head_is_an_mlp_to_a_normalised_bottleneck_and_a_weight_normalised_layer(norm_last_layer, bn):
    head = dino.DINOHead(16, 32, norm_last_layer, hidden_dim=24, bottleneck_dim=8, bn=bn)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == (2 if bn else 0)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32)
    # Unit bottleneck times unit weight rows: every logit is a cosine, in [-1, 1] at initialisation.
    assert out.abs().max() <= 1 + 1e-5
    assert head.last_layer.weight.norm(dim=1).tolist() == pytest.approx([1.0] * 32, abs=1e-5)
    scale = head.last_layer.parametrizations.weight.original0
    assert scale.requires_grad is not norm_last_layer


def test_boolean_flags_parse_true_and_false_and_default_per_data():
    parser = utils.base_parser("dino", dino.DEFAULTS)
    parse = lambda *argv: utils.resolve_defaults(parser.parse_args(["--pairs", "semantic", *argv]))
    assert parse().bn_in_head is True and parse("--data", "somewhere").bn_in_head is False  # world, real data
    assert parse("--bn-in-head", "false").bn_in_head is False and parse("--bn-in-head", "1").bn_in_head is True
    with pytest.raises(SystemExit):
        parse("--bn-in-head", "maybe")


@pytest.mark.parametrize("img_size, local_size", [(224, 96), (32, 16)])
def test_global_views_from_each_image_and_local_crops_from_both(img_size, local_size):
    args = argparse.Namespace(img_size=img_size, transforms="full", min_crop_scale=0.08, local_crops=3)
    views = dino.views(args)
    assert [source for _, source in views] == [0, 1, 0, 1, 0]
    img = Image.new("RGB", (img_size, img_size), (120, 60, 30))
    assert [tuple(t(img)[0].shape[-2:]) for t, _ in views] == [(img_size,) * 2] * 2 + [(local_size,) * 2] * 3
    assert len(dino.views(argparse.Namespace(img_size=img_size, transforms="full", min_crop_scale=0.08, local_crops=0))) == 2


def test_embedding_std_is_one_for_an_even_spread_and_zero_for_collapse():
    assert monitor.embedding_std(torch.eye(8) * torch.arange(1.0, 9.0)[:, None]).item() == pytest.approx(1.0)
    collapsed = torch.randn(1, 8).repeat(6, 1) * torch.arange(1.0, 7.0)[:, None]  # one direction, any norm
    assert monitor.embedding_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)


def test_byol_regression_loss_is_two_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 2.0], [3.0, 3.0]])  # orthogonal (loss 2), parallel at another norm (loss 0)
    assert byol.regression_loss(p, z).item() == pytest.approx(1.0)


def test_vicreg_expander_and_byol_heads_have_the_published_layout():
    model = vicreg.VICReg(nn.Identity(), 4, "16-16-8")
    kinds = [type(m).__name__ for m in model.expander]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert model.expander[-1].bias is None and model.expander[-1].out_features == 8
    z1, z2 = model(torch.randn(5, 4), torch.randn(5, 4))
    assert z1.shape == z2.shape == (5, 8)
    online = byol.BYOL(nn.Identity(), 4, 16, 8)
    for head in (online.encoder.projector, online.predictor):
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    p1, p2 = online(torch.randn(5, 4), torch.randn(5, 4))
    assert p1.shape == p2.shape == (5, 8)
