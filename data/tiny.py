"""
Tiny VLMs built from configs (Qwen2.5-VL, Qwen3-VL, the Qwen2.5-Omni thinker, a LLaVA-style embedding VLM, a
VILA-style one behind remote code), with a byte-level BPE tokenizer trained at run time and the real
transformers processor: the models every test and the CPU demo run on (no hub, nothing downloaded).

    python data/tiny.py --out=runs/tiny-qwen2_5_vl --family=qwen2_5_vl   # writes a from_pretrained folder
    (families: qwen2_5_vl | qwen3_vl | qwen2_5_omni_thinker | llava | vila)

The folder loads with `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`, so
tests go through exactly the code path a real checkpoint takes; the vila folder is laid out as LongVILA-R1's
(config.json + llm/ + vision_tower/ + mm_projector/ + modeling_vila.py, our stand-in data/vila_standin.py) and
loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`. Traps handled here (notes/transformers-qwen.md):
sum(mrope_section) == head_dim / 2; vision out_hidden_size == text hidden size; bos/eos/pad ids overridden for
the tiny vocab; the processor's pixel budget large enough that frames already sized by data/video.py are kept.
"""
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # run as a script: import from the repo root, not from data/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForImageTextToText, CLIPImageProcessor, LlavaConfig, LlavaProcessor,
                          Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig,
                          Qwen2_5OmniThinkerForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor, SiglipImageProcessor, SiglipVisionConfig,
                          SiglipVisionModel, WhisperFeatureExtractor)

from configurator import parse_config

# Qwen's special tokens, at fixed small ids (the order of Qwen2.5-VL's tokenizer, shifted to 0).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                  "<|vision_pad|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"]
# Not special (they appear in decoded text), but single tokens so the answer format is short to learn.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2.5-VL's chat template, reduced to what we use: system, user turns with text/video/image parts, assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Omni thinker's chat template puts a video between <|vision_bos|> and <|vision_eos|> as one <|VIDEO|>
# (vlm.py expands it into interleaved video and audio chunks); the LLaVA-style model uses one <|image_pad|>
# (vlm.py expands it into the frames' tokens).
OMNI_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|video_pad|><|vision_end|>",
                                           "<|vision_bos|><|VIDEO|><|vision_eos|>")
LLAVA_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|video_pad|><|vision_end|>",
                                            "<|vision_start|><|image_pad|><|vision_end|>")

# Text the BPE is trained on: our prompts, so that whole words become single tokens and prompts stay short.
CORPUS = [
    "You are a helpful assistant. The user asks a question, and then you solves it.",
    "Please first think deeply about the question based on the given video, and then provide the final answer.",
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.",
    "Question: What colour was the flash? Options: A. red B. green C. blue D. yellow",
    "Answer with the option's letter from the given choices directly. Answer with a number.",
    "What is the main purpose of the video? How many times does the object appear? Describe the scene.",
    "the a an of to in is was and or what which when where who how many colour color shape count seconds",
    "0 1 2 3 4 5 6 7 8 9 10 100 A B C D E F yes no red green blue yellow white black square circle",
]


def train_tokenizer(vocab_size: int = 400, family: str = "qwen2_5_vl"):
    """Byte-level BPE trained on CORPUS, wrapped as transformers' Qwen2Tokenizer with Qwen's special tokens."""

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS * 20, trainer=trainer)
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
             "vision_end_token": "<|vision_end|>"}
    if family.startswith("qwen2_5_omni"):  # the names Qwen2_5OmniProcessor reads from its tokenizer
        named.update(video_token="<|VIDEO|>", audio_token="<|AUDIO|>", audio_bos_token="<|audio_bos|>",
                     audio_eos_token="<|audio_eos|>", vision_bos_token="<|vision_bos|>",
                     vision_eos_token="<|vision_eos|>")
    template = {"qwen2_5_omni_thinker": OMNI_CHAT_TEMPLATE, "llava": LLAVA_CHAT_TEMPLATE}.get(family, CHAT_TEMPLATE)
    tok = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None, chat_template=template, extra_special_tokens=named)
    tok.add_tokens(TAG_TOKENS)
    if family == "vila":  # VILA's media tokens, saved in llm/ with the tokenizer as its checkpoints have them
        tok.add_tokens(["<image>", "<vila/video>"], special_tokens=True)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok


