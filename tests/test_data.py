"""Data pipeline: decoding, the seeded sampler, pair datasets, the matched baseline, subsets, transforms."""
import argparse
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from common import data, pairs, transforms


def write_pairs(path, rows, header="class,image_a,image_b"):
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def make_tree(root, classes=("a", "b", "c"), per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    rows = [(c, f"{c}/{2 * i}.png", f"{c}/{2 * i + 1}.png") for c in classes for i in range(per_class // 2)]
    return write_pairs(root / "pairs.csv", rows)


def args_for(root, mode, **kw):
    return argparse.Namespace(data=str(root), manifest=None, world=None, pairs=mode,
                              images_per_class=kw.get("images_per_class"), ap_images=kw.get("ap_images", "image_a"))


# -- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "P", "RGBA", "LA", "I;16", "I"])
def test_load_rgb_converts_every_mode_to_rgb(tmp_path, mode):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    if mode in ("I;16", "I"):  # 16- and 32-bit integer grayscale
        img = Image.fromarray(np.full((4, 5), 40000, np.uint16 if mode == "I;16" else np.int32))
        assert img.mode == mode
    else:
        img = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    img.save(path)
    out = data.load_rgb(path)
    assert out.mode == "RGB" and out.size == (5, 4)
    if mode == "I;16":  # 40000 / 65535 of full scale, not clipped to white
        assert abs(np.asarray(out)[0, 0, 0] - round(40000 * 255 / 65535)) <= 1
    if mode == "RGB":
        assert (np.asarray(out) == rgb).all()


def test_load_rgb_one_pixel_and_png_named_jpeg(tmp_path):
    path = tmp_path / "x.JPEG"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path, format="PNG")
    assert np.asarray(data.load_rgb(path)).tolist() == [[[10, 20, 30]]]


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_load_rgb_bad_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(data.ImageError, match="bad.jpg"):
        data.load_rgb(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(data.ImageError, match="big.png"):
        data.load_rgb(path)


# -- sampler ----------------------------------------------------------------------------------

def batches(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [b for b in sampler]


def test_sampler_is_a_deterministic_permutation_per_epoch():
    s = data.SeededBatchSampler(103, 10, seed=1)
    e0, e0_again, e1 = batches(s, 0), batches(s, 0), batches(s, 1)
    assert len(e0) == len(s) == 10  # drop_last
    assert e0 == e0_again and e0 != e1
    indices = [i for b in e0 for i, _ in b]
    assert len(set(indices)) == 100 and all(0 <= i < 103 for i in indices)
    assert batches(data.SeededBatchSampler(103, 10, seed=2), 0) != e0


def test_sampler_resumes_mid_epoch_and_splits_the_global_batch_over_ranks():
    s = data.SeededBatchSampler(64, 8, seed=0)
    full = batches(s, 3)
    assert batches(s, 3, start=5) == full[5:]
    ranks = [batches(data.SeededBatchSampler(64, 8, seed=0, rank=r, world_size=2), 3) for r in range(2)]
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert r0 + r1 == full[b]


# -- pair datasets, matched baseline, subsets ----------------------------------------------------

def test_semantic_and_augmented_datasets_are_matched(tmp_path):
    make_tree(tmp_path)
    views = transforms.pair_views("simclr", 16)
    sp = data.pretrain_dataset(args_for(tmp_path, "semantic"), views)
    ap = data.pretrain_dataset(args_for(tmp_path, "augmented"), views)
    ap_all = data.pretrain_dataset(args_for(tmp_path, "augmented", ap_images="all"), views)
    assert sp.classes == ap.classes == ["a", "b", "c"]
    count = lambda ds: np.bincount([label for label, _, _ in ds.items]).tolist()
    assert count(sp) == count(ap) == [3, 3, 3] and count(ap_all) == [6, 6, 6]
    assert all(a != b for _, a, b in sp.items) and all(a == b for _, a, b in ap.items)
    assert [a for _, a, _ in ap.items] == [a for _, a, _ in sp.items]


def test_views_come_from_the_right_images_and_are_seeded(tmp_path):
    make_tree(tmp_path)
    plain = [(v2.Compose([v2.PILToTensor()]), 0), (v2.Compose([v2.PILToTensor()]), 1)]
    sp = data.pretrain_dataset(args_for(tmp_path, "semantic"), plain)
    x1, x2, label = sp[(0, 123)]
    _, a, b = sp.items[0]
    assert (x1.permute(1, 2, 0).numpy() == np.asarray(Image.open(tmp_path / a))).all()
    assert (x2.permute(1, 2, 0).numpy() == np.asarray(Image.open(tmp_path / b))).all()
    ap = data.pretrain_dataset(args_for(tmp_path, "augmented"), transforms.pair_views("simclr", 16))
    flat = lambda key: [torch.cat([pixels.flatten().float(), params]) for pixels, params in ap[key][:2]]
    v1, v2_ = flat((0, 7))  # each view: uint8 pixels and colour parameters
    w1, w2 = flat((0, 7))
    assert torch.equal(v1, w1) and torch.equal(v2_, w2)  # same seed, same views
    assert not torch.equal(v1, v2_)  # two different views of one image
    assert not torch.equal(flat((0, 8))[0], v1)


def test_decoded_images_are_kept_when_all_fit(tmp_path):
    make_tree(tmp_path)  # 18 images of 20 x 20
    views = transforms.pair_views("simclr", 16)
    kept, decoded = (data.pretrain_dataset(args_for(tmp_path, "semantic"), views) for _ in range(2))
    decoded.cache_bytes = 18 * 20 * 20 * 3 - 1
    for ds in (kept, decoded):
        [ds[(i, i)] for i in range(len(ds))]
    assert kept.num_images == 18 and len(kept._cache) == 18 and decoded._cache is False
    for i in range(len(kept)):  # the same views, from kept images as from decoded ones
        for (p1, c1), (p2, c2) in zip(kept[(i, 5)][:2], decoded[(i, 5)][:2]):
            assert torch.equal(p1, p2) and torch.equal(c1, c2)


def test_images_per_class_takes_nested_subsets(tmp_path):
    make_tree(tmp_path, per_class=10)
    small = data.pretrain_dataset(args_for(tmp_path, "semantic", images_per_class=2), [])
    large = data.pretrain_dataset(args_for(tmp_path, "semantic", images_per_class=4), [])
    assert len(small) == 6 and len(large) == 12
    assert set(small.items) < set(large.items)
    with pytest.raises(ValueError, match="fewer than 6 pairs"):
        data.pretrain_dataset(args_for(tmp_path, "semantic", images_per_class=6), [])


@pytest.mark.parametrize("rows,message", [
    ([("a", "a/0.png", "a/0.png")], "line 2: self pair"),
    ([("a", "a/0.png", "b/1.png")], "line 2: cross-class"),
    ([("a", "a/0.png", "a/1.png"), ("a", "a/1.png", "a/0.png")], "line 3: duplicate pair"),
    ([("a", "a/0.png", "a/1.png"), ("a", "a/0.png", "a/2.png")], "line 3: image reused"),
    ([("a", "a/0.png", "a/99.png")], "line 2: missing file: a/99.png"),
    ([("a", "a/0.png", "../a/1.png")], "line 2: path leaves the image root"),
])
def test_bad_manifests_are_refused_with_their_line(tmp_path, rows, message):
    make_tree(tmp_path)
    write_pairs(tmp_path / "pairs.csv", rows)
    with pytest.raises(pairs.ManifestError, match=message):
        data.pretrain_dataset(args_for(tmp_path, "semantic"), [])


def test_wrong_header_and_unreadable_image(tmp_path):
    make_tree(tmp_path)
    write_pairs(tmp_path / "pairs.csv", [("a", "a/0.png", "a/1.png")], header="cls,x,y")
    with pytest.raises(pairs.ManifestError, match="line 1: header"):
        data.pretrain_dataset(args_for(tmp_path, "semantic"), [])
    write_pairs(tmp_path / "pairs.csv", [("a", "a/0.png", "a/1.png")])
    (tmp_path / "a" / "1.png").write_bytes(b"garbage")
    with pytest.raises(pairs.ManifestError, match="line 2: cannot read image .*1.png"):
        data.pretrain_dataset(args_for(tmp_path, "semantic"), [])


# -- transforms -----------------------------------------------------------------------------------

def draw(view, n=2000, size=8):
    """The colour parameters of n views of one small image, seeded."""
    img = Image.new("RGB", (size, size), (120, 60, 200))
    with data.seeded(0):
        return torch.stack([view(img)[1] for _ in range(n)])


def test_views_draw_the_recipe_and_the_ablations_remove_what_the_paper_removes():
    jitter, blur, solarize = transforms.RECIPES["byol"]
    p = draw(transforms.View(32, jitter, blur[1], solarize[1]))
    jittered = p[:, transforms.BRIGHTNESS] != 1
    assert abs(jittered.float().mean() - 0.8) < 0.03
    assert abs(p[:, transforms.GRAY].mean() - 0.2) < 0.03
    assert abs((p[:, transforms.SIGMA] > 0).float().mean() - blur[1]) < 0.03
    assert abs(p[:, transforms.SOLARIZE].mean() - solarize[1]) < 0.03
    for k, x in enumerate(jitter):  # factors within the recipe's ranges
        lo, hi = (-x, x) if k == transforms.HUE else (1 - x, 1 + x)
        assert lo <= p[jittered, k].min() and p[jittered, k].max() <= hi
    assert p[:, transforms.SIGMA].max() <= 2.0 * 32 / 224
    assert (p[:, transforms.ORDER].sort().values == torch.arange(4)).all()  # each a permutation
    identity = torch.tensor([1, 1, 1, 0, 0, 1, 2, 3, 0, 0, 0], dtype=torch.float32)
    full, no_gray, no_color, only_crop = (draw(transforms.View(32, ablation=a)) for a in transforms.ABLATIONS)
    assert full[:, transforms.GRAY].any() and not no_gray[:, transforms.GRAY].any()
    assert (no_gray[:, transforms.BRIGHTNESS] != 1).any() and (no_color[:, :transforms.SIGMA] == identity[:9]).all()
    assert (no_color[:, transforms.SIGMA] > 0).any() and (only_crop == identity).all()
    with pytest.raises(ValueError):
        transforms.View(32, ablation="none")


def test_method_recipes_differ_in_blur_and_solarize():
    simclr, byol = (transforms.pair_views(m, 32) for m in ("simclr", "byol"))
    assert [v.solarize_p for v, _ in simclr] == [0, 0] and [v.solarize_p for v, _ in byol] == [0, 0.2]
    assert [v.blur_p for v, _ in simclr] == [0.5, 0.5] and [v.blur_p for v, _ in byol] == [1.0, 0.1]
    pixels, params = transforms.pair_views("simclr", 24)[0][0](Image.new("RGB", (40, 30)))
    assert pixels.shape == (3, 24, 24) and pixels.dtype == torch.uint8 and params.shape == (transforms.NUM_PARAMS,)
    x = transforms.colourise(pixels[None], params[None])
    assert x.shape == (1, 3, 24, 24) and x.dtype == torch.float32


def test_colourise_applies_each_views_parameters_as_torchvision_does():
    """A batch coloured at once equals each image through torchvision's functional ops, in the
    view's jitter order (identity jitter skipped: torchvision's HSV round trip is not exact)."""
    from torchvision.transforms.v2 import functional as tf

    pixels = torch.randint(0, 256, (6, 3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = torch.tensor([[1.3, 0.7, 1.5, 0.08, 2, 0, 3, 1, 0, 0.0, 0],
                           [0.6, 1.4, 0.3, -0.1, 3, 2, 1, 0, 1, 0.0, 0],
                           [1, 1, 1, 0, 0, 1, 2, 3, 0, 1.5, 0],
                           [1, 1, 1, 0, 0, 1, 2, 3, 0, 0.0, 1],
                           [1.1, 0.9, 1.0, 0.05, 1, 3, 0, 2, 1, 0.7, 1],
                           [1, 1, 1, 0, 0, 1, 2, 3, 0, 0.0, 0]])
    jitter = [tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation, tf.adjust_hue]
    expected = []
    for img, p in zip(pixels.float() / 255, params):
        for k in p[transforms.ORDER].long().tolist():
            if p[k] != (0 if k == transforms.HUE else 1):
                img = jitter[k](img, p[k].item())
        if p[transforms.GRAY]:
            img = tf.rgb_to_grayscale(img, num_output_channels=3)
        if p[transforms.SIGMA]:
            radius = int(np.ceil(3 * p[transforms.SIGMA].item()))
            img = tf.gaussian_blur(img, [2 * radius + 1] * 2, [p[transforms.SIGMA].item()] * 2)
        if p[transforms.SOLARIZE]:
            img = tf.solarize(img, 128 / 255)
        expected.append(tf.normalize(img, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))
    torch.testing.assert_close(transforms.colourise(pixels, params), torch.stack(expected), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_colourise_on_a_gpu_gives_the_cpus_views_without_waiting_for_the_gpu():
    random.seed(0)
    rng = np.random.default_rng(0)
    views = [v(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
             for v, _ in transforms.pair_views("byol", 32) for _ in range(32)]  # every op, blur on most
    pixels, params = (torch.stack(t) for t in zip(*views))
    on_gpu = pixels.cuda()
    transforms.colourise(on_gpu, params)  # first use: CUDA context, pinned-memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        on_gpu = transforms.colourise(on_gpu, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(on_gpu.cpu(), transforms.colourise(pixels, params), atol=1e-4, rtol=0)
