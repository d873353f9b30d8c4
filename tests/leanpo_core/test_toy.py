"""Toy models and test clips: sizes vLLM accepts, determinism, tokenizer, CLI, and a real decodable mp4."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leanpo_core import toy

REPO = Path(__file__).resolve().parents[2]
_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
          "chat_template.jinja", "toy.json")


@pytest.fixture(scope="module")
def built(toy_dirs):
    return toy_dirs


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_build_is_deterministic_per_seed(family, built, tmp_path):
    again = toy.build_toy_model(family, tmp_path / "again", seed=0)
    other = toy.build_toy_model(family, tmp_path / "other", seed=1)
    for name in _FILES:
        assert (built[family] / name).read_bytes() == (again / name).read_bytes(), name
    assert (built[family] / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (built[family] / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_sizes_fit_vllm(family, built):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(built[family])
    text, vision = config.get_text_config(), config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers) == (64, 2, 2)
    assert text.hidden_size // text.num_attention_heads >= 32  # vLLM's attention kernels need head_dim >= 32
    assert getattr(vision, "depth", getattr(vision, "num_hidden_layers", None)) == 2
    if family.startswith("qwen"):
        assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    else:
        assert vision.image_size >= vision.patch_size**2  # vLLM's LLaVA-NeXT-Video pooler divides by their ratio
    provenance = json.loads((built[family] / "toy.json").read_text())
    assert provenance["family"] == family and provenance["seed"] == 0
    assert set(provenance["versions"]) == {"transformers", "torch", "tokenizers"}


def test_llava_towers_are_stored_in_the_layout_vllm_reads(built):
    from safetensors import safe_open

    for family in ("llava_next_video", "llava_onevision"):
        with safe_open(built[family] / "model.safetensors", "pt") as f:
            tower = [k for k in f.keys() if k.startswith("vision_tower.")]
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_tokenizer_has_specials_template_and_a_small_vocabulary(family, built):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(built[family])
    tok = processor.tokenizer
    assert 1000 <= len(tok) <= 2000
    assert tok.chat_template and processor.chat_template
    for special in [processor.video_token, tok.eos_token, tok.pad_token]:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    text = " the red circle moves left across the video. yes, 3 squares."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) <= 16  # the corpus words are single tokens, not bytes
    assert (tok.bos_token == "<s>") == (family == "llava_next_video")
    if family == "llava_next_video":  # LLaMA-style: the tokenizer itself prepends <s>
        assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_write_test_clip_is_a_real_h264_video(tmp_path):
    import av
    import decord

    path = toy.write_test_clip(tmp_path / "clip.mp4", num_frames=48, size=(96, 128), fps=12, seed=3)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.height, stream.codec_context.width) == (96, 128)
    reader = decord.VideoReader(str(path))
    assert len(reader) == 48 and reader.get_avg_fps() == pytest.approx(12)
    frames = reader.get_batch(list(range(48))).asnumpy()
    assert frames.shape == (48, 96, 128, 3)
    # the square's column centre moves steadily one way: a real motion signal survives compression
    background = np.median(frames[0].reshape(-1, 3), axis=0)
    centres = [np.nonzero((np.abs(f.astype(int) - background).sum(-1) > 60).any(0))[0].mean() for f in frames]
    steps = np.diff(centres)
    assert abs(centres[-1] - centres[0]) > 64 and (np.all(steps > 0) or np.all(steps < 0))
    again = decord.VideoReader(str(toy.write_test_clip(tmp_path / "again.mp4", seed=3)))
    assert np.array_equal(again.get_batch(list(range(48))).asnumpy(), frames)


def test_cli_builds_a_model_and_clip(tmp_path):
    out = toy.main(["--family", "llava_onevision", "--out", str(tmp_path / "ov"), "--seed", "2",
                    "--clip", str(tmp_path / "c.mp4")])
    assert json.loads((out / "toy.json").read_text())["seed"] == 2
    assert (tmp_path / "c.mp4").stat().st_size > 0
    help_text = subprocess.run([sys.executable, "-m", "leanpo_core.toy", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout
    assert "python -m leanpo_core.toy --family qwen2_vl --out" in help_text and "--seed" in help_text


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        toy.build_toy_model("llama", tmp_path)
