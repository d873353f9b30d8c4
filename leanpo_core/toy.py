"""Offline toy models and videos: tiny random-weight Video-LLMs of each supported family, and short real mp4 clips.

No model hub is reachable on this project's machines and no registry ships a small VLM, so every model test uses a
model built here: hidden 64, 2 attention heads (head_dim 32, vLLM's minimum), 2 layers, a 2-layer vision tower, a
byte-level BPE trained on a built-in corpus, the family's special tokens and chat template, and a processor sized so
a 16-frame clip costs a few dozen tokens. The folder loads with `AutoModelForImageTextToText`/`AutoProcessor` and
with vLLM, like a real checkpoint.

    python -m leanpo_core.toy --family qwen2_vl --out /tmp/toy-qwen2vl
    python -m leanpo_core.toy --family llava_onevision --out /tmp/toy-ov --seed 1 --clip /tmp/clip.mp4
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_next_video", "llava_onevision")
HIDDEN, HEADS, LAYERS, VOCAB_TARGET = 64, 2, 2, 1536
# "tiny": every family, the smallest model vLLM loads (tests, plumbing). "world" (Qwen families): the toy world's
# model (leanpo_core.toyworld), wider and deeper, with a pixel budget of 112x84 per frame so that each merged video
# token covers exactly one 24-px cell of the 96x72 synthetic clips (4x3 tokens per temporal patch).
SIZES = {"tiny": {"hidden": HIDDEN, "heads": HEADS, "layers": LAYERS, "pixels": (28 * 28, 56 * 56)},
         "world": {"hidden": 128, "heads": 4, "layers": 4, "pixels": (112 * 84, 112 * 84)}}

_SHAPES = "circle square triangle star ball box ring dot cube disc diamond heart cross arrow line".split()
_COLOURS = "red green blue yellow orange purple pink white black grey brown cyan magenta gold silver".split()
_MOTIONS = ("left right up down upward downward across around forward backward toward away clockwise "
            "anticlockwise diagonally slowly quickly steadily bounces moves slides rotates spins falls rises "
            "stops starts turns grows shrinks appears disappears stays still static moving").split()
# The tokenizer's shape, colour and motion words, public for the synthetic set (leanpo_core/synthetic.py).
SHAPE_WORDS, COLOUR_WORDS, MOTION_WORDS = _SHAPES, _COLOURS, _MOTIONS
_GENERAL = ("the a an is are was were it this that there what which who where when why how many much does do did "
            "video frame frames clip scene shape object objects colour color background foreground top bottom "
            "middle center corner edge side screen time second seconds first last next then after before during "
            "one two three four five six seven eight nine ten zero yes no not only also and or but because "
            "answer question hint hints please respond based given content reflect correct improve enrich "
            "previous reply response can be improved describe detail details happens happen see shown show "
            "in on at of to from with by for into onto over under between near far large small big tiny "
            "bright dark same different count number total each every all some none more less than "
            "i you we they he she my your our its their assistant user system helpful "
            "rate score agree agrees agreement with prior knowledge good bad true false correct wrong "
            "person people man woman child dog cat car bird tree house road room table chair door window water "
            "hand face head walk walks walking run runs running jump jumps jumping sit sits stand stands hold holds "
            "open opens close closes pick picks put puts throw throws catch catches play plays eat eats drink "
            "look looks watch watches talk talks say says think thinks know knows want wants like likes use uses "
            "make makes take takes give gives find finds come comes go goes get gets keep keeps leave leaves "
            "begin begins end ends change changes follow follows pass passes reach reaches hit hits touch touches "
            "camera shot view angle light shadow motion movement direction position speed distance path "
            "circular straight curved vertical horizontal round flat sharp soft smooth rough empty full "
            "inside outside above below behind front left-hand right-hand beginning ending while until "
            "again once twice always never often sometimes usually maybe probably clearly seems appear "
            "visible hidden partly completely mostly nearly almost exactly about around approximately "
            "sorry sure okay thanks hello well very quite rather really just still even already yet "
            "image picture moment event action activity sequence order step steps part parts piece pieces "
            "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty hundred "
            "first second third fourth fifth last final initial overall summary explain because therefore "
            "however although whereas instead rather since so such these those here now today then").split()
_TEMPLATES = (
    "the {c} {s} moves {m} across the video.",
    "what colour is the {s}? the {s} is {c}.",
    "how many {s}s are there? there are {n} {s}s in the video.",
    "does the {s} move {m}? {yn}, the {c} {s} {m}.",
    "question: which way does the {c} {s} go? answer: it goes {m}.",
    "describe the video. a {c} {s} on a {c2} background moves {m} for {n} seconds.",
    "please rate the answer from 1 to 10. score: {n}.",
)


def _corpus(seed: int = 0) -> list[str]:
    """A few thousand short synthetic-video-QA sentences plus every vocabulary word (fixed seed: same BPE merges)."""
    rng = random.Random(seed)
    lines = [" ".join(_SHAPES + _COLOURS + _MOTIONS + _GENERAL), " ".join(str(i) for i in range(101))]
    for _ in range(3000):
        t = rng.choice(_TEMPLATES)
        lines.append(t.format(s=rng.choice(_SHAPES), c=rng.choice(_COLOURS), c2=rng.choice(_COLOURS),
                              m=rng.choice(_MOTIONS), n=rng.randint(0, 20), yn=rng.choice(["yes", "no"])))
        lines.append(lines[-1].capitalize())
    return lines


# Chat templates mirror the public checkpoints' formats; real checkpoints ship their own and are used as they are.
_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}<video>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}<video>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ ' ' if message['role'] == 'user' else '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# (special tokens, tokenizer roles, chat template, bos prepended by the tokenizer as in the public checkpoint)
_TOKENIZERS = {
    "qwen": (_QWEN_SPECIALS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, _QWEN_TEMPLATE, False),
    "onevision": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                  {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, _ONEVISION_TEMPLATE, False),
    "vicuna": (["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"],
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
               _VICUNA_TEMPLATE, True),
}


def build_tokenizer(kind: str, seed: int = 0):
    """A byte-level BPE (vocab ~1.5k) trained on the built-in corpus, wrapped with `kind`'s specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, roles, template, add_bos = _TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer)
    if add_bos:  # LLaMA tokenizers prepend <s> to every encoded text; the chat prompt relies on it
        bos = roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **roles,
                                   additional_special_tokens=[s for s in specials if s not in roles.values()])
    return fast


