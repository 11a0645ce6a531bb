"""Semantic-pair manifests on a generated ImageNet-like tree: building (random and mined), the
checker with every kind of problem, nested subsets and the matched augmented baseline."""
import csv
import io
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common import imagenet, pairs
from common.backbones import build_backbone
from tests.conftest import run_script

CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def tree(tmp_path):
    """3 classes x 12 generated images (class 0 with a CMYK, a grayscale and a PNG-named-.JPEG
    file), plus in class 1 a garbage file and a text file, and in class 2 a truncated JPEG."""
    root = tmp_path / "train"
    imagenet.synthetic_tree(root, CLASSES, 12, size=(40, 30))
    (root / "n01443537" / "garbage.JPEG").write_bytes(b"not an image")
    (root / "n01443537" / "notes.txt").write_text("not listed")
    jpeg = (root / "n01484850" / "n01484850_0.JPEG").read_bytes()
    (root / "n01484850" / "truncated.JPEG").write_bytes(jpeg[:len(jpeg) // 2])
    return root


def class_file(tmp_path, classes=CLASSES):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(classes) + "\n")
    return path


def cli(*args):
    """`python -m common.pairs args...` in this process; returns the exit code."""
    return pairs.main([str(a) for a in args])


def build(tree, tmp_path, *extra, out="pairs.csv", classes=None):
    out = tmp_path / out
    classes = classes or class_file(tmp_path)
    return cli("build", "--imagenet-root", tree, "--classes", classes, "--out", out, *extra), out


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def assert_valid(path, root, per_class, classes=CLASSES):
    loaded = pairs.load_pairs(path, root, decode=True)
    assert pairs.per_class_counts(loaded) == {c: per_class for c in classes}
    names = [n for p in loaded for n in (p.image_a, p.image_b)]
    assert len(set(names)) == len(names) == 2 * per_class * len(classes)
    return loaded


# -- random builder -----------------------------------------------------------------------------------

def test_random_build_is_valid_seeded_and_skips_unreadable_files(tree, tmp_path, capsys):
    code, out = build(tree, tmp_path, "--per-class", 6, "--seed", 3, "--decode")
    assert code == 0
    captured = capsys.readouterr()
    assert "18 pairs, 3 classes, 6 pairs per class, 36 unique images" in captured.out
    first = assert_valid(out, tree, 6)
    # Classes 1 and 2 have 12 images and a garbage or truncated file: all 12 images are needed,
    # the broken file never.
    assert not any(bad in out.read_text() for bad in ("garbage", "truncated", "notes"))
    assert "skipped: cannot read image" in captured.err and "skipped: cannot decode image" in captured.err
    assert build(tree, tmp_path, "--per-class", 6, "--seed", 3, "--decode", out="again.csv")[0] == 0
    assert (tmp_path / "again.csv").read_text() == out.read_text()
    assert build(tree, tmp_path, "--per-class", 6, "--seed", 4, "--decode", out="other.csv")[0] == 0
    assert (tmp_path / "other.csv").read_text() != out.read_text()
    # A class's pairs depend on the seed and that class alone.
    two = class_file(tmp_path / "..", CLASSES[1:])
    assert build(tree, tmp_path, "--per-class", 6, "--seed", 3, "--decode", out="two.csv", classes=two)[0] == 0
    assert read_rows(tmp_path / "two.csv")[1:] == [r for r in read_rows(out)[1:] if r[0] != CLASSES[0]]
    assert [(p.cls, p.image_a, p.image_b) for p in first][:2] == [tuple(r) for r in read_rows(out)[1:3]]


def test_build_fails_loudly(tree, tmp_path, capsys):
    assert build(tree, tmp_path, "--per-class", 7)[0] == 2  # 12 readable images per class, 14 needed
    assert "3 classes have fewer than the 14 readable images needed for 7 pairs: n01440764 (12), n01443537 (12)" \
        in capsys.readouterr().err
    missing = class_file(tmp_path, CLASSES + ["n01491361"])
    assert build(tree, tmp_path, "--per-class", 2, classes=missing)[0] == 2
    assert "1 classes of" in capsys.readouterr().err
    code = cli("build", "--imagenet-root", tree.parent, "--classes", "all", "--out", tmp_path / "x.csv")
    assert code == 2 and f"did you mean --imagenet-root {tree}?" in capsys.readouterr().err
    assert build(tree, tmp_path, "--strategy", "mined")[0] == 2
    assert "mined needs a trained feature extractor" in capsys.readouterr().err


def test_paper_classes_build_leaves_out_the_two_non_imagenet_1k_classes(tmp_path, capsys):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg, "JPEG")
    root = tmp_path / "train"
    in_1k = [c.wnid for c in imagenet.paper_classes() if c.in_1k]
    for wnid in in_1k + ["n01440764"]:  # plus a class the paper does not use
        (root / wnid).mkdir(parents=True)
        for i in range(2):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg.getvalue())
    code = cli("build", "--imagenet-root", root, "--per-class", 1, "--out", tmp_path / "p.csv")
    assert code == 0
    captured = capsys.readouterr()
    assert "173 pairs, 173 classes, 1 pairs per class, 346 unique images" in captured.out
    assert "lemon_shark (n01490670) is not an ImageNet-1k class" in captured.err
    # A tree that has the ImageNet-21k folder gets that class too.
    (root / "n01490670").mkdir()
    for i in range(2):
        (root / "n01490670" / f"x{i}.JPEG").write_bytes(jpeg.getvalue())
    assert cli("build", "--imagenet-root", root, "--per-class", 1, "--out", tmp_path / "q.csv") == 0
    assert "174 classes" in capsys.readouterr().out


