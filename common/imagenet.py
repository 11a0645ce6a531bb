"""ImageNet class lists: class names resolved to wnids with the synset tables that ship inside
timm (no download), the paper's class list (its Appendix A.4), and small generated
ImageNet-like trees for tests, benchmarks and dry runs.

    python -m common.imagenet resolve paper|FILE       # show how a class list resolves
    python -m common.imagenet paper-classes --out common/resources/paper_classes.csv

A class list FILE is either plain text, one class per line (a wnid such as n02012849 or a
name such as `crane` or `Granny_Smith`; `#` starts a comment), or a CSV whose header has a
`name` or `wnid` column and optionally `group` (the shipped paper_classes.csv is one).

Resolution rules: names compare case-insensitively with `_` and spaces alike. A name matches
an ImageNet-1k synset whose first lemma it is; failing that, one listing it as a synonym.
A name matching several synsets is settled by its group: a group naming animals picks the
animal synset, any other group the non-animal one (the paper lists `crane` among its animals,
so the bird, n02012849). Anything still ambiguous or unknown is an error, with candidates.
"""
import argparse
import csv
import difflib
import functools
import io
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WNID = re.compile(r"n\d{8}")
# WordNet numbers synsets by lexicographer file, animals before artifacts, so ImageNet-1k's
# first 398 classes in wnid order (tench .. puffer) are exactly its animals.
NUM_ANIMAL_CLASSES = 398
TABLE_HEADER = ("group", "name", "wnid", "imagenet_name", "imagenet_1k")

# Appendix A.4 of the paper as printed: the text says 187 classes but names these 175.
PAPER_APPENDIX_A4 = {
    "Animals": (
        "African_grey, albatross, American_alligator, American_coot, American_egret, American_lobster, "
        "Afghan_hound, Arabian_camel, bald_eagle, basset, beagle, bee_eater, bittern, black_grouse, "
        "black_stork, black_swan, black_widow, Blenheim_spaniel, brambling, brown_bear, bullfrog, bulbul, "
        "bustard, centipede, chickadee, Chihuahua, chimpanzee, cock, cockroach, cougar, crane, drake, "
        "dowitcher, Egyptian_cat, European_fire_salamander, flamingo, gazelle, goldfinch, goldfish, goose, "
        "great_grey_owl, hen, hornbill, house_finch, hummingbird, indigo_bunting, jacamar, Japanese_spaniel, "
        "jay, king_penguin, kite, lemon_shark, limpkin, little_blue_heron, lion, macaw, magpie, Maltese_dog, "
        "monarch, oystercatcher, peacock, pelican, Pekinese, ptarmigan, quail, red-breasted_merganser, "
        "red-backed_sandpiper, redshank, Rhodesian_ridgeback, robin, ruffed_grouse, Shih-Tzu, snail, "
        "spoonbill, sulphur_butterfly, sulphur-crested_cockatoo, tabby, tadpole, tailed_frog, tarantula, "
        "tiger_shark, toucan, toy_terrier, vulture, water_ouzel, white_stork, birdhouse"),
    "Plants & Fungi": (
        "banana, bell_pepper, corn, daisy, Granny_Smith, lemon, mushroom, orange, pomegranate, rapeseed, "
        "strawberry, yellow_lady's_slipper"),
    "Vehicles": (
        "aircraft_carrier, airliner, airship, ambulance, amphibian, balloon, bullet_train, cab, convertible, "
        "electric_locomotive, fire_engine, forklift, freight_car, garbage_truck, go-kart, golfcart, jeep, "
        "limousine, minivan, Model_T, moving_van, passenger_car, pickup, police_van, racer, "
        "recreational_vehicle, schooner, snowplow, space_shuttle, sports_car, streetcar, trailer_truck, "
        "tractor, tow_truck, thresher, trolleybus, unicycle, yawl"),
    "Architectural & Natural Landmarks": (
        "alp, cliff, geyser, lakeside, promontory, sandbar, seashore, triumph_arch, valley, viaduct, volcano"),
    "Household Items": (
        "computer_keyboard, cup, dining_table, eggnog, espresso, hot_pot, lawn_mower, plate, red_wine, "
        "table_lamp, teapot, television, throne, torch, tray, typewriter_keyboard, wall_clock, wardrobe, "
        "washer, water_bottle, water_jug, wine_bottle, wok"),
    "Human Activities": "groom, scuba_diver, tennis_ball, volleyball",
}
# The appendix's spellings that differ from every ImageNet lemma.
PAPER_SPELLINGS = {"triumph_arch": "triumphal arch"}


class ClassListError(ValueError):
    """A class list that does not resolve; the message has one line per problem."""