@dataclass
class TinySize:
    hidden: int = 64            # text hidden size; also the vision tower's output size (out_hidden_size)
    layers: int = 2             # decoder layers
    heads: int = 4              # query heads (head_dim = hidden / heads)
    kv_heads: int = 2           # key/value heads (GQA)
    ffn: int = 256              # text MLP width
    vision_hidden: int = 64     # vision tower width
    vision_depth: int = 2       # vision blocks
    vision_heads: int = 4       # vision attention heads


def text_kwargs(tok, size: TinySize) -> dict:
    """The decoder's config (Qwen2-style) for the ids of `tok`."""
    return dict(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.ffn,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                max_position_embeddings=32768, tie_word_embeddings=False)


def model_config(family: str, tok, size: TinySize = TinySize()):
    """A transformers config for a tiny model of the given family, with the token ids of `tok`."""

    head_dim = size.hidden // size.heads
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = text_kwargs(tok, size)
    if family == "qwen2_5_vl":
        t, hw = head_dim // 2 // 4, None   # mrope_section must sum to head_dim / 2: split as (t, h, w)
        hw = (head_dim // 2 - t) // 2
        section = [head_dim // 2 - 2 * hw, hw, hw]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
        vision = dict(depth=size.vision_depth, hidden_size=size.vision_hidden, num_heads=size.vision_heads,
                      intermediate_size=2 * size.vision_hidden, patch_size=14, temporal_patch_size=2,
                      spatial_merge_size=2, window_size=112, fullatt_block_indexes=[size.vision_depth - 1],
                      out_hidden_size=size.hidden, tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen3_vl":
        text["head_dim"] = head_dim
        hw = (head_dim // 2) * 3 // 8
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6,
                                   "mrope_section": [head_dim // 2 - 2 * hw, hw, hw], "mrope_interleaved": True}
        vision = dict(depth=size.vision_depth, hidden_size=size.vision_hidden, num_heads=size.vision_heads,
                      intermediate_size=2 * size.vision_hidden, patch_size=16, temporal_patch_size=2,
                      spatial_merge_size=2, out_hidden_size=size.hidden, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_5_omni_thinker":  # Qwen2.5-VL's vision tower + a Whisper-style audio encoder
        qwen = model_config("qwen2_5_vl", tok, size)
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
            ("audio_token_index", "<|AUDIO|>"), ("image_token_index", "<|image_pad|>"),
            ("video_token_index", "<|VIDEO|>"),
            ("audio_start_token_id", "<|audio_bos|>"), ("audio_end_token_id", "<|audio_eos|>"),
            ("vision_start_token_id", "<|vision_bos|>")]}  # vision_start is read by get_rope_index though undeclared
        vision = {**qwen.vision_config.to_dict(), "tokens_per_second": 25}
        audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, d_model=32, encoder_ffn_dim=64,
                     output_dim=size.hidden, n_window=50)
        return Qwen2_5OmniThinkerConfig(text_config=text | {"rope_parameters": qwen.text_config.rope_parameters},
                                        vision_config=vision, audio_config=audio, position_id_per_seconds=25,
                                        seconds_per_chunk=2, **ids)
    if family == "llava":  # a CLIP-style image tower + projector + a Qwen2 decoder: video = its frames' tokens
        vision = dict(model_type="clip_vision_model", hidden_size=size.vision_hidden,
                      intermediate_size=2 * size.vision_hidden,
                      num_hidden_layers=size.vision_depth, num_attention_heads=size.vision_heads, image_size=28,
                      patch_size=14, projection_dim=size.vision_hidden)
        return LlavaConfig(vision_config=vision, text_config=text | {"model_type": "qwen2"},
                           image_token_index=ids["image_token_id"], vision_feature_layer=-1,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")
    raise ValueError(f"unknown tiny family {family!r}; choose qwen2_5_vl, qwen3_vl, qwen2_5_omni_thinker or llava")


def make_processor(family: str, tok):
    """The real transformers processor around our tokenizer. The pixel budget is wide so that frames which
    data/video.py already sized to multiples of patch*merge pass through unchanged."""
    size = {"shortest_edge": 28 * 28, "longest_edge": 768 * 768}
    if family == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size),
                                   video_processor=Qwen2VLVideoProcessor(size=size), tokenizer=tok,
                                   chat_template=CHAT_TEMPLATE)
    if family == "qwen3_vl":
        size = {"shortest_edge": 32 * 32, "longest_edge": 768 * 768}
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=16),
                                video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16,
                                                                      do_sample_frames=False),
                                tokenizer=tok, chat_template=CHAT_TEMPLATE)
    if family == "qwen2_5_omni_thinker":
        return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(size=size),
                                    video_processor=Qwen2VLVideoProcessor(size=size),
                                    feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                                    chat_template=OMNI_CHAT_TEMPLATE)
    if family == "llava":  # frames are resized to the tower's 28 x 28 (2 x 2 patches of 14 -> 4 tokens a frame)
        image = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default",
                              image_token="<|image_pad|>", chat_template=LLAVA_CHAT_TEMPLATE)
    raise ValueError(f"unknown tiny family {family!r}")