# -- mined builder ---------------------------------------------------------------------------------------

def sequential_greedy(score, k):
    """The one-pair-at-a-time greedy matching that match_pairs must reproduce."""
    n, used, out = len(score), set(), []
    edges = sorted(((score[i, j].item(), i, j) for i in range(n) for j in range(i + 1, n)), reverse=True)
    for s, i, j in edges:
        if len(out) == k:
            break
        if i not in used and j not in used:
            used |= {i, j}
            out.append((i, j))
    return out


@pytest.mark.parametrize("n,k", [(2, 1), (9, 4), (30, 5), (30, 15), (41, 20)])
def test_match_pairs_equals_sequential_greedy_matching(n, k):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n * 100 + k))
    score = x @ x.T
    i, j, s = pairs.match_pairs(score, k)
    assert list(zip(i.tolist(), j.tolist())) == sequential_greedy(score, k)
    assert torch.equal(s, score[i, j]) and torch.all(s[:-1] >= s[1:])


def test_match_pairs_with_ties_and_unusable_images():
    i, j, _ = pairs.match_pairs(torch.ones(8, 8), 4)  # every score equal: still a full matching
    assert sorted(i.tolist() + j.tolist()) == list(range(8))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    score = x @ x.T
    score[:, 2] = score[2] = float("-inf")  # an undecodable image pairs with nobody
    i, j, _ = pairs.match_pairs(score, 5)
    assert len(i) == 2 and 2 not in i.tolist() + j.tolist()
    assert len(pairs.match_pairs(torch.zeros(1, 1), 1)[0]) == 0
    # Scores that differ in the last bits across the diagonal (as matrix products give) still
    # yield a full matching.
    score = torch.ones(10, 10) + 1e-7 * torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    assert len(pairs.match_pairs(score, 5)[0]) == 5


