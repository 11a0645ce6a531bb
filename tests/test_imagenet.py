"""ImageNet class lists (names -> wnids with timm's tables, the paper's list) and decoding files
the way ImageNet has them (CMYK and grayscale JPEGs, a PNG named .JPEG, broken files)."""
import numpy as np
import pytest
from PIL import Image

from common import data, imagenet


# -- class lists ------------------------------------------------------------------------------------

def wnids(names, groups=None):
    return [c.wnid for c in imagenet.resolve(names, groups)]


def test_shipped_paper_list_is_the_checked_resolution_of_appendix_a4():
    shipped = imagenet.paper_classes()
    assert shipped == imagenet.resolve_paper_classes()
    assert [(c.group, c.name) for c in shipped] == imagenet.paper_appendix()
    assert len(shipped) == 175 and len({c.wnid for c in shipped}) == 175
    assert {c.name: c.wnid for c in shipped if not c.in_1k} == {"lemon_shark": "n01490670", "tadpole": "n02469472"}
    assert all(c.wnid in imagenet.synsets_1k() for c in shipped if c.in_1k)


def test_paper_names_that_need_a_rule():
    by_name = {c.name: c for c in imagenet.paper_classes()}
    assert by_name["crane"].wnid == "n02012849"  # listed among animals: the bird, not the machine
    assert by_name["triumph_arch"].wnid == "n04486054"  # the appendix's spelling of "triumphal arch"
    assert by_name["birdhouse"].wnid == "n02843684"  # listed among animals, unambiguous anyway
    assert by_name["Granny_Smith"].imagenet_name == "Granny Smith"


def test_names_resolve_case_and_underscore_blind_preferring_first_lemmas():
    assert wnids(["granny smith", "Shih-Tzu", "yellow_lady's_slipper"]) == ["n07742313", "n02086240", "n12057211"]
    # "partridge" is the first lemma of n01807496 and only a synonym of the ruffed grouse.
    assert wnids(["partridge"]) == ["n01807496"]
    assert wnids(["ruffed grouse"]) == ["n01797886"]
    assert wnids(["n03126707"]) == ["n03126707"]


@pytest.mark.parametrize("name,group,wnid", [
    ("crane", "Animals", "n02012849"), ("crane", "Vehicles", "n03126707"),
    ("cardigan", "animal", "n02113186"), ("cardigan", "Clothing", "n02963159"),
])
def test_groups_settle_ambiguous_names(name, group, wnid):
    assert wnids([name], [group]) == [wnid]


def test_unresolved_names_fail_loudly_each_on_its_line():
    with pytest.raises(imagenet.ClassListError) as e:
        imagenet.resolve(["crane", "triumph_arch", "lemon_shark", "n00000001", "beagle", "n02088364",
                          "maillot"], ["", "", "", "", "", "", "Clothing"])
    lines = str(e.value).splitlines()
    assert len(lines) == 6
    assert lines[0].startswith("crane: ambiguous") and "n02012849" in lines[0] and "n03126707" in lines[0]
    assert "did you mean 'triumphal arch'" in lines[1]
    assert lines[2].startswith("lemon_shark: not an ImageNet-1k class") and "n01490670" in lines[2]
    assert lines[3] == "n00000001: no such ImageNet synset"
    assert lines[4] == "n02088364: same class as beagle (n02088364)"
    assert lines[5].startswith("maillot: ambiguous")  # both maillots are clothing: the group cannot help