def make_tiny_model(out_dir: str, family: str = "qwen2_5_vl", size: TinySize = TinySize(), seed: int = 0):
    """Build a random tiny model + tokenizer + processor and save them as a from_pretrained folder."""

    torch.manual_seed(seed)
    tok = train_tokenizer(family=family)
    if family == "vila":
        return make_tiny_vila(out_dir, tok, size)
    config = model_config(family, tok, size)
    if family == "qwen2_5_omni_thinker":  # no Auto class maps the thinker alone
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    else:
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    make_processor(family, tok).save_pretrained(out_dir)
    return out_dir


def make_tiny_vila(out_dir: str, tok, size: TinySize) -> str:
    """A LongVILA-R1-shaped folder: llm/ (Qwen2 causal LM + tokenizer), vision_tower/ (SigLIP, 56x56 frames of
    4x4 patches, + its image processor), mm_projector/ (2x2 patches -> one row), config.json whose auto_map points
    at modeling_vila.py (our stand-in, copied from data/vila_standin.py). 4 rows + "\n" = 5 rows a frame."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vila_standin.py")
    spec = importlib.util.spec_from_file_location("vila_standin", here)
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    llm = Qwen2ForCausalLM(Qwen2Config(**text_kwargs(tok, size)))
    llm.generation_config.eos_token_id, llm.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    llm.save_pretrained(os.path.join(out_dir, "llm"))
    tok.save_pretrained(os.path.join(out_dir, "llm"))
    vision = SiglipVisionConfig(hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                                num_hidden_layers=size.vision_depth, num_attention_heads=size.vision_heads,
                                image_size=56, patch_size=14)
    SiglipVisionModel(vision).save_pretrained(os.path.join(out_dir, "vision_tower"))
    SiglipImageProcessor(size={"height": 56, "width": 56}).save_pretrained(os.path.join(out_dir, "vision_tower"))
    projector = standin.MultimodalProjectorConfig(mm_hidden_size=size.vision_hidden, hidden_size=size.hidden)
    standin.MultimodalProjector(projector).save_pretrained(os.path.join(out_dir, "mm_projector"))
    config = {"model_type": "vila", "architectures": ["VILAForCausalLM"],
              "auto_map": {"AutoConfig": "modeling_vila.VILAConfig", "AutoModel": "modeling_vila.VILAForCausalLM",
                           "AutoModelForCausalLM": "modeling_vila.VILAForCausalLM"},
              "llm_cfg": llm.config.to_dict(), "vision_tower_cfg": vision.to_dict(),
              "mm_projector_cfg": projector.to_dict(), "hidden_size": size.hidden, "mm_hidden_size": size.vision_hidden,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "num_video_frames": 8,
              "model_dtype": "torch.float32"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copy(here, os.path.join(out_dir, "modeling_vila.py"))
    return out_dir


@dataclass
class TinyConfig:
    out: str = "runs/tiny-qwen2_5_vl"   # output folder (from_pretrained-loadable)
    family: str = "qwen2_5_vl"          # qwen2_5_vl | qwen3_vl | qwen2_5_omni_thinker | llava | vila
    hidden: int = 64                    # text hidden size
    layers: int = 2                     # decoder layers
    seed: int = 0                       # weight init seed


if __name__ == "__main__":
    cfg = parse_config(TinyConfig)
    path = make_tiny_model(cfg.out, cfg.family, TinySize(hidden=cfg.hidden, layers=cfg.layers), cfg.seed)
    print(f"wrote a tiny {cfg.family} model, tokenizer and processor to {path}")