def test_mining_rule_prefers_the_same_object_in_a_different_context():
    a, b, x, y = torch.eye(4)
    objects = torch.stack([a, a, a, b])  # image 0 and 1 share object and context; image 2 changes context
    contexts = torch.stack([x, x, y, y])
    names = [f"c/{i}.JPEG" for i in range(4)]
    usable = torch.ones(4, dtype=torch.bool)
    by_score = pairs.mine_class("c", names, objects, contexts, usable, 1, 1.0, seed=0)
    assert (by_score[0].image_a, by_score[0].image_b) == ("c/0.JPEG", "c/2.JPEG")
    assert dict(by_score[0].extra) == {"object_sim": "1.0000", "context_sim": "0.0000", "score": "1.0000"}
    # Without the context term the near-duplicate (same object, same context) would win a tie-break.
    no_context = pairs.mine_class("c", names, objects, contexts, usable, 1, 0.0, seed=0)
    assert (no_context[0].image_a, no_context[0].image_b) == ("c/0.JPEG", "c/1.JPEG")


def test_mining_views_split_object_and_context(tmp_path):
    base = np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8)
    border, centre = base.copy(), base.copy()
    border[:4], border[:, :4] = 255 - border[:4], 255 - border[:, :4]  # outside the central 60%
    centre[18:32, 18:32] = 255 - centre[18:32, 18:32]  # inside it, away from its edge
    for name, array in (("base", base), ("border", border), ("centre", centre)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    views = pairs.MiningViews(tmp_path, ["base.png", "border.png", "centre.png"], 40)
    (obj, ctx, _), (obj_border, ctx_border, _), (obj_centre, ctx_centre, _) = views[0], views[1], views[2]
    assert torch.equal(obj, obj_border) and not torch.equal(obj, obj_centre)
    assert torch.equal(ctx, ctx_centre) and not torch.equal(ctx, ctx_border)


def test_mining_views_dataset_blanks_the_centre_and_reports_bad_files(tree):
    names = ["n01440764/n01440764_1.JPEG", "n01443537/garbage.JPEG"]
    views = pairs.MiningViews(tree, names, 32)
    obj, ctx, error = views[0]
    assert obj.shape == ctx.shape == (3, 32, 32) and error == ""
    assert torch.all(ctx[:, views.hole, views.hole] == 0) and ctx.abs().sum() > 0
    assert "garbage.JPEG" in views[1][2]


@pytest.fixture
def convnet_file(tmp_path):
    model, _ = build_backbone("convnet", width=8)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    return tmp_path / "backbone.pth"


def test_mined_build_end_to_end(tree, tmp_path, convnet_file, capsys):
    args = ["--strategy", "mined", "--features", convnet_file, "--size", 32, "--workers", 0, "--per-class", 5,
            "--lambda", 0.5, "--seed", 1]
    code, out = build(tree, tmp_path, *args)
    assert code == 0, capsys.readouterr().err
    loaded = assert_valid(out, tree, 5)
    assert "skipped: cannot read image" in capsys.readouterr().err  # the garbage file
    assert read_rows(out)[0] == ["class", "image_a", "image_b", "object_sim", "context_sim", "score"]
    for p in loaded:
        o, c, s = (float(v) for _, v in p.extra)
        assert abs(s - (o - 0.5 * c)) < 2e-4
    assert build(tree, tmp_path, *args, out="again.csv")[0] == 0
    assert (tmp_path / "again.csv").read_text() == out.read_text()
    assert build(tree, tmp_path, *args, "--candidates", 11, out="few.csv")[0] == 0
    assert_valid(tmp_path / "few.csv", tree, 5)
    assert build(tree, tmp_path, *args, "--per-class", 7, out="many.csv")[0] == 2  # 12 readable images
    assert "too few readable images for 7 pairs" in capsys.readouterr().err


def test_feature_extractor_from_a_torchvision_state_dict(tmp_path):
    model = torchvision.models.resnet18()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}  # fc included
    torch.save(wrapped, tmp_path / "r18.pth")
    loaded, dim = pairs.load_feature_extractor(tmp_path / "r18.pth")
    model.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert dim == 512 and torch.allclose(loaded.eval()(x), model.eval()(x))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="cannot load a feature extractor"):
        pairs.load_feature_extractor(tmp_path / "other.pth")


