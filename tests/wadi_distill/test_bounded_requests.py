"""`sample` and `evaluate` generate in batches with memory bounded by one batch, and refuse requests that cannot be met.

The memory bound is checked structurally: every batch the generator draws is recorded (weakly), and when the next
batch is drawn the earlier ones must be gone from memory and already on disk.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wadi_distill.cli import app

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "reports" / "demo" / "lorad_student"
STUDENT = ["--teacher", "builtin:digits", "--adapter", str(ADAPTER)]

pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def spy(monkeypatch):
    """Record, at every batch the student draws: its size, the batches still alive and the PNGs on disk so far."""
    import wadi_distill.one_step as one_step

    original = one_step.one_step_images
    state = {"folder": None, "calls": [], "alive": []}

    def recorded(*args, **kwargs):
        gc.collect()
        alive = sum(ref() is not None for ref in state["alive"])
        on_disk = len(list(state["folder"].glob("*.png"))) if state["folder"] and state["folder"].is_dir() else 0
        images = original(*args, **kwargs)
        state["calls"].append({"size": len(images), "alive_before": alive, "on_disk_before": on_disk})
        state["alive"].append(weakref.ref(images))
        return images

    monkeypatch.setattr(one_step, "one_step_images", recorded)
    return state


def test_sample_into_a_folder_holds_one_batch_and_writes_as_it_goes(spy, tmp_path):
    folder = tmp_path / "many"
    spy["folder"] = folder
    result = run("sample", *STUDENT, "--prompt", "3", "--prompt", "7", "-n", "4", "--batch-size", "3", "-o", folder)
    assert result.exit_code == 0, result.output
    assert "wrote 8 one-step images to the folder" in said(result)
    assert [c["size"] for c in spy["calls"]] == [3, 3, 2]
    assert [c["alive_before"] for c in spy["calls"]] == [0, 0, 0]  # never more than the batch being drawn
    assert [c["on_disk_before"] for c in spy["calls"]] == [0, 3, 6]  # each batch written before the next
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:06d}.png" for i in range(8)]
    # the same images as the in-memory sample (prompt order, seeds counting up per prompt)
    from wadi_distill.one_step import sample

    expected = sample("builtin:digits", ["3", "7"], adapter=ADAPTER, n=4)
    written = np.stack([np.asarray(Image.open(folder / name)) for name in files])
    np.testing.assert_array_equal(written, (expected[:, 0] * 255).round().to(torch.uint8).numpy())


def test_a_sample_grid_is_filled_batch_by_batch_and_written_as_the_suffix_says(spy, tmp_path):
    png, jpg = tmp_path / "grid.png", tmp_path / "grid.jpg"
    result = run("sample", *STUDENT, "--prompt", "1", "--prompt", "2", "-n", "5", "--batch-size", "4", "-o", png)
    assert result.exit_code == 0, result.output
    assert [c["size"] for c in spy["calls"]] == [4, 4, 2] and [c["alive_before"] for c in spy["calls"]] == [0, 0, 0]
    from wadi_distill.one_step import image_grid, sample

    expected = image_grid(sample("builtin:digits", ["1", "2"], adapter=ADAPTER, n=5), nrow=5)
    grid = np.asarray(Image.open(png))
    # the grid was computed in batches of 4, 4 and 2, the expected images in one batch of 5: the matmuls' blocking
    # differs with the batch, so a pixel may round to the neighbouring level, never further
    reference = (expected[0] * 255).round().to(torch.uint8).numpy()
    difference = np.abs(grid.astype(int) - reference.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    result = run("sample", *STUDENT, "--prompt", "1", "-n", "3", "-o", jpg)
    assert result.exit_code == 0, result.output
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(jpg).format == "JPEG"


def test_an_unknown_suffix_is_refused_before_anything_loads(tmp_path):
    result = run("sample", *STUDENT, "--prompt", "1", "-o", tmp_path / "grid.gif")
    assert result.exit_code == 2
    assert "has the suffix '.gif'; name a .png or .jpg grid, or a folder" in said(result)
    assert list(tmp_path.iterdir()) == []


def test_an_absurd_sample_count_is_refused_with_its_disk_and_time(monkeypatch, tmp_path):
    import wadi_distill.request_size as request_size

    # a grid of 10^8 images could never be opened: refused whatever the disk
    grid = run("sample", *STUDENT, "--prompt", "3", "-n", "100000000", "-o", tmp_path / "big.png")
    assert grid.exit_code == 2
    assert "a grid of 100,000,000 images would be 1,000,000,002×12 pixels, more than PIL's decompression-bomb limit" in said(grid)
    # one file each on a disk with 10 GiB and 5 million inodes free: refused with the numbers
    monkeypatch.setattr(request_size, "free_space", lambda path: (10 * 2**30, 5_000_000, 4096))
    folder = run("sample", *STUDENT, "--prompt", "3", "-n", "100000000", "-o", tmp_path / "many")
    assert folder.exit_code == 2
    text = said(folder)
    assert "sampling 1 prompt × 100,000,000 asks for 100,000,000 images, which would take about 381.5 GiB on disk" in text
    assert "(about 4.0 KiB per image as PNG)" in text  # an 8×8 PNG fills one 4 KiB block
    assert "only 10.0 GiB are free there" in text and "room for 5,000,000 more files" in text
    assert "at the first batch's" in text and "images/s" in text and text.count(".") >= 1
    assert folder.output.count("\n") == 1  # one sentence, one line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_time_limit_refuses_and_can_be_raised(monkeypatch, tmp_path):
    import wadi_distill.request_size as request_size

    monkeypatch.setattr(request_size, "free_space", lambda path: (2**40, None, 4096))
    slow = run("sample", *STUDENT, "--prompt", "3", "-n", "40", "--max-hours", "1e-9", "-o", tmp_path / "g.png")
    assert slow.exit_code == 2 and "but the time limit is 1e-09 h" in said(slow)
    assert not (tmp_path / "g.png").exists()
    fine = run("sample", *STUDENT, "--prompt", "3", "-n", "40", "--max-hours", "1", "-o", tmp_path / "g.png")
    assert fine.exit_code == 0, fine.output


def test_evaluate_generates_batch_by_batch_and_refuses_a_request_too_big_for_the_disk(spy, monkeypatch, tmp_path):
    import wadi_distill.request_size as request_size

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(11)))
    images = tmp_path / "gen"
    spy["folder"] = images
    result = run("evaluate", *STUDENT, "--prompts", prompts, "-o", tmp_path / "r.json", "--save-images", images,
                 "--batch-size", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert [c["size"] for c in spy["calls"]] == [4, 4, 3]
    assert [c["alive_before"] for c in spy["calls"]] == [0, 0, 0]
    assert [c["on_disk_before"] for c in spy["calls"]] == [0, 4, 8]
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["counts"]["images"] == 11 and record["generation"]["estimated_bytes"] == 11 * 4096

    monkeypatch.setattr(request_size, "free_space", lambda path: (20_000, None, 4096))
    refused = run("evaluate", *STUDENT, "--prompts", prompts, "-o", tmp_path / "s.json", "--save-images",
                  tmp_path / "gen2", "--device", "cpu")
    assert refused.exit_code == 2
    assert ("generating one image for each of the 11 prompts asks for 11 images, which would take about 44.0 KiB on "
            "disk") in said(refused)
    assert "only 19.5 KiB are free there" in said(refused)
    assert not (tmp_path / "gen2").exists() and not (tmp_path / "s.json").exists()


def test_chunked_precision_recall_equals_the_whole_matrix(monkeypatch):
    import wadi_distill.evaluate as evaluate

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(70, 5, generator=g, dtype=torch.float64), 1.3 * torch.randn(50, 5, generator=g, dtype=torch.float64)

    def whole(a, b, k):  # the definition, on the full distance matrices
        ra = torch.cdist(a, a).sort(dim=1).values[:, k]
        rb = torch.cdist(b, b).sort(dim=1).values[:, k]
        cross = torch.cdist(b, a)
        return float((cross <= ra[None]).any(1).double().mean()), float((cross.T <= rb[None]).any(1).double().mean())

    expected = whole(real, fake, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    monkeypatch.setattr(evaluate, "ROWS_PER_CHUNK", 7)
    assert evaluate.precision_recall(real, fake, k=3) == expected
