"""`wadi-distill evaluate`: FID/KID/precision-recall/CLIP score with small local extractors, checked directly."""

import hashlib
import json
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _tiny_features import TinyFeatures, save_tiny_features
from _tiny_features import image_folder as _folder
from wadi_distill.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _protocol_tensor(folder):
    """The protocol written out directly: centred square crop, LANCZOS to 256, uint8 (N, 3, 256, 256)."""
    out = []
    for path in sorted(folder.iterdir()):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((256, 256), Image.LANCZOS)
        out.append(np.asarray(image))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _fid(a, b):
    from scipy import linalg

    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def _kid_full(x, y):
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ on the whole sets."""
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m = len(x)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def _pr(real, fake, k=3):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = (cross <= radii(real)[None]).any(1).mean()
    recall = (cross.T <= radii(fake)[None]).any(1).mean()
    return float(precision), float(recall)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    scripted = save_tiny_features(root / "features.pt")
    return {"root": root, "features": root / "features.pt", "real": _folder(root / "real", 12, 0),
            "fake": _folder(root / "fake", 12, 1, shift=0.3, size=(30, 44)), "module": scripted}


def test_fid_kid_precision_recall_match_a_direct_computation(data, tmp_path):
    out = tmp_path / "eval.json"
    result = run("evaluate", "--images", data["fake"], "--reference", data["real"], "--features", data["features"],
                 "-o", out, "--kid-subsets", 3)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    with torch.no_grad():
        real = data["module"](_protocol_tensor(data["real"])).double().numpy()
        fake = data["module"](_protocol_tensor(data["fake"])).double().numpy()
    metrics = record["metrics"]
    assert metrics["fid"] == pytest.approx(_fid(real, fake), rel=1e-6)
    assert metrics["kid"] == pytest.approx(_kid_full(real, fake), rel=1e-6, abs=1e-9)  # equal sizes: every subset is the whole set
    assert metrics["kid_std"] == pytest.approx(0.0, abs=1e-9) and metrics["kid_subset_size"] == 12
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(_pr(real, fake))
    assert record["counts"] == {"images": 12, "reference": 12}
    assert record["formats"] == {"images": {".png": 12}, "reference": {".png": 12}}
    assert record["extractor"]["sha256"] == hashlib.sha256(data["features"].read_bytes()).hexdigest()
    assert record["protocol"]["resize"] == 256 and record["protocol"]["filter"].startswith("LANCZOS")
    assert torch.__version__.startswith(record["versions"]["torch"]) and "torch-fidelity" in record["versions"]
    # the chance level: two halves of the reference
    order = np.random.default_rng(0).permutation(12)
    assert record["baseline"]["fid"] == pytest.approx(_fid(real[order[:6]], real[order[6:]]), rel=1e-6)
    text = " ".join(result.output.split())
    assert f"{metrics['fid']:.4g}" in text and "two random halves of the reference (6 images each)" in text
    assert "rank-deficient" not in text  # 12 images, 6 feature dimensions


def test_saved_reference_statistics_give_the_same_numbers(data, tmp_path):
    stats = tmp_path / "real.npz"
    made = run("evaluate", "--reference", data["real"], "--features", data["features"], "--save-reference-stats", stats)
    assert made.exit_code == 0 and "wrote statistics of 12 reference images" in made.output
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run("evaluate", "--images", data["fake"], "--reference", data["real"], "--features", data["features"], "-o", a).exit_code == 0
    result = run("evaluate", "--images", data["fake"], "--reference", stats, "--features", data["features"], "-o", b)
    assert result.exit_code == 0, result.output
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("fid", "kid", "precision", "recall"):
        assert rb["metrics"][key] == pytest.approx(ra["metrics"][key], rel=1e-9, abs=1e-12), key
    assert rb["baseline"]["fid"] == pytest.approx(ra["baseline"]["fid"])
    # a bare (μ, Σ) file, as other tools write: FID alone, and the unknown sample size said
    with np.load(stats) as full:
        np.savez(tmp_path / "bare.npz", mu=full["mu"], sigma=full["sigma"])
    bare = run("evaluate", "--images", data["fake"], "--reference", tmp_path / "bare.npz", "--features", data["features"],
               "-o", tmp_path / "bare.json")
    assert bare.exit_code == 0, bare.output
    rbare = json.loads((tmp_path / "bare.json").read_text())
    assert rbare["metrics"]["fid"] == pytest.approx(ra["metrics"]["fid"], rel=1e-9) and rbare["metrics"]["kid"] is None
    assert "FID only" in " ".join(bare.output.split())
    # statistics from another extractor file are refused
    torch.manual_seed(9)
    torch.jit.script(TinyFeatures().eval()).save(str(tmp_path / "other.pt"))
    refused = run("evaluate", "--images", data["fake"], "--reference", stats, "--features", tmp_path / "other.pt", "-o", tmp_path / "c.json")
    assert refused.exit_code == 2 and "another feature extractor file" in " ".join(refused.output.split())
    assert not (tmp_path / "c.json").exists()


def _random_inception_file(path):
    import sys

    from wadi_distill.evaluation.features import _fidelity_inception_class

    fe = sys.modules[_fidelity_inception_class().__module__]
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # batch-norm statistics from one random batch, so activations neither vanish (denormals are slow) nor explode
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    model.eval()
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.slow
def test_inception_from_a_local_file_matches_torch_fidelity_directly(data, tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    model = _random_inception_file(weights)
    real, fake = _folder(tmp_path / "r", 4, 3), _folder(tmp_path / "f", 4, 4, shift=0.5, suffix=".jpg")
    out = tmp_path / "e.json"
    result = run("evaluate", "--images", fake, "--reference", real, "--inception", weights, "--inception-resize", "tf1",
                 "-o", out, "--kid-subsets", 2)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    with torch.no_grad():
        r = model(_protocol_tensor(real))[0].double().numpy()
        f = model(_protocol_tensor(fake))[0].double().numpy()
    # FID directly in the 4-sample space: the nonzero eigenvalues of Σ_r Σ_f are those of (X_r X_fᵀ X_f X_rᵀ)/(n−1)²
    xr, xf = r - r.mean(0), f - f.mean(0)
    small = (xr @ xf.T) @ (xf @ xr.T) / (len(r) - 1) ** 2
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(small).real, 0, None)).sum()
    direct = ((r.mean(0) - f.mean(0)) ** 2).sum() + (xr ** 2).sum() / 3 + (xf ** 2).sum() / 3 - 2 * trace_sqrt
    assert record["metrics"]["fid"] == pytest.approx(direct, rel=1e-5)
    assert record["formats"]["images"] == {".jpg": 4} and record["extractor"]["dim"] == 2048
    assert record["extractor"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "rank-deficient" in " ".join(result.output.split())  # 4 images, 2048 dimensions: said so


def test_as_many_images_as_feature_dimensions_is_called_rank_deficient_with_the_counts(data, tmp_path):
    """6 images, 6 feature dimensions: the covariances have rank at most 5, and the note states the counts (it used
    to say "fewer images than feature dimensions (6)" of 6 images)."""
    real, fake = _folder(tmp_path / "r", 6, 0), _folder(tmp_path / "f", 6, 1, shift=0.3)
    result = run("evaluate", "--images", fake, "--reference", real, "--features", data["features"],
                 "-o", tmp_path / "e.json", "--kid-subsets", 2, "--k", 2)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "6 images for 6 feature dimensions: the covariances are rank-deficient (rank at most images − 1)" in text
    assert "fewer images" not in text


def test_clip_score_from_a_local_folder_matches_transformers(data, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from tiny_pipelines import WORDS, make_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, max_position_embeddings=16, pad_token_id=0,
                                                   bos_token_id=2, eos_token_id=3).to_dict(),
                        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
                        projection_dim=8)
    model = CLIPModel(config).eval()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    make_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    prompts = [f"a photo of a {WORDS[3 + i % 8]}" for i in range(12)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "clip.json"
    result = run("evaluate", "--images", data["fake"], "--reference", data["real"], "--features", data["features"],
                 "--clip", folder, "--prompts", tmp_path / "prompts.txt", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    from transformers import AutoImageProcessor, AutoTokenizer

    processor, tokenizer = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    pictures = [Image.fromarray(a) for a in _protocol_tensor(data["fake"]).permute(0, 2, 3, 1).numpy()]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=processor(images=pictures, return_tensors="pt")["pixel_values"])
        tok = tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double())
    assert record["metrics"]["clip_score"] == pytest.approx(float((100 * cos.clamp_min(0)).mean()), rel=1e-5)
    mismatched = torch.nn.functional.cosine_similarity(img.double(), txt.double().roll(1, 0))
    assert record["baseline"]["clip_score_mismatched"] == pytest.approx(float((100 * mismatched.clamp_min(0)).mean()), rel=1e-5)
    assert set(record["clip"]["files"]) == {"model.safetensors"}


def test_a_student_generated_from_a_prompt_file_is_scored_from_its_pngs(data, tmp_path):
    from tiny_pipelines import make_pipeline, random_lorad_adapter

    pipe = make_pipeline(tmp_path / "pipe", "sd")
    from diffusers import UNet2DConditionModel

    adapter = random_lorad_adapter(UNet2DConditionModel.from_pretrained(pipe / "unet"), tmp_path / "adapter")
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n\na green tree\na big house\n")
    out = tmp_path / "student.json"
    result = run("evaluate", "--teacher", pipe, "--adapter", adapter, "--prompts", tmp_path / "prompts.txt",
                 "--reference", data["real"], "--features", data["features"], "-o", out, "--batch-size", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    generated = sorted((tmp_path / "student-images").iterdir())
    assert [p.name for p in generated] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert record["generation"]["images"] == 4 and record["generation"]["seeds"] == [0, 3]
    assert record["generation"]["prompts"]["sha256"] == hashlib.sha256((tmp_path / "prompts.txt").read_bytes()).hexdigest()
    with torch.no_grad():
        real = data["module"](_protocol_tensor(data["real"])).double().numpy()
        fake = data["module"](_protocol_tensor(tmp_path / "student-images")).double().numpy()
    assert record["metrics"]["fid"] == pytest.approx(_fid(real, fake), rel=1e-5)
    small = _folder(tmp_path / "small", 3, 5)
    refused = run("evaluate", "--teacher", pipe, "--adapter", adapter, "--prompts", tmp_path / "prompts.txt",
                  "--reference", small, "--features", data["features"], "-o", tmp_path / "x.json", "--save-images", tmp_path / "gen")
    assert refused.exit_code == 2 and "fewer than the 4 to generate" in " ".join(refused.output.split())
    assert not (tmp_path / "gen").exists() and not (tmp_path / "x.json").exists()
    again = run("evaluate", "--teacher", pipe, "--adapter", adapter, "--prompts", tmp_path / "prompts.txt",
                "--reference", data["real"], "--features", data["features"], "-o", out)
    assert again.exit_code == 2 and "already holds images" in " ".join(again.output.split())


def test_builtin_digits_uses_the_shipped_classifier_and_the_demo_metrics(tmp_path):
    from wadi_distill.builtin.digits.data import load_split
    from wadi_distill.evaluate import evaluate_images

    test = load_split("test")
    folder = tmp_path / "digits"
    folder.mkdir()
    quantized = ((test.images + 1) / 2 * 255).round().to(torch.uint8)
    for i, picture in enumerate(quantized[:, 0].numpy()):
        Image.fromarray(picture).save(folder / f"{i:04d}.png")
    prompts = [f"a handwritten digit {int(k)}" for k in test.labels]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    out = tmp_path / "d.json"
    result = run("evaluate", "--images", folder, "--reference", "builtin:digits", "--prompts", tmp_path / "p.txt", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    direct = evaluate_images(quantized.float() / 255 * 2 - 1, test.labels, load_split("reference"))
    for key in ("fd_pixel", "fd_features", "precision", "recall", "class_accuracy"):
        assert record["metrics"][key] == pytest.approx(direct[key], rel=1e-9), key
    assert record["extractor"]["name"] == "builtin digit classifier" and "held-out real digits" in " ".join(result.output.split())


def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(data, tmp_path):
    out = tmp_path / "bad.json"
    small = _folder(tmp_path / "small", 5, 7)
    (tmp_path / "nop.txt").write_text("a cat\n" * 12)
    cases = [
        (["--images", data["fake"], "--reference", data["real"]], "weights-inception-2015-12-05-6726825d.pth"),
        (["--images", data["fake"], "--reference", data["real"], "--inception", tmp_path / "none.pth"],
         "weights-inception-2015-12-05-6726825d.pth"),
        (["--images", data["fake"], "--reference", small, "--features", data["features"]], "has 5 images, fewer than the 12"),
        (["--images", data["fake"], "--reference", tmp_path / "nowhere", "--features", data["features"]], "does not exist"),
        (["--images", data["fake"], "--reference", data["real"], "--features", data["features"], "--clip", tmp_path / "noclip",
          "--prompts", tmp_path / "nop.txt"], "local CLIP model folder"),
        (["--images", data["fake"], "--reference", data["real"], "--features", tmp_path / "missing.pt"], "does not exist"),
        (["--images", data["fake"]], "give --reference"),
    ]
    for args, message in cases:
        result = run("evaluate", *args, "-o", out)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output, (message, result.output)
        assert not out.exists()