# -- checker --------------------------------------------------------------------------------------------

A, B = "n01440764/n01440764_{}.JPEG", "n01443537/n01443537_{}.JPEG"


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines,decode,expected", [
    (["cls,a,b", f"n01440764,{A.format(0)},{A.format(1)}"], False,
     ["line 1: header must start with class,image_a,image_b"]),
    ([], False, ["line 1: header must start with class,image_a,image_b, found 'an empty file'"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)}"], False, ["line 2: expected class,image_a,image_b"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},n01440764/nope.JPEG"], False,
     ["line 2: missing file: n01440764/nope.JPEG"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},n01440764/../../x.JPEG"], False,
     ["line 2: path leaves the image root: n01440764/../../x.JPEG"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},/etc/passwd"], False, ["line 2: path leaves the image root"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},{B.format(0)}"], False,
     [f"line 2: cross-class pair: {B.format(0)} is not in class folder n01440764/"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},{A.format(0)}"], False, ["line 2: self pair"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},{A.format(1)}", f"n01440764,{A.format(1)},{A.format(0)}"],
     False, ["line 3: duplicate pair (first on line 2)"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},{A.format(1)}", f"n01440764,{A.format(0)},{A.format(1)}"],
     False, ["line 3: duplicate pair (first on line 2)"]),
    (["class,image_a,image_b", f"n01440764,{A.format(0)},{A.format(1)}", "", f"n01440764,{A.format(2)},{A.format(1)}"],
     False, [f"line 4: image reused across pairs: {A.format(1)} (first on line 2)"]),
    (["class,image_a,image_b", f"n01443537,{B.format(0)},n01443537/garbage.JPEG"], False,
     ["line 2: cannot read image", "garbage.JPEG"]),
    (["class,image_a,image_b", "n01484850,n01484850/n01484850_0.JPEG,n01484850/truncated.JPEG"], True,
     ["line 2: cannot decode image", "truncated.JPEG"]),
])
def test_check_reports_each_problem_with_its_line(tree, tmp_path, capsys, lines, decode, expected):
    manifest = write(tmp_path / "m.csv", lines)
    assert cli("check", "--root", tree, "--pairs", manifest, *["--decode"] * decode) == 2
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"{manifest}: {expected[0]}") and all(e in line for e in expected) for line in err), err
    assert err[-1].endswith("problem(s) found")


def test_check_decode_finds_what_the_header_check_cannot(tree, tmp_path, capsys):
    manifest = write(tmp_path / "m.csv", ["class,image_a,image_b",
                                          "n01484850,n01484850/n01484850_0.JPEG,n01484850/truncated.JPEG"])
    assert cli("check", "--root", tree, "--pairs", manifest) == 0
    assert cli("check", "--root", tree, "--pairs", manifest, "--decode") == 2


def test_check_passes_a_good_manifest_with_a_summary(tree, tmp_path, capsys):
    lines = ["\ufeffclass,image_a,image_b,note"]  # a spreadsheet's BOM and an extra column
    lines += [f"n01440764,{A.format(2 * i)},{A.format(2 * i + 1)},x" for i in range(4)]  # CMYK, gray and PNG
    lines += [f"n01443537,{B.format(0)},{B.format(1)},y"]
    manifest = write(tmp_path / "m.csv", lines)
    assert cli("check", "--root", tree, "--pairs", manifest, "--decode") == 0
    out = capsys.readouterr().out
    assert "ok: 5 pairs, 2 classes, 1-4 pairs per class, 10 unique images" in out
    assert "  n01440764: 4" in out and "  n01443537: 1" in out
    assert cli("check", "--root", tree, "--pairs", manifest, "--per-class", "2") == 2
    assert "class n01443537 has 1 pairs, fewer than 2" in capsys.readouterr().err
    assert cli("check", "--root", tmp_path / "nowhere", "--pairs", manifest) == 2
    assert "image root not found" in capsys.readouterr().err