def _qwen_parts(family: str, tok, size: str = "tiny"):
    """(model config, processor) of a toy Qwen2-VL or Qwen2.5-VL of `size` (SIZES)."""
    import transformers as tf

    dims = SIZES[size]
    hidden, heads, layers = dims["hidden"], dims["heads"], dims["layers"]

    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                # mrope splits head_dim/2 = 16 rotary frequencies over (time, height, width)
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=HIDDEN, hidden_size=hidden, num_heads=HEADS, mlp_ratio=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        proc_cls = tf.Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=HEADS,
                      out_hidden_size=hidden, fullatt_block_indexes=[1], tokens_per_second=2)
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        proc_cls = tf.Qwen2_5_VLProcessor
    # tiny: 28x28 px per merged token, a frame becomes at most 2x2 tokens; two frames share one temporal patch
    pixels = dict(min_pixels=dims["pixels"][0], max_pixels=dims["pixels"][1])
    processor = proc_cls(image_processor=tf.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                         video_processor=tf.Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=False),
                         chat_template=tok.chat_template)
    return config, processor


def _llava_next_video_parts(tok):
    """(model config, processor) of a tiny LLaVA-NeXT-Video: CLIP tower, LLaMA text model (as the public 7B)."""
    import transformers as tf

    patch, size = 4, 16  # vLLM's pooler divides by image_size // patch_size**2, so image_size >= patch**2
    vision = tf.CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, image_size=size, patch_size=patch, projection_dim=HIDDEN)
    text = tf.LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                          max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    # CLIP puts a CLS token before the patches: "default" drops it, which the video pooler's square grid needs
    config = tf.LlavaNextVideoConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                     vision_feature_select_strategy="default", vision_feature_layer=-1,
                                     image_token_index=tok.convert_tokens_to_ids("<image>"),
                                     video_token_index=tok.convert_tokens_to_ids("<video>"),
                                     image_seq_length=(size // patch) ** 2,
                                     video_seq_length=(size // patch // 2) ** 2)
    sizes = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = tf.LlavaNextVideoProcessor(
        video_processor=tf.LlavaNextVideoVideoProcessor(**sizes),
        image_processor=tf.LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pinpoints), tokenizer=tok,
        chat_template=tok.chat_template, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    return config, processor


def _llava_onevision_parts(tok):
    """(model config, processor) of a tiny LLaVA-OneVision: SigLIP tower (no CLS), Qwen2 text model."""
    import transformers as tf

    patch, size = 4, 16
    vision = tf.SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, image_size=size, patch_size=patch, vision_use_head=False)
    text = tf.Qwen2Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                          max_position_embeddings=4096, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pinpoints = [[size * i, size * j] for i in (1, 2) for j in (1, 2)]
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                     vision_feature_select_strategy="full", vision_feature_layer=-1,
                                     image_token_index=tok.convert_tokens_to_ids("<image>"),
                                     video_token_index=tok.convert_tokens_to_ids("<video>"))
    sizes = dict(size={"height": size, "width": size})
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(**sizes, image_grid_pinpoints=pinpoints), tokenizer=tok,
        video_processor=tf.LlavaOnevisionVideoProcessor(**sizes), chat_template=tok.chat_template,
        num_image_tokens=(size // patch) ** 2, vision_feature_select_strategy="full")
    return config, processor


_PARTS = {"qwen2_vl": lambda tok, size="tiny": _qwen_parts("qwen2_vl", tok, size),
          "qwen2_5_vl": lambda tok, size="tiny": _qwen_parts("qwen2_5_vl", tok, size),
          "llava_next_video": lambda tok, size="tiny": _llava_next_video_parts(tok),
          "llava_onevision": lambda tok, size="tiny": _llava_onevision_parts(tok)}
_TOKENIZER_KIND = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "llava_next_video": "vicuna",
                   "llava_onevision": "onevision"}


