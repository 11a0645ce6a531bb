"""Detection transfer: VOC reading, the C4 detector built around our backbone.pth, its losses,
schedule and precise BN, a training + evaluation run on tiny VOC trees, the world's VOC split and
the detectron2 export."""
import json
import pickle
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.backbones import build_backbone
from eval import detection
from eval.export_detectron2 import detectron2_name, main as export_main, to_detectron2
from eval.voc_world import write_voc
from tests.conftest import TINY_WORLD

SMALL = ["--min-sizes", "64", "--max-size", "128", "--roi-size", "2", "--rois-per-image", "8",
         "--test-proposals", "10", "--precise-bn-iters", "1", "--warmup-iters", "1", "--workers", "0",
         "--device", "cpu", "--batch-size", "2"]


def save_backbone(path, arch):
    model, _ = build_backbone(arch)
    state = model.state_dict()
    torch.save(state, path)
    return state


def write_tree(root, images):
    """A VOC2007 tree: images = {set: [(id, ext, [(name, xmin, ymin, xmax, ymax, difficult)])]}."""
    base = root / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_set, entries in images.items():
        for image_id, ext, objects in entries:
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.{ext}")
            objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin>"
                           f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                           for n, x0, y0, x1, y1, d in objects)
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><size><width>64</width><height>48</height><depth>3</depth></size>{objs}</annotation>")
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(e[0] + "\n" for e in entries))
    return root


TINY = {
    "trainval": [("000001", "jpg", [("dog", 5, 6, 30, 40, 0), ("cat", 33, 2, 60, 20, 1)]),
                 ("000002", "jpg", [("cat", 10, 10, 40, 40, 0)]),
                 ("000003", "png", [("dog", 1, 1, 64, 48, 0)])],
    "test": [("000004", "jpg", [("cat", 3, 4, 30, 30, 0)]),
             ("000005", "jpg", [("dog", 20, 8, 50, 44, 0), ("cat", 2, 2, 12, 12, 1)])],
}


# ---------------------------------------------------------------- reading VOC

def test_reader_converts_boxes_and_keeps_difficult(tmp_path):
    train, test = detection.voc_datasets(write_tree(tmp_path, TINY), ["2007/trainval"], "2007/test")
    assert train.classes == ["cat", "dog"] and len(train) == 3 and len(test) == 2
    a = train.annotations[0]
    assert a.names == ["dog", "cat"] and a.difficult.tolist() == [False, True]
    assert a.path.name == "000001.jpg" and train.annotations[2].path.name == "000003.png"
    image, target, index = train[0]
    assert image.shape == (3, 48, 64) and 0 <= image.min() and image.max() <= 1 and index == 0
    assert target["boxes"].tolist() == [[4, 5, 30, 40], [32, 1, 60, 20]]  # (xmin - 1, ymin - 1, xmax, ymax)
    assert target["labels"].tolist() == [2, 1]  # 0 is background
    gt = test.ground_truth()["2007/000005"]
    assert gt[0].tolist() == [[20, 8, 50, 44], [2, 2, 12, 12]] and gt[1].tolist() == [1, 0]
    assert gt[2].tolist() == [False, True]


def test_training_flip_mirrors_image_and_boxes(tmp_path):
    train, _ = detection.voc_datasets(write_tree(tmp_path, TINY), ["2007/trainval"], "2007/test")
    plain, target, _ = train.__class__(train.annotations, train.classes, train=False)[0]
    flipped = [train[(0, seed)] for seed in range(10)]
    mirrored = [f for f in flipped if not torch.equal(f[0], plain)]
    assert 0 < len(mirrored) < 10  # the seed decides
    image, boxes = mirrored[0][0], mirrored[0][1]["boxes"]
    assert torch.equal(image, plain.flip(-1))
    assert boxes.tolist() == [[64 - 30, 5, 64 - 4, 40], [64 - 60, 1, 64 - 32, 20]]


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCdevkit/VOC2007/.*ImageSets/Main/trainval.txt"):
        detection.read_voc(tmp_path, "2007/trainval")


# ---------------------------------------------------------------- the model