@dataclass(frozen=True)
class ImageNetClass:
    group: str
    name: str  # as the list gives it
    wnid: str
    imagenet_name: str  # the synset's first lemma
    in_1k: bool


def _timm_table(filename):
    return resources.files("timm.data").joinpath("_info", filename).read_text(encoding="utf-8")


@functools.cache
def synsets_1k():
    """The 1000 ImageNet-1k wnids in class-index order."""
    return tuple(_timm_table("imagenet_synsets.txt").split())


@functools.cache
def lemmas():
    """wnid -> its lemmas (first = canonical name), for every ImageNet-21k synset."""
    rows = csv.reader(io.StringIO(_timm_table("imagenet_synset_to_lemma.txt")), delimiter="\t")
    return {wnid: tuple(lemma.strip() for lemma in names.split(",")) for wnid, names in rows}


@functools.cache
def definitions():
    rows = csv.reader(io.StringIO(_timm_table("imagenet_synset_to_definition.txt")), delimiter="\t")
    return dict(rows)


def normalise(name):
    return re.sub(r"[\s_]+", " ", name).strip().casefold()


@functools.cache
def _name_index(in_1k):
    """(first lemma -> wnids, any lemma -> wnids) over ImageNet-1k or all of ImageNet-21k."""
    table = lemmas()
    first, any_lemma = {}, {}
    for wnid in synsets_1k() if in_1k else table:
        names = table[wnid]
        first.setdefault(normalise(names[0]), []).append(wnid)
        for name in dict.fromkeys(normalise(n) for n in names):
            any_lemma.setdefault(name, []).append(wnid)
    return first, any_lemma


def _lookup(key, in_1k):
    first, any_lemma = _name_index(in_1k)
    return first.get(key) or any_lemma.get(key, [])


def _by_group(candidates, group):
    """Keeps the animal synsets for a group naming animals, the others for any other group."""
    if not group:
        return candidates
    animals = set(synsets_1k()[:NUM_ANIMAL_CLASSES])
    want_animal = "animal" in group.casefold()
    return [w for w in candidates if (w in animals) == want_animal] or candidates


def _describe(wnid):
    return f"{wnid} ({', '.join(lemmas()[wnid][:3])}: {definitions().get(wnid, '')[:60]})"


def resolve(names, groups=None, beyond_1k=False):
    """Resolves class names or wnids to ImageNetClass entries (rules in the module docstring).

    With beyond_1k, a name that is no ImageNet-1k class may resolve to an ImageNet-21k synset
    (flagged in_1k=False). Raises ClassListError listing every name left unresolved."""
    groups = groups or [""] * len(names)
    table, set_1k = lemmas(), set(synsets_1k())
    out, problems, seen = [], [], {}
    for name, group in zip(names, groups):
        if WNID.fullmatch(name):
            if name not in table:
                problems.append(f"{name}: no such ImageNet synset")
                continue
            wnid = name
        else:
            key = normalise(name)
            candidates = _by_group(_lookup(key, in_1k=True), group)
            if not candidates:
                wider = _lookup(key, in_1k=False)
                if beyond_1k and len(wider) == 1:
                    candidates = wider
                elif wider:
                    problems.append(f"{name}: not an ImageNet-1k class (ImageNet-21k synset "
                                    f"{', '.join(map(_describe, wider))}); give its wnid to use it")
                    continue
                else:
                    close = difflib.get_close_matches(key, list(_name_index(True)[1]), n=3, cutoff=0.7)
                    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                    problems.append(f"{name}: no ImageNet class has this name{hint}")
                    continue
            if len(candidates) > 1:
                problems.append(f"{name}: ambiguous, matches {'; '.join(map(_describe, candidates))}; "
                                "give the wnid instead")
                continue
            wnid = candidates[0]
        if wnid in seen:
            problems.append(f"{name}: same class as {seen[wnid]} ({wnid})")
            continue
        seen[wnid] = name
        out.append(ImageNetClass(group, name, wnid, table[wnid][0], wnid in set_1k))
    if problems:
        raise ClassListError("\n".join(problems))
    return out


def paper_appendix():
    """[(group, name as printed)] of Appendix A.4, in its order."""
    return [(group, name.strip()) for group, text in PAPER_APPENDIX_A4.items() for name in text.split(",")]


def resolve_paper_classes():
    """The appendix's classes resolved afresh (what the shipped paper_classes.csv holds)."""
    entries = paper_appendix()
    found = resolve([PAPER_SPELLINGS.get(n, n) for _, n in entries], [g for g, _ in entries], beyond_1k=True)
    return [ImageNetClass(g, printed, c.wnid, c.imagenet_name, c.in_1k) for (g, printed), c in zip(entries, found)]