def test_user_class_lists_plain_and_csv(tmp_path):
    plain = tmp_path / "classes.txt"
    plain.write_text("# my classes\nn01443537\nbeagle   # a dog\n\nGranny_Smith\n")
    assert [c.wnid for c in imagenet.read_class_list(plain)] == ["n01443537", "n02088364", "n07742313"]
    table = tmp_path / "classes.csv"
    table.write_text("\ufeffname,group\ncrane,Machines\ncrane,Birds and other animals\n")
    assert [c.wnid for c in imagenet.read_class_list(table)] == ["n03126707", "n02012849"]
    # The shipped table is itself a valid class list (its wnid column is used).
    shipped = tmp_path / "paper.csv"
    imagenet.write_class_table(imagenet.paper_classes(), shipped)
    assert [c.wnid for c in imagenet.read_class_list(shipped)] == [c.wnid for c in imagenet.paper_classes()]
    plain.write_text("beagle\ncrane\n")
    with pytest.raises(imagenet.ClassListError, match=r"classes.txt: crane: ambiguous"):
        imagenet.read_class_list(plain)
    plain.write_text("# nothing\n")
    with pytest.raises(imagenet.ClassListError, match="names no classes"):
        imagenet.read_class_list(plain)


def test_resolve_command(tmp_path, capsys):
    assert imagenet.main(["resolve", "paper"]) == 0
    out = capsys.readouterr().out
    assert "175 classes, 173 in ImageNet-1k" in out and "n01490670  lemon_shark" in out
    bad = tmp_path / "bad.txt"
    bad.write_text("beagle\nbeagel\n")
    assert imagenet.main(["resolve", str(bad)]) == 2
    assert "error: " in capsys.readouterr().err


# -- decoding files as ImageNet has them --------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """The same picture as RGB JPEG, CMYK JPEG, grayscale JPEG and PNG named .JPEG, plus broken files."""
    root = tmp_path_factory.mktemp("odd")
    img = imagenet.synthetic_image(np.random.default_rng(0), (96, 64), 0.3)
    img.save(root / "rgb.JPEG", quality=95)
    img.convert("CMYK").save(root / "cmyk.JPEG", quality=95)
    img.convert("L").save(root / "gray.JPEG", quality=95)
    img.save(root / "png.JPEG", "PNG")
    jpeg = (root / "rgb.JPEG").read_bytes()
    (root / "truncated.JPEG").write_bytes(jpeg[:len(jpeg) // 2])
    (root / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (root / "empty.JPEG").write_bytes(b"")
    return root, np.asarray(img, dtype=np.float64)


def test_cmyk_gray_and_png_named_jpeg_decode_to_the_right_rgb(odd_files):
    root, original = odd_files
    assert Image.open(root / "cmyk.JPEG").mode == "CMYK" and Image.open(root / "png.JPEG").format == "PNG"
    decoded = {n: data.load_rgb(root / f"{n}.JPEG") for n in ("rgb", "cmyk", "gray", "png")}
    assert all(img.mode == "RGB" and img.size == (96, 64) for img in decoded.values())
    arrays = {n: np.asarray(img, dtype=np.float64) for n, img in decoded.items()}
    assert np.array_equal(arrays["png"], original)
    # Pillow writes Adobe-style (inverted) CMYK like Photoshop; a decoder that ignored the
    # inversion would give the negative, hundreds of levels off.
    assert np.abs(arrays["cmyk"] - original).mean() < 8
    gray = arrays["gray"]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    luma = original @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).mean() < 4


@pytest.mark.parametrize("name", ["truncated", "corrupt", "empty"])
def test_broken_files_raise_an_error_naming_them(odd_files, name):
    root, _ = odd_files
    with pytest.raises(data.ImageError, match=f"{name}.JPEG"):
        data.load_rgb(root / f"{name}.JPEG")


def test_synthetic_tree_has_imagenet_oddities(tmp_path):
    tree = imagenet.synthetic_tree(tmp_path, ["n01440764", "n01443537"], 5, size=(40, 30))
    first = [Image.open(tmp_path / name) for name in tree["n01440764"]]
    kinds = [(im.format, im.mode) for im in first[:4]]
    assert kinds == [("JPEG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "RGB")]
    assert all(name.endswith(".JPEG") for names in tree.values() for name in names)
    assert all(data.load_rgb(tmp_path / n).mode == "RGB" for names in tree.values() for n in names)
