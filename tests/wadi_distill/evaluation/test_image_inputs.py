"""Image files `evaluate` reads: truncated files and decompression bombs refused by name, TIFF read, nothing skipped
silently."""

import json
import struct
import zlib

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _tiny_features import image_folder as _folder
from _tiny_features import save_tiny_features
from wadi_distill.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result) -> str:
    return " ".join(result.output.split())


def _bomb_png(path, side=20000):
    """A PNG whose header declares side×side 8-bit grey pixels (400 MB decoded) in a file of a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4 * (side + 1))))
                     + chunk(b"IEND", b""))
    return path


def _digits_folder(path, count=6):
    from wadi_distill.builtin.digits.data import load_split

    path.mkdir()
    test = load_split("test")
    pixels = ((test.images[:count, 0] + 1) / 2 * 255).round().to(torch.uint8).numpy()
    for i, picture in enumerate(pixels):
        Image.fromarray(picture).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    return root / "features.pt", save_tiny_features(root / "features.pt")


def test_a_truncated_png_against_the_builtin_digits_is_named(tmp_path):
    folder = _digits_folder(tmp_path / "digits")
    whole = (folder / "002.png").read_bytes()
    (folder / "002.png").write_bytes(whole[: len(whole) // 2])
    result = run("evaluate", "--reference", "builtin:digits", "--images", folder, "-o", tmp_path / "r.json")
    assert result.exit_code == 2
    assert said(result).startswith(f"error: {folder / '002.png'} is not a readable image")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "r.json").exists()


def test_a_decompression_bomb_is_refused_by_name(tmp_path, features):
    bomb_digits = _digits_folder(tmp_path / "digits")
    _bomb_png(bomb_digits / "bomb.png")
    result = run("evaluate", "--reference", "builtin:digits", "--images", bomb_digits, "-o", tmp_path / "a.json")
    assert result.exit_code == 2
    assert f"{bomb_digits / 'bomb.png'} declares more than 178,956,970 pixels, so it is refused as a possible decompression bomb" in said(result)
    real = _folder(tmp_path / "real", 8, 0)
    _bomb_png(real / "zz.png")
    fake = _folder(tmp_path / "fake", 6, 1)
    result = run("evaluate", "--images", fake, "--reference", real, "--features", features[0], "-o", tmp_path / "b.json")
    assert result.exit_code == 2 and f"{real / 'zz.png'} declares more than" in said(result)
    assert result.output.count("\n") == 1
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_tiff_images_are_read_and_other_files_are_said_to_be_skipped(tmp_path, features):
    real = _folder(tmp_path / "real", 10, 0)
    png = _folder(tmp_path / "png", 6, 1, shift=0.3)
    tiff = tmp_path / "tiff"
    tiff.mkdir()
    for path in png.iterdir():
        Image.open(path).save(tiff / (path.stem + ".tiff"))
    (tiff / "notes.txt").write_text("not an image")
    Image.open(png / "000.png").save(tiff / "extra.gif")
    a = run("evaluate", "--images", png, "--reference", real, "--features", features[0], "-o", tmp_path / "a.json")
    b = run("evaluate", "--images", tiff, "--reference", real, "--features", features[0], "-o", tmp_path / "b.json")
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ra, rb = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert rb["formats"]["images"] == {".tiff": 6}
    assert rb["metrics"]["fid"] == ra["metrics"]["fid"]  # TIFF is lossless: the same pixels, the same score
    note = f"skipped 2 files in {tiff} that are not images (.gif: 1, .txt: 1)"
    assert any(n.startswith(note) for n in rb["notes"]) and note in said(b)
    assert not any("skipped" in n for n in ra["notes"])
