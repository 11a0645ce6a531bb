"""The embedded world as a PASCAL VOC-format detection split, so that eval.detection runs end to
end on CPU.

    python -m eval.voc_world --out DIR [--world KEY=VALUE ...]     # DIR/VOCdevkit/VOC2007/...

VOC has 20 classes; we take the world's first 20 pretraining classes (c000..c019) and their new
instances of the seen-class transfer split (class-independent backgrounds, never used for
pretraining): transfer/seen/train for trainval, transfer/seen/test for test. A world image holds
one object filling most of it, so to make localisation part of the task every VOC image is a
2x2 mosaic of four world images (64 px for 32 px worlds), each object annotated with its
known box from boxes.csv. Test objects appear once each; the trainval pool is used in four
differently shuffled rounds (800 objects in 200 images with the default world), a leftover
of fewer than four images per round is dropped. No object is marked difficult.

Images are PNG (lossless; the detection reader accepts JPEGImages/<id>.png when no .jpg exists).
Boxes: the world's 0-based (xmin, ymin, xmax exclusive, ymax exclusive) becomes VOC's 1-based
inclusive (xmin + 1, ymin + 1, xmax, ymax), so the reader's (xmin - 1, ymin - 1, xmax, ymax)
gives back the world's box exactly.
"""
import csv
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES, GRID, TRAIN_ROUNDS = 20, 2, 4


def _annotation(filename, width, height, objects):
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (xmin, ymin, xmax, ymax) in objects:
        obj = ET.SubElement(root, "object")
        for key, value in (("name", name), ("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
            ET.SubElement(obj, key).text = str(value)
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", xmin + 1), ("ymin", ymin + 1), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.ElementTree(root)


def write_voc(world_root, out, num_classes=NUM_CLASSES, grid=GRID, train_rounds=TRAIN_ROUNDS, seed=0):
    """Writes out/VOCdevkit/VOC2007/{Annotations, JPEGImages, ImageSets/Main/{trainval,test}.txt}."""
    world_root, base = Path(world_root), Path(out) / "VOCdevkit" / "VOC2007"
    classes = json.loads((world_root / "world.json").read_text())["classes"][:num_classes]
    with open(world_root / "boxes.csv", newline="") as f:
        boxes = {row["path"]: tuple(int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")) for row in csv.DictReader(f)}
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    count = 0
    for image_set, part, rounds in (("trainval", "train", train_rounds), ("test", "test", 1)):
        pool = [(f"transfer/seen/{part}/{c}/{name}", c) for c in classes
                for name in sorted(os.listdir(world_root / "transfer" / "seen" / part / c))]
        ids = []
        for _ in range(rounds):
            order = rng.permutation(len(pool))
            for start in range(0, len(order) - grid * grid + 1, grid * grid):
                tiles = [pool[i] for i in order[start:start + grid * grid]]
                images = [np.asarray(Image.open(world_root / path).convert("RGB")) for path, _ in tiles]
                side = images[0].shape[0]
                mosaic = np.zeros((grid * side, grid * side, 3), np.uint8)
                objects = []
                for cell, ((path, name), img) in enumerate(zip(tiles, images)):
                    y, x = divmod(cell, grid)
                    mosaic[y * side:(y + 1) * side, x * side:(x + 1) * side] = img
                    x0, y0, x1, y1 = boxes[path]
                    if x1 > x0 and y1 > y0:
                        objects.append((name, (x0 + x * side, y0 + y * side, x1 + x * side, y1 + y * side)))
                image_id = f"{count:06d}"
                count += 1
                Image.fromarray(mosaic).save(base / "JPEGImages" / f"{image_id}.png")
                _annotation(f"{image_id}.png", mosaic.shape[1], mosaic.shape[0], objects).write(
                    base / "Annotations" / f"{image_id}.xml")
                ids.append(image_id)
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(i + "\n" for i in ids))
    return Path(out)


def ensure_voc(world_root):
    """The world's VOC split in world_root/voc/, written on first use (in a temporary folder,
    then renamed into place, so a folder that exists is complete)."""
    root = Path(world_root) / "voc" / f"c{NUM_CLASSES}-g{GRID}-r{TRAIN_ROUNDS}"
    if root.is_dir():
        return root
    root.parent.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write_voc(world_root, tmp)
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():  # not a concurrent writer that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv=None):
    from common import flags
    from common.data import world_config, world_setting
    from common.world import ensure_world

    parser = flags.Parser("python -m eval.voc_world", description="Write the embedded world's VOC-format detection split.")
    parser.add_argument("--out", required=True, help="output folder (gets VOCdevkit/VOC2007/...)")
    parser.add_argument("--world", nargs="*", type=world_setting, metavar="KEY=VALUE", help="embedded-world settings")
    args = parser.parse_args(argv)
    out = write_voc(ensure_world(world_config(args.world)), args.out)
    for image_set in ("trainval", "test"):
        ids = (out / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split()
        print(f"{image_set}: {len(ids)} images")


if __name__ == "__main__":
    main()
