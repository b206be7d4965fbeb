"""Prompt files, the on-disk embedding cache, and the conditioning each backbone class receives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_pipelines import make_pipeline  # noqa: E402

from wadi_distill.teachers.pipeline import Conditioning, load_teacher  # noqa: E402
from wadi_distill.teachers.embedding_cache import EmbeddingCache, build_embedding_cache, cache_key  # noqa: E402
from wadi_distill.teachers.prompts import load_prompts  # noqa: E402
from wadi_probe.errors import WadiInputError  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")


def test_prompt_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(txt) == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a cat", "id": 1}\n"a dog"\n\n{"caption": "a tree"}\n')
    assert load_prompts(jsonl) == ["a cat", "a dog", "a tree"]
    csv = tmp_path / "p.csv"
    csv.write_text('id,text,extra\n1,"a cat, sitting",x\n2,a dog,y\n')
    assert load_prompts(csv) == ["a cat, sitting", "a dog"]
    assert load_prompts(csv, column="extra") == ["x", "y"]
    with pytest.raises(WadiInputError, match="no column 'nope'"):
        load_prompts(csv, column="nope")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(WadiInputError, match="empty|no prompts"):
        load_prompts(empty)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"caption": "ok"}\n{broken\n')
    with pytest.raises(WadiInputError, match="Line 2"):
        load_prompts(bad)
    with pytest.raises(WadiInputError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def test_cache_encodes_once_and_reads_rows(tmp_path):
    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> Conditioning:
        calls.append(list(prompts))
        values = torch.tensor([float(len(p)) for p in prompts])
        return Conditioning(values.view(-1, 1, 1).expand(-1, 3, 2).clone(),
                            attention_mask=torch.ones(len(prompts), 3, dtype=torch.long))

    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    key = cache_key(prompts, "teacher-x")
    cache = build_embedding_cache(tmp_path / "c", prompts, encode, key=key, batch_size=2, chunk_size=2)
    assert len(cache) == 5 and sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors", "index.json",
        "null.safetensors"]
    rows = cache.get([4, 0, 2])
    assert rows.encoder_hidden_states[:, 0, 0].tolist() == [5.0, 1.0, 3.0]
    assert rows.attention_mask.dtype == torch.long
    assert cache.null.encoder_hidden_states.abs().sum() == 0  # the null prompt "" has length 0
    n_calls = len(calls)
    again = build_embedding_cache(tmp_path / "c", prompts, encode, key=key)
    assert len(calls) == n_calls and again.key == key  # reused, nothing re-encoded
    assert cache_key(prompts, "teacher-y") != key and cache_key(prompts[:-1], "teacher-x") != key
    with pytest.raises(WadiInputError, match="not an embedding cache"):
        EmbeddingCache(tmp_path)


def test_conditioning_where_and_expand():
    cond = Conditioning(torch.ones(3, 2, 2), pooled=torch.ones(3, 4))
    null = Conditioning(torch.zeros(1, 2, 2), pooled=torch.zeros(1, 4))
    mixed = cond.where(torch.tensor([False, True, False]), null)
    assert mixed.encoder_hidden_states[:, 0, 0].tolist() == [1.0, 0.0, 1.0]
    assert mixed.pooled[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert null.expand(3).encoder_hidden_states.shape == (3, 2, 2)
    assert Conditioning.cat([cond, null]).pooled.shape == (4, 4)


def test_sdxl_zero_null_prompt_and_pixart_mask(tmp_path):
    sdxl = load_teacher(make_pipeline(tmp_path / "xl", "sdxl"))
    cond = sdxl.encode_prompts(["a cat", ""])
    assert cond.pooled is not None and cond.encoder_hidden_states.shape[-1] == 32  # 16 + 16 concatenated
    assert cond.encoder_hidden_states[1].abs().sum() == 0 and cond.pooled[1].abs().sum() == 0
    assert cond.encoder_hidden_states[0].abs().sum() > 0
    ids = sdxl.call.time_ids(2, "cpu", torch.float32)
    assert ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2

    pixart = load_teacher(make_pipeline(tmp_path / "px", "pixart"), load_vae=False)
    cond = pixart.encode_prompts(["a red house on the sky", ""])
    assert cond.attention_mask is not None and cond.attention_mask[0].sum() > cond.attention_mask[1].sum()
    x = torch.randn(2, 4, 8, 8)
    out = pixart.call(pixart.denoiser, x, torch.tensor([10, 900]), cond)
    assert out.shape == x.shape  # learned-variance channels dropped


def test_refuses_non_pipeline_folders(tmp_path):
    with pytest.raises(WadiInputError, match="no model_index.json"):
        load_teacher(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(WadiInputError, match="folder .* is missing"):
        load_teacher(tmp_path)


def test_encodings_equal_diffusers_encode_prompt(tmp_path):
    """The project's prompt encoding gives what diffusers' own pipelines give (their ``encode_prompt``)."""
    from diffusers import DiffusionPipeline

    prompts = ["a cat", "a red house on the tree"]
    for kind in ("sd", "sdxl", "pixart"):
        root = make_pipeline(tmp_path / kind, kind)
        extra = {"safety_checker": None} if kind == "sd" else {}
        pipe = DiffusionPipeline.from_pretrained(root, local_files_only=True, **extra)
        ours = load_teacher(root, load_vae=False).encode_prompts([*prompts, ""])
        with torch.no_grad():
            if kind == "sd":
                hidden, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
                assert torch.equal(hidden, ours.encoder_hidden_states[:2])
            elif kind == "sdxl":  # the negative (null) prompt is zeros: force_zeros_for_empty_prompt
                hidden, null, pooled, null_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                       do_classifier_free_guidance=True)
                assert torch.equal(hidden, ours.encoder_hidden_states[:2]) and torch.equal(pooled, ours.pooled[:2])
                assert torch.equal(null[:1], ours.encoder_hidden_states[2:])
                assert torch.equal(null_pooled[:1], ours.pooled[2:])
            else:
                hidden, mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                  max_sequence_length=120)[:2]
                torch.testing.assert_close(hidden, ours.encoder_hidden_states[:2], rtol=0, atol=1e-6)
                assert torch.equal(mask, ours.attention_mask[:2])


def test_waiting_ranks_take_the_cache_only_once_it_is_complete_with_their_key(tmp_path):
    """The ranks that do not encode poll for index.json with their key (no barrier, no timeout)."""
    import threading
    import time

    from wadi_distill.teachers.embedding_cache import wait_for_cache

    def encode(prompts):
        return Conditioning(torch.full((len(prompts), 2, 2), float(len(prompts))))

    folder = tmp_path / "cache"
    key = cache_key(["a", "b"], "t")
    build_embedding_cache(folder, ["x"], encode, key="another-run")  # a stale cache of other prompts
    found: list = []
    waiter = threading.Thread(target=lambda: found.append(wait_for_cache(folder, key, poll_seconds=0.02)))
    waiter.start()
    time.sleep(0.2)
    assert not found  # the other key is never taken
    import shutil

    shutil.rmtree(folder)
    build_embedding_cache(folder, ["a", "b"], encode, key=key)
    waiter.join(timeout=10)
    assert found and found[0].key == key and len(found[0]) == 2
