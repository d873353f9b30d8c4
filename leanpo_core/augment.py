"""The lean augmented view A(V) of the losing side (docs/method.md section 5.3).

One random augmentation is drawn once per (video, candidate, seed) and applied identically to every frame:
RandomResizedCrop (area scale `aug_crop_scale_min..max`, aspect 3/4..4/3, resized back to the frame size),
ColorJitter(0.4, 0.4, 0.2, 0.1) with probability `aug_color_jitter_p` (the four adjustments in a random order),
grayscale with probability `aug_grayscale_p`, Gaussian blur with sigma in `aug_blur_sigma_min..max`, and a horizontal
flip with probability `aug_hflip_p`, in that order; the clip is first subsampled uniformly to `lose_frames` frames.

The parameters are drawn explicitly from a numpy generator and applied with torchvision's v2 functional ops on the
whole (T, C, H, W) clip, so the same seed gives the same pixels, the drawn values are recorded (the samples table's
`augmentation` column) and a recorded view can be re-applied with `apply_params`. Every value is drawn on every
call, applied or not, so one probability never shifts the others' random stream.

    view = lean_view(frames, frame_indices, SampleConfig(model="m"), seed=7)
    view.frames.shape, view.frame_indices, view.params["crop"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from leanpo_core.config import SampleConfig
from leanpo_core.decode import uniform_indices

JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}  # ColorJitter(0.4, 0.4, 0.2, 0.1)
ASPECT = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


@dataclass(frozen=True)
class LeanView:
    frames: np.ndarray          # (lose_frames, H, W, 3) uint8, augmented
    positions: list[int]        # which input frames were kept (0-based positions in the input clip)
    frame_indices: list[int]    # the kept frames' indices in the source video
    params: dict[str, Any]      # the drawn augmentation, JSON-able


def _crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float]) -> dict[str, int]:
    """torchvision RandomResizedCrop.get_params: up to 10 draws of (area, aspect), else a centre crop."""
    area = height * width
    log_ratio = (math.log(ASPECT[0]), math.log(ASPECT[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return {"top": int(rng.integers(0, height - h + 1)), "left": int(rng.integers(0, width - w + 1)),
                    "height": int(h), "width": int(w)}
    ratio = width / height
    if ratio < ASPECT[0]:
        w, h = width, round(width / ASPECT[0])
    elif ratio > ASPECT[1]:
        h, w = height, round(height * ASPECT[1])
    else:
        w, h = width, height
    return {"top": (height - h) // 2, "left": (width - w) // 2, "height": int(h), "width": int(w)}


def draw_params(height: int, width: int, config: SampleConfig, seed: int) -> dict[str, Any]:
    """Draw one augmentation for frames of height x width from `seed` (a fixed sequence of draws)."""
    rng = np.random.default_rng(seed)
    crop = _crop_box(rng, height, width, (config.aug_crop_scale_min, config.aug_crop_scale_max))
    jitter_on = bool(rng.uniform() < config.aug_color_jitter_p)
    factors = {name: float(rng.uniform(1 - s, 1 + s)) if name != "hue" else float(rng.uniform(-s, s))
               for name, s in JITTER.items()}
    order = [list(JITTER)[i] for i in rng.permutation(len(JITTER))]
    gray = bool(rng.uniform() < config.aug_grayscale_p)
    sigma = float(rng.uniform(config.aug_blur_sigma_min, config.aug_blur_sigma_max))
    flip = bool(rng.uniform() < config.aug_hflip_p)
    # The kernel covers +-3 sigma (torchvision's GaussianBlur takes a fixed size; the paper gives none), kept
    # below twice the shorter side so reflect padding stays valid on tiny frames.
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(height, width) - 1) // 2) + 1)
    return {"seed": int(seed), "size": [int(height), int(width)], "crop": crop,
            "color_jitter": {"applied": jitter_on, **factors, "order": order}, "grayscale": gray,
            "blur": {"sigma": sigma, "kernel_size": int(kernel)}, "hflip": flip}


def apply_params(frames: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Apply drawn `params` to every frame of (T, H, W, 3) uint8 `frames`; returns the same shape and dtype."""
    import torch
    from torchvision.transforms.v2 import functional as F

    height, width = frames.shape[1:3]
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W): one op for all frames
    box = params["crop"]
    clip = F.resized_crop(clip, box["top"], box["left"], box["height"], box["width"], [height, width],
                          antialias=True)
    jitter = params["color_jitter"]
    if jitter["applied"]:
        ops = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
               "saturation": F.adjust_saturation, "hue": F.adjust_hue}
        for name in jitter["order"]:
            clip = ops[name](clip, jitter[name])
    if params["grayscale"]:
        clip = F.rgb_to_grayscale(clip, num_output_channels=3)
    blur = params["blur"]
    if blur["kernel_size"] > 1:
        clip = F.gaussian_blur(clip, [blur["kernel_size"]] * 2, [blur["sigma"]] * 2)
    if params["hflip"]:
        clip = F.horizontal_flip(clip)
    return clip.permute(0, 2, 3, 1).contiguous().numpy()


def lean_view(frames: np.ndarray, frame_indices: Sequence[int], config: SampleConfig, seed: int) -> LeanView:
    """Subsample `frames` (T, H, W, 3) uniformly to `config.lose_frames` and apply one drawn augmentation to all."""
    if len(frame_indices) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(frame_indices)} frame indices")
    positions = uniform_indices(len(frames), config.lose_frames)
    kept = frames[positions]
    params = draw_params(kept.shape[1], kept.shape[2], config, seed)
    return LeanView(apply_params(kept, params), positions, [int(frame_indices[p]) for p in positions], params)
