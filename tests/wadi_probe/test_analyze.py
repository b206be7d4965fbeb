"""compare() on tiny UNets with planted changes: exact answers per layer, streaming, filters, devices, naming."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import save_file

from _planted_pairs import expected_norm_change, planted_unet_pair, row_angles_deg
from conftest import make_tiny_unet
from wadi_probe import Report, compare
from wadi_probe.analyze import checkpoint_from_state_dict, resolve_device
from wadi_probe.errors import WadiInputError
from wadi_probe.layers import block_of, kind_of, layer_type_of, module_of


@pytest.fixture(scope="module")
def planted():
    unet = make_tiny_unet(seed=3, block_out_channels=(8, 16), cross_attention_dim=16)
    return planted_unet_pair(unet.state_dict(), rank=2, seed=4)


@pytest.fixture(scope="module")
def planted_files(planted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    teacher, student = folder / "teacher.safetensors", folder / "student.safetensors"
    save_file(planted.teacher, str(teacher))
    save_file(planted.student, str(student))
    return teacher, student


@pytest.fixture(scope="module")
def report(planted_files) -> Report:
    return compare(*planted_files, device="cpu")


def test_every_tensor_is_reported_in_model_order(planted, report):
    from wadi_probe.io.checkpoints import model_order_key

    assert [r["name"] for r in report.layers] == sorted(planted.teacher, key=model_order_key)
    assert [r["order"] for r in report.layers] == list(range(len(planted.teacher)))
    assert report.pairing["matched"] == len(planted.teacher) and report.summary["unmatched"] == 0
    assert report.inputs["teacher"]["layout"] == "safetensors"


def test_rescaled_layers_have_the_planted_norm_change_and_no_direction_change(planted, report):
    assert len(planted.scaled) >= 5
    for name, scale in planted.scaled.items():
        record = report.layer(name)
        mean, std = expected_norm_change(scale)
        assert record["norm_change_mean"] == pytest.approx(mean, abs=2e-6), name
        assert record["norm_change_std"] == pytest.approx(std, abs=2e-6), name
        assert record["direction_change_max"] < 1e-12, name
        assert record["identical"] is False
        if len(record["shape"]) >= 2:
            assert record["recommended_rank"] == 0 and record["lorad_rank_99"] == 0


def test_rotated_layers_have_the_planted_rank_and_angles(planted, report):
    assert len(planted.rotated) >= 5
    for name, rank in planted.rotated.items():
        record = report.layer(name)
        assert record["norm_change_max"] < 1e-5, name
        assert record["lorad_rank_99"] == rank, name
        assert record["lorad_explained"] == pytest.approx(1.0, abs=1e-4), name
        angles = row_angles_deg(planted.teacher[name], planted.student[name])
        assert record["angle_deg_mean"] == pytest.approx(float(angles.mean()), abs=1e-3), name
        assert record["angle_deg_max"] == pytest.approx(float(angles.max()), abs=1e-3), name
        assert 1 <= record["recommended_rank"] <= rank


def test_untouched_layers_are_identical_with_exact_zeros(planted, report):
    for name in planted.untouched:
        record = report.layer(name)
        assert record["identical"] is True, name
        assert record["norm_change_mean"] == 0.0 and record["direction_change_mean"] == 0.0
    assert report.summary["identical"] == len(planted.untouched)


def test_summary_counts_and_groups(planted, report):
    summary = report.summary
    matrices = [n for n, t in planted.teacher.items() if t.ndim >= 2]
    assert summary["layers"] == len(planted.teacher) and summary["matrices"] == len(matrices)
    assert summary["skipped"] == 0
    assert sum(g["matrices"] for g in summary["groups"]) == len(matrices)
    blocks = [g["block"] for g in summary["groups"]]
    assert blocks.index("down.0") < blocks.index("mid") < blocks.index("up.1")


def test_in_memory_state_dicts_give_the_same_numbers_as_files(planted, report):
    memory = compare(planted.teacher, planted.student, device="cpu")
    assert memory.inputs["teacher"]["layout"] == "memory"
    for a, b in zip(memory.layers, report.layers):
        assert a == b


def test_modules_and_prefixed_state_dicts_are_accepted(planted):
    prefixed = {f"unet.{k}": v for k, v in planted.student.items()}
    result = compare(planted.teacher, prefixed, device="cpu", spectra=False)
    assert result.pairing["matched"] == len(planted.teacher)


def test_include_and_exclude_select_tensors(planted):
    only_attention = compare(planted.teacher, planted.student, include=r"attn", exclude=r"\.bias$", spectra=False)
    names = [r["name"] for r in only_attention.layers]
    assert names and all("attn" in n and not n.endswith(".bias") for n in names)
    assert only_attention.settings["include"] == "attn" and only_attention.settings["spectra"] is False


def test_different_architectures_are_refused(planted):
    other = make_tiny_unet(seed=0, block_out_channels=(12, 24), norm_num_groups=4).state_dict()
    with pytest.raises(WadiInputError, match="different architectures"):
        compare(planted.teacher, other)


def test_shape_mismatches_and_missing_tensors_are_reported(planted):
    student = dict(planted.student)
    name = next(n for n, t in student.items() if t.ndim == 2)
    student[name] = torch.zeros(3, 3)
    dropped = next(n for n in student if n.endswith(".bias"))
    del student[dropped]
    student["extra.weight"] = torch.ones(2, 2)
    result = compare(planted.teacher, student, spectra=False)
    pairing = result.pairing
    assert [row[0] for row in pairing["shape_mismatch"]] == [name]
    assert pairing["only_in_teacher"] == [dropped] and pairing["only_in_student"] == ["extra.weight"]
    assert result.summary["unmatched"] == 3 and result.summary["layers"] == len(planted.teacher) - 2


class _TrackingSource:
    """A state dict whose tensors report how many of them are alive when the next one is read."""

    def __init__(self, tensors, tracker, label):
        self._tensors, self._tracker, self.path = tensors, tracker, label

    def keys(self):
        return list(self._tensors)

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def tensor(self, key):
        self._tracker["max_alive"] = max(self._tracker["max_alive"], self._tracker["alive"])
        self._tracker["reads"].append(key)
        tensor = self._tensors[key].clone()
        self._tracker["alive"] += 1
        weakref.finalize(tensor, lambda: self._tracker.__setitem__("alive", self._tracker["alive"] - 1))
        return tensor

    def close(self):
        pass


def test_tensors_are_streamed_one_pair_at_a_time(planted):
    from pathlib import Path

    from wadi_probe.io.checkpoints import Checkpoint

    tracker = {"alive": 0, "max_alive": 0, "reads": []}
    sources = [_TrackingSource(d, tracker, Path(label)) for d, label in ((planted.teacher, "t"), (planted.student, "s"))]
    teacher, student = (Checkpoint(src.path, "memory", {k: (src, k) for k in src.keys()}) for src in sources)
    compare(teacher, student, device="cpu")
    # each tensor read once; when any tensor is read, at most the other half of its pair is still alive
    assert len(tracker["reads"]) == 2 * len(planted.teacher)
    assert tracker["max_alive"] <= 1 and tracker["alive"] == 0


def test_progress_bar_and_on_layer_callback(planted, capsys):
    seen = []
    compare(planted.teacher, planted.student, spectra=False, progress=True, on_layer=lambda r: seen.append(r["name"]))
    assert sorted(seen) == sorted(planted.teacher)
    assert "probing" in capsys.readouterr().err


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(WadiInputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(WadiInputError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_report_matches_cpu(planted, report):
    gpu = compare(planted.teacher, planted.student, device="cuda")
    for a, b in zip(gpu.layers, report.layers):
        for key in ("norm_change_mean", "direction_change_mean", "lorad_rank_99", "recommended_rank", "identical"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["name"], key)


def test_checkpoint_from_state_dict_strips_prefixes():
    ckpt = checkpoint_from_state_dict({"module.unet.conv_in.weight": torch.ones(2, 2)})
    assert ckpt.names() == ["conv_in.weight"] and ckpt.layout == "memory"


@pytest.mark.parametrize(
    "name,shape,module,block,layer_type,kind",
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", (640, 640),
         "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down.1", "attention", "linear"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", (5120, 640),
         "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "down.1", "feed-forward", "linear"),
        ("down_blocks.1.attentions.0.proj_in.weight", (640, 640, 1, 1),
         "down_blocks.1.attentions.0.proj_in", "down.1", "attention", "conv1x1"),
        ("mid_block.resnets.1.conv2.weight", (1280, 1280, 3, 3), "mid_block.resnets.1.conv2", "mid", "resnet conv", "conv"),
        ("up_blocks.2.resnets.0.conv_shortcut.weight", (640, 1920, 1, 1),
         "up_blocks.2.resnets.0.conv_shortcut", "up.2", "resnet conv", "conv1x1"),
        ("up_blocks.2.resnets.0.norm1.weight", (1920,), "up_blocks.2.resnets.0.norm1", "up.2", "other", "norm"),
        ("up_blocks.2.resnets.0.time_emb_proj.bias", (640,), "up_blocks.2.resnets.0.time_emb_proj", "up.2", "other", "bias"),
        ("up_blocks.0.upsamplers.0.conv.weight", (1280, 1280, 3, 3), "up_blocks.0.upsamplers.0.conv", "up.0", "other", "conv"),
        ("time_embedding.linear_1.weight", (1280, 320), "time_embedding.linear_1", "embedding", "other", "linear"),
        ("class_embedding.weight", (10, 32), "class_embedding", "embedding", "other", "embedding"),
        ("conv_in.weight", (320, 4, 3, 3), "conv_in", "other", "other", "conv"),
        ("transformer_blocks.5.attn2.to_k.weight", (1152, 4096), "transformer_blocks.5.attn2.to_k",
         "transformer.5", "attention", "linear"),
        ("transformer_blocks.5.ff.net.2.weight", (1152, 4608), "transformer_blocks.5.ff.net.2",
         "transformer.5", "feed-forward", "linear"),
        ("transformer_blocks.5.scale_shift_table", (6, 1152), "transformer_blocks.5.scale_shift_table",
         "transformer.5", "other", "other"),
        ("adaln_single.emb.timestep_embedder.linear_1.weight", (1152, 256),
         "adaln_single.emb.timestep_embedder.linear_1", "embedding", "other", "linear"),
    ],
)
def test_layer_naming(name, shape, module, block, layer_type, kind):
    assert module_of(name) == module
    assert block_of(name) == block
    assert layer_type_of(name, shape) == layer_type
    assert kind_of(name, shape) == kind


def test_thread_setting_is_restored(planted):
    before = torch.get_num_threads()
    compare(planted.teacher, planted.student, device="cpu", spectra=False)
    assert torch.get_num_threads() == before


def test_explained_at_rank_is_opt_in(planted, report):
    name = next(iter(planted.rotated))
    assert report.layer(name)["lorad_explained_at_recommended_rank"] is None
    subset = compare(planted.teacher, planted.student, include=name.replace(".", r"\."), explained_at_rank=True)
    record = subset.layer(name)
    assert 0 < record["lorad_explained_at_recommended_rank"] <= record["lorad_explained"] + 1e-9
    assert subset.settings["truncated_explained"] is True


def test_lorad_adapter_student_shows_its_rank(tmp_path):
    teacher = {k: v.contiguous() for k, v in make_tiny_unet(seed=0).state_dict().items()}
    save_file(teacher, str(tmp_path / "teacher.safetensors"))
    name = next(k for k in teacher if k.endswith("attn1.to_q.weight"))
    out, fan_in = teacher[name].shape
    gen = torch.Generator().manual_seed(0)
    theta_a, theta_b = 0.3 * torch.randn(out, 2, generator=gen), torch.randn(2, fan_in // 2, generator=gen)
    module = name.removesuffix(".weight")
    save_file({f"{module}.theta_a": theta_a, f"{module}.theta_b": theta_b}, str(tmp_path / "adapter.safetensors"))
    result = compare(tmp_path / "teacher.safetensors", tmp_path / "adapter.safetensors", student_is_adapter=True)
    record = result.layer(name)
    assert result.inputs["student"]["layout"] == "adapter"
    assert record["lorad_rank_99"] == 2 and record["lorad_explained"] == pytest.approx(1.0, abs=1e-6)
    assert record["norm_change_max"] < 1e-5
    assert result.summary["identical"] == result.summary["layers"] - 1