def test_check_accepts_symlinked_class_folders(tree, tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(tree / "n01440764", linked / "n01440764")
    manifest = write(tmp_path / "m.csv", ["class,image_a,image_b", f"n01440764,{A.format(0)},{A.format(1)}"])
    assert len(pairs.load_pairs(manifest, linked)) == 1


def test_check_command_exit_code_and_one_line_errors(tree, tmp_path):
    manifest = write(tmp_path / "m.csv", ["class,image_a,image_b", f"n01440764,{A.format(0)},{A.format(0)}",
                                          f"n01440764,{A.format(1)},n01440764/gone.JPEG"])
    proc = run_script("-m", "common.pairs", "check", "--root", tree, "--pairs", manifest, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{manifest}: line 2: self pair: {A.format(0)} paired with itself",
                                        f"{manifest}: line 3: missing file: n01440764/gone.JPEG",
                                        "2 problem(s) found"]


# -- nested subsets and the matched baseline --------------------------------------------------------------

def test_subsets_nest_and_baselines_match(tree, tmp_path, capsys):
    _, full = build(tree, tmp_path, "--per-class", 5)
    subsets = {}
    for n in (2, 4, 5):
        assert cli("subset", "--pairs", full, "--per-class", n, "--out", tmp_path / f"s{n}.csv") == 0
        subsets[n] = pairs.load_pairs(tmp_path / f"s{n}.csv", tree)
        assert pairs.per_class_counts(subsets[n]) == {c: n for c in CLASSES}
    key = lambda ps: {(p.cls, p.image_a, p.image_b) for p in ps}  # noqa: E731
    assert key(subsets[2]) < key(subsets[4]) < key(subsets[5]) == key(pairs.load_pairs(full, tree))
    # The subset the training scripts take (--images-per-class) is the same.
    assert key(pairs.first_per_class(pairs.load_pairs(full, tree), 4)) == key(subsets[4])
    assert cli("subset", "--pairs", full, "--per-class", 6, "--out", tmp_path / "x.csv") == 2
    assert "3 classes have fewer than 6 pairs" in capsys.readouterr().err

    for extra, per_image in (([], 1), (["--all-images"], 2)):
        out = tmp_path / f"baseline{per_image}.csv"
        assert cli("baseline", "--pairs", tmp_path / "s4.csv", "--out", out, *extra) == 0
        rows = read_rows(out)
        assert rows[0] == ["class", "image"] and len(rows) - 1 == 3 * 4 * per_image
        assert {c: sum(r[0] == c for r in rows[1:]) for c in CLASSES} == {c: 4 * per_image for c in CLASSES}
        assert len({r[1] for r in rows[1:]}) == len(rows) - 1
        assert all(r[1].startswith(r[0] + "/") for r in rows[1:])
        assert [tuple(r) for r in rows[1:]] == pairs.augmented_images(subsets[4], all_images=per_image == 2)
    assert cli("baseline", "--pairs", full, "--per-class", "2", "--out", tmp_path / "b2.csv") == 0
    assert read_rows(tmp_path / "b2.csv")[1:] == [list(r) for r in pairs.augmented_images(subsets[2])]


def test_subset_keeps_mined_score_columns(tmp_path):
    rows = ["class,image_a,image_b,object_sim,context_sim,score"]
    rows += [f"c,c/{2 * i}.JPEG,c/{2 * i + 1}.JPEG,0.{i},0.1,0.{i}" for i in range(3)]
    write(tmp_path / "m.csv", rows)
    assert cli("subset", "--pairs", tmp_path / "m.csv", "--per-class", 2, "--out", tmp_path / "s.csv") == 0
    assert (tmp_path / "s.csv").read_text().splitlines() == rows[:3]
