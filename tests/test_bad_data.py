"""Unusual and bad images through the real training path (simclr.py on a hand-made ImageFolder and
manifest): what can be decoded to correct RGB trains; what cannot stops the run with one line per
problem naming the file, exit code 2, before training where a header shows it.

Covered elsewhere: RGB/L/P/RGBA/LA/16- and 32-bit grayscale decoding, 1x1 pixel values, empty and
garbage files and the bomb guard on load_rgb (tests/test_data.py); a garbage header before training
and a truncated file in a loader worker (tests/test_simclr.py)."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common import data
from tests.test_methods import read_log, train

RUN = ["--pairs", "semantic", "--epochs", "1", "--batch-size", "4", "--arch", "convnet", "--img-size", "32",
       "--workers", "0", "--log-every", "1"]


def write_png(path, width, height, bit_depth, color_type, pixels=b""):
    """A PNG written chunk by chunk: 16-bit RGB (which PIL cannot write) or any header at all."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels))
                     + chunk(b"IEND", b""))


def write_rgb16(path, rgb16):
    """rgb16: (H, W, 3) values in 0..65535."""
    rows = rgb16.astype(">u2")
    write_png(path, rows.shape[1], rows.shape[0], 16, 2, b"".join(b"\0" + row.tobytes() for row in rows))


def noise(size, seed):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_data(root):
    """Two classes of 4 pairs; class a's pairs include a CMYK JPEG, 16-bit RGB and grayscale PNGs and a
    1x1 image; an empty class folder; one image outside the manifest with a non-UTF-8 name."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(noise(24, i)).save(root / cls / f"{i}.png")
    Image.fromarray(noise(24, 0)).convert("CMYK").save(root / "a" / "0.png", format="JPEG")  # misnamed too
    write_rgb16(root / "a" / "1.png", noise(24, 1).astype(np.uint16) * 257)
    Image.fromarray(noise(24, 2)[..., 0].astype(np.uint16) * 257).save(root / "a" / "2.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "a" / "3.png")
    (root / "empty").mkdir()
    Image.fromarray(noise(24, 9)).save(os.fsencode(root / "a") + b"/caf\xe9.png")
    rows = [f"{cls},{cls}/{2 * i}.png,{cls}/{2 * i + 1}.png" for cls in ("a", "b") for i in range(4)]
    (root / "pairs.csv").write_text("\n".join(["class,image_a,image_b", *rows]) + "\n")
    return root


def test_cmyk_jpeg_and_16_bit_rgb_png_decode_to_their_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[...] = (200, 60, 20)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(np.asarray(data.load_rgb(tmp_path / "cmyk.jpg")).astype(int) - rgb).max() <= 3

    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[...] = (40000, 1000, 65535)
    write_rgb16(tmp_path / "rgb16.png", rgb16)
    out = np.asarray(data.load_rgb(tmp_path / "rgb16.png")).astype(int)
    assert out.shape == (2, 3, 3) and np.abs(out - np.round(rgb16 / 65535 * 255)).max() <= 1


def test_unusual_images_train_and_a_non_utf8_name_is_read(tmp_path, monkeypatch):
    root = make_data(tmp_path / "data")
    out = tmp_path / "out"
    train(monkeypatch, "simclr.py", *RUN, "--data", root, "--out", out)
    log = read_log(out)
    assert len([r for r in log if "step" in r]) == 2 and all(np.isfinite(r["loss"]) for r in log)
    # The monitor's queries are the class folders' images outside the manifest: here only caf\xe9.png.
    assert log[-1]["knn_top1"] is not None


def assert_stops_with(capsys, stopped, *files):
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == len(files), err
    for line, name in zip(errors, files):
        assert name in line, err


def test_bombs_are_refused_from_their_header_before_training(tmp_path, monkeypatch, capsys):
    root = make_data(tmp_path / "data")
    write_png(root / "a" / "4.png", 100_000, 100_000, 8, 2)  # 10^10 pixels: far over the limit
    write_png(root / "b" / "0.png", 15_000, 15_000, 8, 2)  # 2.25 x 10^8: over the limit, under twice it
    with pytest.raises(SystemExit) as stopped:
        train(monkeypatch, "simclr.py", *RUN, "--data", root, "--out", tmp_path / "out")
    assert_stops_with(capsys, stopped, "a/4.png: Image size (10000000000 pixels)", "b/0.png: Image size (225000000")
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_a_manifest_that_is_not_utf8_is_refused_before_training(tmp_path, monkeypatch, capsys):
    root = make_data(tmp_path / "data")
    manifest = root / "pairs.csv"
    manifest.write_bytes(manifest.read_bytes() + b"a,a/caf\xe9.png,a/5.png\n")  # the raw Latin-1 name
    with pytest.raises(SystemExit) as stopped:
        train(monkeypatch, "simclr.py", *RUN, "--data", root, "--out", tmp_path / "out")
    assert_stops_with(capsys, stopped, f"{manifest}: cannot read manifest: 'utf-8' codec can't decode byte 0xe9")


def test_a_jpeg_corrupt_past_its_header_stops_the_run_naming_it(tmp_path, monkeypatch, capsys):
    root = make_data(tmp_path / "data")
    buf = io.BytesIO()
    Image.fromarray(noise(64, 5)).save(buf, format="JPEG")
    jpeg = bytearray(buf.getvalue())
    for i in range(len(jpeg) // 2, len(jpeg) // 2 + 64):  # the header reads; the compressed data do not
        jpeg[i] = 0xFF if i % 7 == 0 else jpeg[i] ^ 0x5A  # (stray 0xFF are markers; libjpeg skips mere zeros)
    (root / "b" / "3.png").write_bytes(jpeg)
    with pytest.raises(SystemExit) as stopped:
        train(monkeypatch, "simclr.py", *RUN, "--data", root, "--out", tmp_path / "out")
    assert_stops_with(capsys, stopped, "b/3.png: broken data stream")