def _rename_llava_tower_keys(folder: Path) -> None:
    """Store the vision tower under `vision_tower.vision_model.*`, the layout of public LLaVA checkpoints.

    transformers 5 saves the CLIP/SigLIP tower as `vision_tower.embeddings.*`; vLLM 0.32's LLaVA loaders map names
    from the older layout only and fail on these keys. transformers reads both layouts, so the renamed folder still
    loads there.
    """
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.")
                and not k.startswith("vision_tower.vision_model.") else k): v for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def build_toy_model(family: str, out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Build, save and return `out_dir`: a toy random-weight model of `family` with its processor and tokenizer.

    Deterministic for a seed (same weights, same tokenizer, same files). `toy.json` records family, seed, size and
    the library versions that built it. Takes about a second. size "world" exists for the Qwen families only.
    """
    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES or (size != "tiny" and not family.startswith("qwen")):
        raise ValueError(f"size {size!r} is not built for {family} (tiny: every family; world: Qwen families)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(_TOKENIZER_KIND[family], seed=0)  # the vocabulary does not depend on the weight seed
    config, processor = _PARTS[family](tok, size)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family.startswith("llava"):
        _rename_llava_tower_keys(out)
    provenance = {"family": family, "seed": seed, "size": size, "builder": "leanpo_core.toy.build_toy_model",
                  "versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                               "tokenizers": tokenizers.__version__}}
    (out / "toy.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return out


def write_test_clip(path: str | Path, num_frames: int = 48, size: tuple[int, int] = (96, 128), fps: int = 12,
                    seed: int = 0) -> Path:
    """Write a short h264/yuv420p mp4 of one coloured square moving across a plain background; returns `path`.

    size is (height, width), both even (yuv420p). The seed picks the colours and the direction of motion.
    """
    import av

    height, width = size
    rng = np.random.default_rng(seed)
    background, colour = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    side = max(4, min(height, width) // 4)
    direction = rng.choice([-1, 1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}  # tiny files, fast, colours survive compression
        for i in range(num_frames):
            frame = np.empty((height, width, 3), dtype=np.uint8)
            frame[:] = background
            x = int((width - side) * (i / max(1, num_frames - 1)))
            x = x if direction > 0 else width - side - x
            y = (height - side) // 2
            frame[y:y + side, x:x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main(argv: list[str] | None = None) -> Path:
    """CLI: build one toy model folder (and optionally a test clip)."""
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=FAMILIES, help="model family to build")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model, processor, toy.json")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same files)")
    parser.add_argument("--clip", type=Path, default=None, help="also write a 48-frame test mp4 to this path")
    args = parser.parse_args(argv)
    out = build_toy_model(args.family, args.out, seed=args.seed)
    print(f"toy {args.family} model written to {out}")
    if args.clip is not None:
        print(f"test clip written to {write_test_clip(args.clip, seed=args.seed)}")
    return out


if __name__ == "__main__":
    main()