def test_backbone_weights_load_with_every_key_matched(tmp_path):
    state = save_backbone(tmp_path / "backbone.pth", "resnet50")
    model = detection.build_detector(detection.load_resnet(tmp_path / "backbone.pth"), num_classes=20)
    detector = model.state_dict()
    mapped = {("roi_heads.box_head." if k.startswith("layer4.") else "backbone.") + k: v for k, v in state.items()}
    backbone_part = {k for k in detector if k.startswith(("backbone.", "roi_heads.box_head.layer4."))}
    assert backbone_part == set(mapped)
    assert all(torch.equal(detector[k], v) for k, v in mapped.items())
    assert model.backbone.out_channels == 1024 and model.roi_heads.box_head.out_channels == 2048
    # The rest is new: RPN, the extra norm after res5, the predictor (21 classes incl. background).
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in set(detector) - backbone_part} == {
        "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    assert model.roi_heads.box_roi_pool.aligned and model.roi_heads.box_roi_pool.output_size == 14
    assert model.transform.min_size[-1] == 800 and model.transform.max_size == 1333
    assert not any(not p.requires_grad for p in model.parameters())  # nothing frozen


def test_refuses_a_non_resnet_backbone(tmp_path):
    save_backbone(tmp_path / "convnet.pth", "convnet")
    with pytest.raises(SystemExit, match="needs a torchvision ResNet"):
        detection.load_resnet(tmp_path / "convnet.pth")


def test_rpn_box_loss_is_l1_over_256_per_image():
    rpn = detection.build_detector(build_backbone("resnet18")[0], 2).rpn
    labels = [torch.tensor([1.0, 0.0, -1.0, 1.0])]
    targets = [torch.full((4, 4), 0.05)]
    objectness, box = rpn.compute_loss(torch.zeros(4, 1), torch.zeros(4, 4), labels, targets)
    assert box.item() == pytest.approx(0.05 * 8 / 256)  # smooth-L1 (beta 1/9) would give 0.09 / 3
    assert objectness.item() == pytest.approx(3 * np.log(2) / 256)


def test_roi_box_loss_is_l1_over_sampled_rois():
    heads = detection.build_detector(build_backbone("resnet18")[0], 2, roi_size=7).roi_heads.train()

    class Zeros(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 3, requires_grad=True), torch.zeros(len(x), 12, requires_grad=True)

    heads.box_predictor = Zeros()
    # One proposal shifted 2 px right of the ground truth (IoU 0.9) plus the ground truth itself,
    # which the heads append: two positives, box targets (-0.5, 0, 0, 0) and 0 (weights 10, 10, 5, 5).
    proposals = [torch.tensor([[12.0, 10.0, 52.0, 50.0]])]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}]
    _, losses = heads({"0": torch.randn(1, 256, 8, 8)}, proposals, [(128, 128)], targets)
    assert losses["loss_box_reg"].item() == pytest.approx(0.5 / 2)  # smooth-L1 (beta 1/9) would give 0.222
    assert losses["loss_classifier"].item() == pytest.approx(np.log(3))


def test_schedule_warmup_and_steps():
    lr = lambda it, iters=24000: detection.learning_rate(it, 0.02, iters, 100)  # noqa: E731
    assert lr(0) == pytest.approx(0.02 * 0.001)
    assert lr(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert (lr(100), lr(17999), lr(18000), lr(21999), lr(22000), lr(23999)) == pytest.approx(
        (0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002))
    assert (lr(224, 300), lr(225, 300), lr(275, 300)) == pytest.approx((0.02, 0.002, 0.0002))


def test_no_weight_decay_on_norm_parameters():
    model = detection.build_detector(build_backbone("resnet18")[0], 2)
    decay, norm = detection.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and norm["weight_decay"] == 0.0
    assert len(decay["params"]) + len(norm["params"]) == len(names)
    norm_names = {names[id(p)] for p in norm["params"]}
    assert "roi_heads.box_head.norm.weight" in norm_names and "backbone.layer2.0.downsample.1.bias" in norm_names
    assert all(("bn" in n or "norm" in n or "downsample.1" in n) for n in norm_names)
    assert "rpn.head.conv.0.0.bias" in {names[id(p)] for p in decay["params"]}  # biases keep decay


def test_precise_bn_averages_batch_statistics():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3, momentum=0.1)

        def forward(self, images, targets):
            return self.bn(torch.stack(images))

    torch.manual_seed(0)
    model = Toy()
    batches = [([torch.randn(3, 4, 4) * (i + 1) + i for _ in range(2)], [{}, {}], None) for i in range(3)]
    detection.precise_bn(model, iter(batches), torch.device("cpu"))
    stacks = [torch.stack(images) for images, _, _ in batches]
    assert torch.allclose(model.bn.running_mean, torch.stack([x.mean(dim=(0, 2, 3)) for x in stacks]).mean(0))
    assert torch.allclose(model.bn.running_var,
                          torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in stacks]).mean(0))
    assert model.bn.momentum == 0.1


# ---------------------------------------------------------------- end to end