def write_class_table(classes, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TABLE_HEADER)
        w.writerows((c.group, c.name, c.wnid, c.imagenet_name, "yes" if c.in_1k else "no") for c in classes)


def paper_classes():
    """The shipped class list of Appendix A.4 (175 names; 173 of them ImageNet-1k classes)."""
    text = resources.files("common").joinpath("resources", "paper_classes.csv").read_text(encoding="utf-8")
    return [ImageNetClass(r["group"], r["name"], r["wnid"], r["imagenet_name"], r["imagenet_1k"] == "yes")
            for r in csv.DictReader(io.StringIO(text))]


def read_class_list(spec):
    """ImageNetClass entries of `paper` (the shipped list) or of a class-list file."""
    if spec == "paper":
        return paper_classes()
    try:
        lines = Path(spec).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ClassListError(f"cannot read class list {spec}: {e}") from None
    header = [c.strip().casefold() for c in lines[0].split(",")] if lines else []
    if "name" in header or "wnid" in header:
        rows = list(csv.DictReader(lines[1:], fieldnames=header))
        names = [(r.get("wnid") or "").strip() or (r.get("name") or "").strip() for r in rows]
        groups = [(r.get("group") or "").strip() for r in rows]
    else:
        names = [line.split("#")[0].strip() for line in lines]
        names = [n for n in names if n]
        groups = None
    if not names:
        raise ClassListError(f"class list {spec} names no classes")
    try:
        return resolve(names, groups)
    except ClassListError as e:
        raise ClassListError("\n".join(f"{spec}: {line}" for line in str(e).splitlines())) from None


# -- generated ImageNet-like trees ----------------------------------------------------------------

def synthetic_image(rng, size, hue):
    """A structured RGB image: a colour gradient with coarse and fine texture, a central object
    whose colour depends on `hue` (0-1) and a few patches. At 500x375 and JPEG quality 90 the
    files are about 100 KiB, the size of an average ImageNet training image."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w, 0:1][:2] / max(w, h)
    base = rng.uniform(0, 255, (3, 3))
    coarse = Image.fromarray(rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8))
    coarse = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64) - 128
    bg = 0.6 * (base[0] + base[1] * x + base[2] * y) + 0.4 * coarse + rng.normal(0, 20, (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(255 * c) for c in (hue, 1 - hue, 0.5 + 0.5 * np.sin(6.28 * hue)))
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    rx, ry = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour, outline=(0, 0, 0), width=2)
    for _ in range(4):
        px, py = rng.uniform(0, w), rng.uniform(0, h)
        draw.rectangle((px, py, px + w / 10, py + h / 10), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def synthetic_tree(root, wnids, per_class, size=(64, 48), seed=0, quality=90, oddities=True):
    """Writes root/<wnid>/<wnid>_<i>.JPEG like ImageNet's train split. With oddities, image 1 of
    the first class is a CMYK JPEG, image 2 a grayscale JPEG and image 3 a PNG named .JPEG, as
    ImageNet has a few of each. Returns {wnid: [relative paths]}."""
    rng = np.random.default_rng(seed)
    root, tree = Path(root), {}
    for c, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        tree[wnid] = []
        for i in range(per_class):
            name = f"{wnid}/{wnid}_{i}.JPEG"
            img = synthetic_image(rng, size, (c + 0.5) / len(wnids))
            odd = oddities and c == 0 and i in (1, 2, 3)
            if odd and i == 1:
                img.convert("CMYK").save(root / name, "JPEG", quality=quality)
            elif odd and i == 2:
                img.convert("L").save(root / name, "JPEG", quality=quality)
            else:
                img.save(root / name, "PNG" if odd else "JPEG", quality=quality)
            tree[wnid].append(name)
    return tree


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.imagenet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("resolve", help="print how a class list resolves to wnids")
    show.add_argument("classes", help="paper or a class-list file")
    gen = sub.add_parser("paper-classes", help="resolve Appendix A.4 afresh and write the class table")
    gen.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "paper-classes":
            classes = resolve_paper_classes()
            write_class_table(classes, args.out)
        else:
            classes = read_class_list(args.classes)
    except ClassListError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    for c in classes:
        note = "" if c.in_1k else "  (not an ImageNet-1k class)"
        print(f"{c.wnid}  {c.name:<28} {c.imagenet_name}{note}")
    outside = sum(not c.in_1k for c in classes)
    print(f"{len(classes)} classes, {len(classes) - outside} in ImageNet-1k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