def test_train_step_evaluation_and_resume(tmp_path):
    state = save_backbone(tmp_path / "backbone.pth", "resnet18")
    root = write_tree(tmp_path / "voc", TINY)
    out = tmp_path / "run"
    args = ["--checkpoint", str(tmp_path / "backbone.pth"), "--voc-root", str(root), "--train-sets", "2007/trainval",
            "--out", str(out), *SMALL]
    result = detection.main(args + ["--iters", "2"])
    for key in ("AP50", "AP", "AP75"):
        assert 0.0 <= result[key] <= 100.0
    assert set(result["per_class_AP50"]) == {"cat", "dog"}
    assert json.loads((out / "results.json").read_text())["AP50"] == result["AP50"]
    record = json.loads((tmp_path / "results" / "detection-voc07-s0.json").read_text())  # for eval/report.py
    assert record["eval"] == "detection" and record["metrics"]["AP75"] == result["AP75"]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iter"] == 2
    tuned = torch.load(out / "detector.pth", weights_only=True)
    # Nothing frozen: every backbone weight moved.
    assert not any(torch.equal(tuned["backbone." + k], v) for k, v in state.items()
                   if not k.startswith("layer4.") and v.is_floating_point() and "running" not in k)

    detection.main(args + ["--iters", "3", "--resume"])
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logged if "iter" in r] == [0, 1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iter"] == 3


def test_embedded_world_end_to_end(tiny_world, tmp_path):
    save_backbone(tmp_path / "backbone.pth", "resnet18")
    result = detection.main(["--checkpoint", str(tmp_path / "backbone.pth"), "--voc-root", "embedded",
                             "--world", *TINY_WORLD, "--iters", "1", "--out", str(tmp_path / "run"), *SMALL])
    assert result["voc_root"].startswith(str(tiny_world / "voc"))
    assert set(result["per_class_AP50"]) == {"c000", "c001", "c002", "c003"}
    assert result["test_set"] == "2007/test" and 0.0 <= result["AP"] <= 100.0


# ---------------------------------------------------------------- the world's VOC split

def test_world_voc_split_matches_the_world(tiny_world, tmp_path):
    world = tiny_world  # 4 classes, 3 + 3 transfer images per class: 3 mosaics per round
    base = write_voc(world, tmp_path / "voc") / "VOCdevkit" / "VOC2007"
    ids = {s: (base / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("trainval", "test")}
    assert len(ids["trainval"]) == 4 * 3 and len(ids["test"]) == 3 and not set(ids["trainval"]) & set(ids["test"])
    boxes = {}
    for line in (world / "boxes.csv").read_text().splitlines()[1:]:
        path, *box = line.split(",")
        boxes[path] = tuple(map(int, box))
    sources = {s: {(p.parent.name, np.asarray(Image.open(p)).tobytes()): boxes[str(p.relative_to(world))]
                   for p in (world / "transfer" / "seen" / s).rglob("*.png")} for s in ("train", "test")}
    test_objects = []
    for image_set, part in (("trainval", "train"), ("test", "test")):
        for image_id in ids[image_set]:
            xml = ET.parse(base / "Annotations" / f"{image_id}.xml").getroot()
            mosaic = np.asarray(Image.open(base / "JPEGImages" / xml.findtext("filename")))
            assert mosaic.shape == (64, 64, 3) and xml.findtext("size/width") == "64"
            assert len(xml.findall("object")) == 4
            for obj in xml.findall("object"):
                x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                cx, cy = (x0 - 1) // 32 * 32, (y0 - 1) // 32 * 32
                tile = mosaic[cy:cy + 32, cx:cx + 32].tobytes()
                # The cell shows a world image of the named class, whose box (0-based, max
                # exclusive) is the object's box, shifted by the cell and made 1-based inclusive.
                wx0, wy0, wx1, wy1 = sources[part][(obj.findtext("name"), tile)]
                assert (x0, y0, x1, y1) == (wx0 + cx + 1, wy0 + cy + 1, wx1 + cx, wy1 + cy)
                assert obj.findtext("difficult") == "0"
                if part == "test":
                    test_objects.append(tile)
    assert len(test_objects) == len(set(test_objects)) == 12  # every test image once


# ---------------------------------------------------------------- detectron2 export

def detectron2_resnet_keys(blocks, convs):
    """detectron2's ResNet parameter names, written out from its module structure."""
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"stem.conv1.weight"} | {f"stem.conv1.norm.{n}" for n in norm}
    for stage, count in enumerate(blocks, start=2):
        for b in range(count):
            for c in range(1, convs + 1):
                keys |= {f"res{stage}.{b}.conv{c}.weight"} | {f"res{stage}.{b}.conv{c}.norm.{n}" for n in norm}
            if b == 0 and (stage > 2 or convs == 3):  # resnet18's first stage keeps its width
                keys |= {f"res{stage}.0.shortcut.weight"} | {f"res{stage}.0.shortcut.norm.{n}" for n in norm}
    return keys


@pytest.mark.parametrize("arch,blocks,convs", [("resnet50", (3, 4, 6, 3), 3), ("resnet18", (2, 2, 2, 2), 2)])
def test_detectron2_export_names_every_key(arch, blocks, convs):
    state = build_backbone(arch)[0].state_dict()
    converted = to_detectron2(state)
    assert set(converted["model"]) == detectron2_resnet_keys(blocks, convs)
    for k, v in state.items():
        assert np.array_equal(converted["model"][detectron2_name(k)], v.numpy())
    assert converted["matching_heuristics"] is True and "__author__" in converted


def test_detectron2_export_cli(tmp_path):
    state = save_backbone(tmp_path / "backbone.pth", "resnet50")
    export_main([str(tmp_path / "backbone.pth"), str(tmp_path / "d2.pkl")])
    with open(tmp_path / "d2.pkl", "rb") as f:
        loaded = pickle.load(f)
    assert loaded["model"]["res5.2.conv3.norm.running_var"].shape == state["layer4.2.bn3.running_var"].shape
    assert loaded["model"]["stem.conv1.weight"].shape == (64, 3, 7, 7)
