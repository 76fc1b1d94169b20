"""
The vision-language policy as plain functions: loading a checkpoint, turning (video, question) into model
inputs, and the forward from vision tower to log-probs at response positions only. rollout.py (sampling),
train_grpo.py (training), sp.py and cache_embeddings.py all go through these, so that rollout and training
see exactly the same inputs.

Models (transformers' own classes; a hub id or a local path):
  Qwen2.5-VL, Qwen3-VL       video through the processor, 3-D positions
  Qwen2.5-Omni (thinker)     video + the video's own audio track, interleaved in 2-s chunks (build_prompt_omni)
  LLaVA-style embedding VLMs every frame through the image tower, its tokens spliced into the prompt embeddings
                             (build_prompt_frames), 1-D positions; the decoder is fed inputs_embeds
  LongVILA-R1 / NVILA        the same, loaded through their own remote code (trust_remote_code; section "VILA" below)
All of them share one mechanism: placeholder tokens in input_ids whose embeddings are replaced, in order, by
rows of media features (embed_inputs), so caching, sequence parallelism and both engines treat them alike.
Inputs: frames decoded by data/video.py are handed to the processor *with their metadata* (without it
Qwen2.5-VL silently assumes 24 fps); 3-D rope positions come from `rope_positions` below, which follows the
original Qwen2.5-VL rule (transformers 5.x starts text after a video at a different position), and are passed
explicitly everywhere, so that rollout and training log-probs agree.
"""
import contextlib
import inspect
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.profiler import record_function
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import (AttentionInterface, AttentionMaskInterface, AutoModel, AutoModelForImageTextToText,
                          AutoProcessor, PretrainedConfig, Qwen2_5OmniForConditionalGeneration,
                          Qwen2_5OmniThinkerForConditionalGeneration)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.video_utils import VideoMetadata

from common import all_reduce
from data.video import load_audio, probe, sample_frames


THINK_PROMPT = (
    "You are a helpful assistant. The user asks a question, and then you solves it.\n\n"
    "Please first think deeply about the question based on the given video, and then provide the final answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n\n"
    " Question: {question}")  # Long-RL's system_prompt_thinking, verbatim
PLAIN_PROMPT = "{question}\nPut the final answer inside <answer> </answer> tags."
# model_type -> frame size multiple (patch size x spatial merge; LLaVA's processor resizes frames itself)
SUPPORTED = {"qwen2_5_vl": 28, "qwen3_vl": 32, "qwen2_5_omni_thinker": 28, "qwen2_5_omni": 28, "llava": 14,
             "vila": 14}
MROPE = ("qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker")  # 3-D rope positions; the others take 1-D ones
FRAMES = ("llava", "vila")  # embedding VLMs: each frame through an image tower, rows spliced in frame after frame
SUPPRESS_TOKENS = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                   "<|VIDEO|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>",
                   "<image>", "<vila/video>", "<vila/sentinel>"]


# ----------------------------------------------------------------------------------------------------------
# loading

def load_model(path: str, dtype: str = "auto", attn_implementation: str = "sdpa", device: str = "cpu",
               vision_attention: str = "batched", patch_embed: str = "linear", vision_mlp: str = "plain"):
    """(model, processor) for a supported VLM checkpoint folder or hub id. vision_attention: "batched" runs
    each layer of a Qwen vision tower as one attention call over all its windows (window_attention below; with
    sdpa), "loop" keeps transformers' one call per window. patch_embed: "linear" runs a Qwen tower's Conv3d
    patch embedding as one matrix product (PatchProjection below), "conv" keeps transformers' Conv3d. vision_mlp:
    "padded" computes the media encoders' gated MLPs at a width padded to a multiple of 64 (PaddedMLP below; the
    same numbers), "plain" as they are."""
    if vision_attention not in ("batched", "loop"):
        raise ValueError(f"vision_attention {vision_attention!r}: choose batched or loop")
    if patch_embed not in ("linear", "conv"):
        raise ValueError(f"patch_embed {patch_embed!r}: choose linear or conv")
    if vision_mlp not in ("plain", "padded"):
        raise ValueError(f"vision_mlp {vision_mlp!r}: choose plain or padded")
    model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")  # config.json read, no code run
    if model_type not in SUPPORTED:
        raise ValueError(f"{path}: model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            print("flash-attn is not installed: using PyTorch SDPA attention")
            attn_implementation = "sdpa"
    if model_type == "vila":
        return load_vila(path, dtype, attn_implementation, device)
    kw = dict(dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    if model_type == "qwen2_5_omni":  # the whole Omni: keep the thinker (text out); the talker is not loaded
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, enable_audio_output=False, **kw).thinker
    elif model_type == "qwen2_5_omni_thinker":  # a thinker saved on its own (merge.py writes this)
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, **kw)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    model = model.to(device)
    vision_config = getattr(model.config, "vision_config", None)
    if vision_attention == "batched" and family(model) in MROPE and vision_config._attn_implementation == "sdpa":
        model.set_attn_implementation({"text_config": model.config.get_text_config()._attn_implementation,
                                       "vision_config": WINDOW_ATTENTION})
    if patch_embed == "linear":
        use_patch_projection(model)
    if vision_mlp == "padded":
        use_padded_mlp(model)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def family(model) -> str:
    return model.config.model_type


# The decoder's parts: nothing else reaches into a family's module layout (VILA keeps its decoder in model.llm).
def text_model(model):
    """The decoder stack (.embed_tokens, .layers, .norm, .rotary_emb), without lm_head."""
    if family(model) == "vila":
        return model.llm.model
    return getattr(model.model, "language_model", model.model)  # Omni's thinker before transformers 5.24: itself


def media_model(model):
    """The module that holds the media encoders (.visual, .audio_tower) and get_video_features /
    get_audio_features / get_rope_index: model.model, except Qwen2.5-Omni's thinker before transformers 5.24,
    which holds them itself (its .model is the decoder)."""
    return model.model if hasattr(model.model, "language_model") else model


def output_head(model):
    """lm_head: hidden states -> vocabulary logits."""
    return model.llm.lm_head if family(model) == "vila" else model.lm_head


def input_embeddings(model):
    """The token embedding table."""
    return text_model(model).embed_tokens


def media_token_id(model) -> int:
    """The placeholder whose embeddings are replaced by vision feature rows, one row per token."""
    if family(model) == "vila":
        return model.tokenizer.media_token_ids["video"]
    return model.config.image_token_id if family(model) == "llava" else model.config.video_token_id


def token_ids(processor, tokens) -> list:
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    return [i for i in ids if i is not None and i != processor.tokenizer.unk_token_id]


def eos_ids(model, processor) -> list:
    """Stop tokens: the tokenizer's eos plus the generation config's (Qwen: <|im_end|> and <|endoftext|>)."""
    ids = {processor.tokenizer.eos_token_id}
    for m in (model, getattr(model, "llm", None)):  # VILA: its decoder's generation config (llm/) too
        gen = getattr(m, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)


def suppress_ids(model, processor) -> list:
    """Token ids that are never sampled nor scored: the vision placeholders and the pad token (a sampled
    <|video_pad|> would break re-scoring the response), unless one of them is also a stop token."""
    stop = eos_ids(model, processor)
    placeholders = [media_token_id(model), getattr(model.config, "audio_token_id", None)]  # e.g. LLaVA's <image>
    ids = token_ids(processor, SUPPRESS_TOKENS) + placeholders + [processor.tokenizer.pad_token_id]
    return sorted({i for i in ids if i is not None and i not in stop})


# ----------------------------------------------------------------------------------------------------------
# the Qwen vision towers' attention: all windows of a layer in one call

@torch.compiler.disable  # data-dependent shapes (the windows' lengths, read on the host): always eager
def window_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     **kwargs):
    """A Qwen vision layer attends within windows, given as cumulative lengths s_0 = 0 < s_1 < ... < s_W = N
    (Qwen2.5-VL: 112 x 112-pixel windows in most layers, one frame pair in the rest; Qwen3-VL and the Omni thinker:
    one frame pair). transformers' sdpa path calls SDPA once per window from a Python loop (256 frames at 224 x 224:
    512 windows a layer, in the forward, the recompute and the backward); here the whole layer is one call:
        q, k, v                 (1, H, N, D)
        windows all of length L: view as (W, H, L, D), no mask
        ragged windows:         gather rows into (W, H, L_max, D), mask the padded keys, scatter the rows back
        -> ((1, N, H, D), None)  what transformers' attention functions return
    Padded query rows see their window's keys (every window has at least one): no NaN, and they are dropped."""
    if dropout:
        raise ValueError("window_attention has no dropout (the Qwen vision towers use none)")
    H, N, D = query.shape[1:]
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    W, L = len(lengths), int(lengths.max())
    if W * L == N:  # equal windows
        q, k, v = (t[0].view(t.shape[1], W, L, D).transpose(0, 1) for t in (query, key, value))  # [W, H, L, D]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.permute(0, 2, 1, 3).reshape(1, N, H, D), None
    offsets = torch.arange(L, device=query.device)
    valid = offsets[None, :] < lengths[:, None]                                         # [W, L]
    rows = torch.where(valid, cu_seq_lens_q[:-1, None] + offsets[None, :], 0)          # [W, L] token index
    q, k, v = (t[0][:, rows].transpose(0, 1) for t in (query, key, value))              # [W, H, L, D]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    return out.transpose(1, 2)[valid][None], None                                        # [1, N, H, D] in order


# transformers' Qwen vision attention hands the window boundaries (cu_seqlens) only to attention functions whose
# name says "flash" (transformers.utils.is_flash_attention_requested); the kernel here is PyTorch's SDPA
WINDOW_ATTENTION = "flash_varlen_sdpa"
AttentionInterface.register(WINDOW_ATTENTION, window_attention)


# the Qwen vision towers' patch embedding: a Conv3d whose kernel is its stride, i.e. one matrix product

class PatchProjection(torch.nn.Module):
    """Stands in for a Qwen vision tower's `patch_embed.proj` (nn.Conv3d, kernel = stride, no padding: each
    output sees one whole patch and no two patches overlap) and computes what that convolution computes as
    the matrix product it is, with the conv's own parameters (same names, shapes and state dict):
        x      [N, C, t, p, p]                 N patches (the tower views its pixel rows this way)
        W      [D, C, t, p, p] -> [D, C t p p]  a view, no copy
        out    [N, D, 1, 1, 1] = (x.flatten(1) @ W.flatten(1).T + b)[:, :, None, None, None]
    cuDNN's Conv3d kernels for this shape have been orders of magnitude slower than one GEMM in some PyTorch /
    cuDNN versions (a fallback to im2col or a slow bf16 engine), forward and backward; a GEMM is always cuBLAS."""

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        if conv.stride != conv.kernel_size or any(conv.padding) or conv.dilation != (1, 1, 1) or conv.groups != 1:
            raise ValueError(f"PatchProjection needs non-overlapping patches, got {conv}")
        self.weight, self.bias = conv.weight, conv.bias   # the same Parameter objects
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def forward(self, x):
        return torch.nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None, None]

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size} (as one matrix product)"


def use_patch_projection(model):
    """Swap every Conv3d `patch_embed.proj` of the model's media encoders for a PatchProjection of the same
    parameters (the Qwen families have one; LLaVA's and VILA's image towers use Conv2d)."""
    for encoder in media_encoders(model):
        for module in encoder.modules():
            if type(getattr(module, "proj", None)) is torch.nn.Conv3d and hasattr(module, "temporal_patch_size"):
                module.proj = PatchProjection(module.proj)


# the Qwen vision towers' MLP: its width, 3,420, padded at compute time

class PaddedMLP(torch.nn.Module):
    """Stands in for a gated MLP (gate_proj, up_proj, down_proj, act_fn: the Qwen vision towers') whose width w is
    not a multiple of `multiple`, with its own parameters (same names, shapes and state dict), computing as if w
    were zero-padded to the next multiple w':
        gate, up   [w, d] -> [w', d]  zero rows (biases zero-padded)   h' = act(x gate'^T + b) * (x up'^T + b)
        down       [d, w] -> [d, w']  zero columns                     out = h' down'^T + b = h down^T + b
    The padded units are act(0) * 0 = 0 and meet zero columns: the same output and gradients (to rounding), and
    the pads are made anew from the parameters at each call (copies of three weights: small next to the products
    over N patches), so only the real weights train. Why: w = 3,420 bf16 values are 6,840 bytes a row, not a
    multiple of the 16 bytes that tensor-core GEMM kernels load at once. The 256-frame update's profile on the lent
    H100 has 224 calls of cuBLAS's older sm80 kernels (7 per vision layer), 0.26 s of its 1.9 s of GPU time: most
    likely these products (every one of the MLP's 12 products a layer, forward, recompute and backward, has 3,420
    as a dimension). `bench.py mlp` times the widths, `bench.py train --vision_mlp=[...]` the update."""

    def __init__(self, mlp: torch.nn.Module, multiple: int = 64):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.pad = -self.gate_proj.out_features % multiple

    def forward(self, x):
        F, p = torch.nn.functional, self.pad

        def rows(linear):  # [w, d] weight and [w] bias with p zero rows / entries appended
            return F.pad(linear.weight, (0, 0, 0, p)), None if linear.bias is None else F.pad(linear.bias, (0, p))

        h = self.act_fn(F.linear(x, *rows(self.gate_proj))) * F.linear(x, *rows(self.up_proj))     # [N, w']
        return F.linear(h, F.pad(self.down_proj.weight, (0, p)), self.down_proj.bias)               # [N, d]

    def extra_repr(self):
        return f"width {self.gate_proj.out_features} computed as {self.gate_proj.out_features + self.pad}"


def use_padded_mlp(model, multiple: int = 64):
    """Swap the gated MLP of every media encoder block whose width is not a multiple of `multiple` for a
    PaddedMLP of the same parameters (Qwen2.5-VL's and the Omni thinker's towers: 3,420; decoders untouched)."""
    for block in encoder_blocks(model):
        mlp = getattr(block, "mlp", None)
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
                mlp.gate_proj.out_features % multiple:
            block.mlp = PaddedMLP(mlp, multiple)


# ----------------------------------------------------------------------------------------------------------
# VILA (LongVILA-R1, NVILA): their own remote code (modeling_vila.py in the checkpoint), adapted onto the shared
# mechanism. Used from it: model.llm (a causal LM: decoder + lm_head), model.tokenizer (.media_tokens,
# .media_token_ids), model.vision_tower (.vision_tower = SigLIP, .image_processor), model.mm_projector,
# model.encode_images, model.encoders["video"] (its start/end tokens) and model.pad_token_list.
# Its _embed replaces the video token by, per frame, [start tokens] + encode_images rows + [end tokens] ("\n"):
# we lay that out in input_ids (separators as tokens, rows as placeholders), so the embeddings are the same and
# a media row is a pure tower + projector output (an embeddings cache then stays valid while the LLM trains).

def load_vila(path: str, dtype: str, attn_implementation: str, device: str):
    """As Long-RL loads LongVILA-R1: AutoModel with trust_remote_code runs the checkpoint's modeling_vila.py
    (config.json's auto_map), which builds VILAForCausalLM from the folder's llm/ (causal LM + tokenizer),
    vision_tower/ (SigLIP + image processor) and mm_projector/."""
    # its __init__ moves the tower to CUDA for device_map "auto" (the default) or "cuda": name the device
    model = AutoModel.from_pretrained(path, trust_remote_code=True, device_map=str(device))
    model = model.to(device=device, dtype=getattr(torch, dtype))  # its post_config casts to bf16 / fp16 itself
    model.llm.set_attn_implementation(attn_implementation)
    # the decoder's config lives in llm/: attach it where transformers' composite configs keep it, so that
    # model.config.get_text_config() (KV caches, the vLLM export, head checks) gives the decoder's
    model.config.text_config = model.llm.config
    if type(model.encoders["video"]).__name__ != "BasicVideoEncoder":  # what their remote code hard-codes
        raise NotImplementedError(f"{path}: VILA video encoder {type(model.encoders['video']).__name__} is not "
                                  "adapted (vlm.py lays out BasicVideoEncoder's frames)")
    processor = VilaProcessor(model.tokenizer, model.vision_tower.image_processor)
    model.frame_rows = vila_frame_rows(model, processor)
    return model, processor


class VilaProcessor:
    """What vlm.py uses of a processor, taken from a loaded VILA model: its tokenizer (with the media tokens its
    _embed looks for) and its tower's image processor. A turn is templated as VILA's own processor does
    (extract_media + tokenize_conversation): media tokens and text joined into one stripped string."""
    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        def flat(content):
            if isinstance(content, str):
                return content
            return "".join(p["text"] if p["type"] == "text" else self.tokenizer.media_tokens[p["type"]]
                           for p in content).strip()
        turns = [{"role": m["role"], "content": flat(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize)


@torch.no_grad()
def vila_frame_rows(model, processor) -> int:
    """Rows that model.encode_images (tower + projector) gives one frame, measured once on a blank frame at
    loading (before any FSDP sharding), so that prompts can be laid out before their videos are encoded."""
    pixels = processor.image_processor(images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt")["pixel_values"]
    return model.encode_images(pixels.to(model.device, model.dtype)).shape[1]


# ----------------------------------------------------------------------------------------------------------
# model inputs

@dataclass
class Prompt:
    """One (video, question) turned into model inputs: unpadded ids, 3-D positions and the video tensors."""
    input_ids: torch.Tensor         # [L] long
    positions: torch.Tensor         # [3, L] long (temporal, height, width rope positions)
    pixel_values_videos: torch.Tensor  # None when video_features come from the embeddings cache
    video_grid_thw: torch.Tensor    # [1, 3]
    num_video_tokens: int
    text: str = ""                  # the chat-templated prompt (vLLM takes this plus the frames)
    frames: object = None           # the SampledVideo, kept for vLLM
    sample: object = None
    video_features: tuple = None    # cached tower outputs (embeds [N, H], deepstack [layers, N, H] or None)
    input_features: torch.Tensor = None  # Omni: log-mel of the video's audio track [mel bins, frames]
    num_audio_tokens: int = 0       # Omni: <|AUDIO|> tokens in input_ids
    audio_embeds: torch.Tensor = None  # Omni, from the embeddings cache: the audio encoder's rows [tokens, hidden]


def prompt_text(processor, question: str, think: bool, instruction: str = None) -> str:
    """The chat-templated prompt: a video, then the question in Long-RL's think template or the plain one (or a
    given `instruction` verbatim, e.g. data/make_reason_data.py's captioning request)."""
    user = instruction or (THINK_PROMPT if think else PLAIN_PROMPT).format(question=question)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def video_kwargs(processor) -> dict:
    """Processor arguments for frames data/video.py already sampled and sized: cap_pixels_per_frame=False where
    this transformers has it. Every frame is already within --max_pixels, the per-frame budget the token counts
    and the memory plan assume; the processor's extra cap on the whole video's pixels (qwen-vl-utils' rule, which
    transformers announces as its coming default and warns about on every video until told) would shrink frames
    again behind our back. Versions without the argument have no such cap."""
    fields = getattr(getattr(getattr(processor, "video_processor", None), "valid_kwargs", None), "__annotations__", {})
    return {"cap_pixels_per_frame": False} if "cap_pixels_per_frame" in fields else {}


def build_prompt(model, processor, question: str, video, think: bool = True, sample=None,
                 instruction: str = None) -> Prompt:
    """`video` is a data.video.SampledVideo (frames already sampled and resized)."""
    if family(model) in FRAMES:
        return build_prompt_frames(model, processor, question, video, think, sample, instruction)
    if family(model) == "qwen2_5_omni_thinker":
        return build_prompt_omni(model, processor, question, video, think, sample, instruction)
    text = prompt_text(processor, question, think, instruction)
    out = processor(text=[text], videos=[video.frames], video_metadata=[video.metadata()], do_sample_frames=False,
                    return_tensors="pt", **video_kwargs(processor))
    ids = out["input_ids"][0]
    sec = out.get("second_per_grid_ts")
    positions = rope_positions(model.config, ids, out["video_grid_thw"], None if sec is None else sec.tolist())
    video_id = model.config.video_token_id
    return Prompt(input_ids=ids, positions=positions, pixel_values_videos=out["pixel_values_videos"],
                  video_grid_thw=out["video_grid_thw"], num_video_tokens=int((ids == video_id).sum()),
                  text=text, frames=video, sample=sample)


def expand_placeholder(ids: torch.Tensor, token: int, replacement: list) -> torch.Tensor:
    """Replace the one `token` of a prompt by the token list `replacement`."""
    where = (ids == token).nonzero().flatten().tolist()
    if len(where) != 1:
        raise ValueError(f"the chat template put {len(where)} media placeholders (id {token}) "
                         "in the prompt, expected 1")
    return torch.cat([ids[:where[0]], torch.tensor(replacement, dtype=ids.dtype), ids[where[0] + 1:]])


def frame_tokens(model) -> int:
    """Feature rows per frame. LLaVA-style: the tower's patches (its CLS token dropped by the "default" strategy);
    VILA: its projector's rows, measured once at loading (vila_frame_rows)."""
    if family(model) == "vila":
        return model.frame_rows
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")


def frame_block(model) -> list:
    """One frame's ids in the prompt: its feature rows as placeholders; VILA: between its video encoder's start and
    end tokens, tokenized as the encoder tokenizes them."""
    rows = [media_token_id(model)] * frame_tokens(model)
    if family(model) != "vila":
        return rows
    enc = model.encoders["video"]
    start, end = [model.tokenizer(t).input_ids if t else [] for t in (enc.start_tokens, enc.end_tokens)]
    return start + rows + end


def prompt_ids(model, processor, text: str) -> torch.Tensor:
    """The templated prompt's token ids (one media placeholder). VILA's _embed drops every token of its
    pad_token_list (pad and eos ids; its third entry is a token string, which never matches an id) from the prompt
    before the LLM sees it, so that is the sequence its LLM was trained on: we drop the same ids."""
    ids = torch.tensor(processor.tokenizer(text)["input_ids"])
    if family(model) == "vila":
        drop = torch.tensor([i for i in model.pad_token_list if isinstance(i, int)])
        ids = ids[~torch.isin(ids, drop)]
    return ids


def build_prompt_frames(model, processor, question: str, video, think: bool = True, sample=None,
                        instruction: str = None) -> Prompt:
    """Embedding VLMs (LLaVA-style, LongVILA): each frame goes through the image tower on its own and its
    rows replace, frame after frame, the prompt's one media placeholder. Positions are 1-D. video_grid_thw is
    [frames, side, side] (LLaVA) or [frames, 1, rows] (VILA): grid[:, 0] splits a batch's frames into videos."""
    text = prompt_text(processor, question, think, instruction)
    pixels = processor.image_processor(images=list(video.frames), return_tensors="pt")["pixel_values"]  # [F, 3, S, S]
    n = len(pixels) * frame_tokens(model)
    ids = expand_placeholder(prompt_ids(model, processor, text), media_token_id(model),
                             frame_block(model) * len(pixels))
    if family(model) == "vila":
        grid = [len(pixels), 1, frame_tokens(model)]
    else:
        grid = [len(pixels)] + [model.config.vision_config.image_size // model.config.vision_config.patch_size] * 2
    return Prompt(input_ids=ids, positions=rope_positions(model.config, ids, None), pixel_values_videos=pixels,
                  video_grid_thw=torch.tensor([grid]), num_video_tokens=n, text=text, frames=video, sample=sample)


def omni_chunks(values: list, size: int) -> list:
    """Split increasing time positions into consecutive runs at multiples of `size`, advancing one boundary per
    token, exactly as transformers' Qwen2.5-Omni get_chunked_index does (the positions it computes for a
    prompt assume that layout)."""
    runs, start, boundary = [], 0, size
    for i, v in enumerate(values):
        if v >= boundary:
            runs.append((start, i))
            start, boundary = i, boundary + size
    return runs + [(start, len(values))]


def build_prompt_omni(model, processor, question: str, video, think: bool = True, sample=None,
                      instruction: str = None) -> Prompt:
    """Qwen2.5-Omni thinker: the frames plus the video's own audio track (video.audio, 16 kHz); see omni_layout.
    A video without audio gets video tokens only."""
    text = prompt_text(processor, question, think, instruction)
    out = processor.video_processor(videos=[video.frames], do_sample_frames=False, return_tensors="pt",
                                    **video_kwargs(processor))
    feats, mel_frames = None, 0
    if video.audio is not None and len(video.audio) >= 400:  # < 25 ms: not even one audio token
        # as the Omni processor: padded to 30 s (the last frames' STFT windows see zeros), longer tracks kept whole
        fe = processor.feature_extractor(video.audio, sampling_rate=16000, return_attention_mask=True, truncation=False,
                                         padding="max_length", return_tensors="pt")
        mel_frames = int(fe["attention_mask"].sum())
        feats = fe["input_features"][0, :, :mel_frames]
    sec = omni_seconds_per_group(model, video.metadata())
    ids, positions, n_video, n_audio = omni_layout(model, torch.tensor(processor.tokenizer(text)["input_ids"]),
                                                   out["video_grid_thw"], sec, mel_frames)
    return Prompt(input_ids=ids, positions=positions, pixel_values_videos=out["pixel_values_videos"],
                  video_grid_thw=out["video_grid_thw"], num_video_tokens=n_video, text=text, frames=video,
                  sample=sample, input_features=feats, num_audio_tokens=n_audio)


def sampled_fps(frames_meta: dict) -> float:
    """Frames per second of the frames actually sampled (SampledVideo.metadata()): source fps x sampled / total."""
    return len(frames_meta["frames_indices"]) / max(frames_meta["total_num_frames"], 1) * frames_meta["fps"]


def omni_seconds_per_group(model, frames_meta: dict) -> float:
    """Seconds covered by one temporal patch group: temporal_patch_size / sampled fps (Qwen2.5-VL's rule, from
    the frames actually sampled; the Omni processor assumes 2 fps unless told)."""
    return model.config.vision_config.temporal_patch_size / sampled_fps(frames_meta)


def omni_layout(model, ids, grid, sec: float, mel_frames: int = 0):
    """The prompt's one <|VIDEO|> expanded as
        <|vision_bos|><|audio_bos|> [video 0-2 s][audio 0-2 s][video 2-4 s][audio 2-4 s]... <|audio_eos|><|vision_eos|>
    (the processor's use_audio_in_video layout, written out so it does not depend on the transformers version;
    time position of video group i: i * sec * 25, of audio token j: j, 25 a second), or as video tokens only when
    mel_frames = 0. Returns (ids, 3-D positions from the model's own get_rope_index, video tokens, audio tokens)."""
    c = model.config
    t, h, w = grid[0].tolist()
    per_group = h * w // c.vision_config.spatial_merge_size ** 2
    n_audio = ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1 if mel_frames else 0  # two stride-2 stages: 100 mel/s -> 25/s
    if not n_audio:
        block = [c.video_token_id] * (t * per_group)
    else:
        chunk = int(c.position_id_per_seconds * c.seconds_per_chunk)
        vchunks = omni_chunks([int(i * sec * c.position_id_per_seconds) for i in range(t) for _ in range(per_group)],
                              chunk)
        achunks = omni_chunks(list(range(n_audio)), chunk)
        block = [c.audio_start_token_id]
        for j in range(max(len(vchunks), len(achunks))):
            block += [c.video_token_id] * (vchunks[j][1] - vchunks[j][0]) if j < len(vchunks) else []
            block += [c.audio_token_id] * (achunks[j][1] - achunks[j][0]) if j < len(achunks) else []
        block += [c.audio_end_token_id]
    ids = expand_placeholder(ids, c.video_token_id, block)
    pos, _ = media_model(model).get_rope_index(ids[None], None, grid, None, use_audio_in_video=n_audio > 0,
                                               audio_seqlens=torch.tensor([mel_frames]) if n_audio else None,
                                               second_per_grids=torch.tensor([sec]))
    return ids, pos[:, 0], t * per_group, n_audio


def omni_positions(config, ids: list, grid: list, sec: float) -> torch.Tensor:
    """The Qwen2.5-Omni thinker's 3-D positions [3, L] for a prompt of ours (omni_layout's ids: one video, with or
    without its audio interleaved), by the rule of transformers' get_rope_index, token by token:
        text                     one position each, the same on all three axes, counting on from the last maximum
        <|vision_bos|><|audio_bos|>   one shared position p; the block's positions start at base = p + 1
        k-th video token         base + (t_k, h_k, w_k): t_k = floor(group * sec * position_id_per_seconds)
        j-th audio token         base + j on all three axes (25 a second, so it lines up with the video's t)
        <|audio_eos|><|vision_eos|>   one shared position: 1 + the maximum of the block's last run (its last
                                 chunk of video or of audio tokens: get_rope_index counts on from the last piece it
                                 placed, which may sit below the video's latest time)
    Our vLLM engine gives vLLM these positions (rollout.register_omni_thinker): vllm 0.24's own rule for this
    layout is off by one token inside the block (its placeholder offset includes <|audio_bos|>). Tested equal to
    get_rope_index (tests/test_vlm.py)."""
    t, h, w = [int(x) for x in grid]
    gh, gw = h // config.vision_config.spatial_merge_size, w // config.vision_config.spatial_merge_size
    # float32 as get_rope_index computes it (a different rounding would move a group across a second)
    t_index = (torch.arange(t) * torch.tensor(sec, dtype=torch.float32) * config.position_id_per_seconds).long()
    video = torch.stack([t_index.repeat_interleave(gh * gw), torch.arange(gh).repeat_interleave(gw).repeat(t),
                         torch.arange(gw).repeat(t * gh)])
    out = torch.zeros(3, len(ids), dtype=torch.long)
    nxt, base, run, k, j = 0, None, 0, 0, 0  # next text position; the block's base; its last run's start; counts
    for i, tok in enumerate(ids):
        if tok in (config.video_token_id, config.audio_token_id):  # the block (audio only ever inside it here)
            base = nxt if base is None else base
            run = i if i == 0 or ids[i - 1] != tok else run
            if tok == config.video_token_id:
                out[:, i], k = base + video[:, k], k + 1
            else:
                out[:, i], j = base + j, j + 1
            continue
        if base is not None:  # the block just ended
            nxt, base = int(out[:, run:i].max()) + 1, None
        shared = i > 0 and ((tok == config.audio_start_token_id and ids[i - 1] == config.vision_start_token_id) or
                            ids[i - 1] == config.audio_end_token_id)
        if shared:
            out[:, i] = out[:, i - 1]
        else:
            out[:, i], nxt = nxt, nxt + 1
    return out


def build_prompt_cached(model, processor, question: str, entry, think: bool = True, sample=None) -> Prompt:
    """A Prompt from a cache_embeddings.py entry, without decoding the video. Embedding VLMs: the placeholder
    is expanded to the stored number of rows; Qwen-VL: the processor's own
    replace_video_token expands the placeholder from the stored grid and frame metadata (Qwen2.5-VL: N
    <|video_pad|>; Qwen3-VL: a timestamp and a vision block per temporal group), exactly as for frames."""
    text = prompt_text(processor, question, think)
    if family(model) == "qwen2_5_omni_thinker":  # the stored audio rows and mel length rebuild the same layout
        mel = int(entry.audio_mel_frames) if entry.audio is not None else 0
        ids, positions, n_video, n_audio = omni_layout(model, torch.tensor(processor.tokenizer(text)["input_ids"]),
                                                       entry.video_grid_thw,
                                                       omni_seconds_per_group(model, entry.meta["frames"]), mel)
        return Prompt(input_ids=ids, positions=positions, pixel_values_videos=None, video_grid_thw=entry.video_grid_thw,
                      num_video_tokens=n_video, text=text, sample=sample, video_features=(entry.embeds, None),
                      num_audio_tokens=n_audio, audio_embeds=entry.audio)
    if family(model) in FRAMES:
        ids = expand_placeholder(prompt_ids(model, processor, text), media_token_id(model),
                                 frame_block(model) * int(entry.video_grid_thw[0, 0]))
        return Prompt(input_ids=ids, positions=rope_positions(model.config, ids, None), pixel_values_videos=None,
                      video_grid_thw=entry.video_grid_thw, num_video_tokens=len(entry.embeds), text=text,
                      sample=sample, video_features=(entry.embeds, None))
    video = {"video_grid_thw": entry.video_grid_thw, "video_metadata": [VideoMetadata(**entry.meta["frames"])]}
    expanded, _ = processor.get_text_with_replacements([text], videos_replacements=[
        processor.replace_video_token(video, video_idx=0)])
    ids = torch.tensor(processor.tokenizer(expanded)["input_ids"][0])
    sec = entry.second_per_grid_ts
    positions = rope_positions(model.config, ids, entry.video_grid_thw, None if sec is None else sec.tolist())
    return Prompt(input_ids=ids, positions=positions, pixel_values_videos=None, video_grid_thw=entry.video_grid_thw,
                  num_video_tokens=int((ids == model.config.video_token_id).sum()), text=text, sample=sample,
                  video_features=(entry.embeds, entry.deepstack))


def load_video(path: str, cfg, model_type: str, progress: bool = False):
    """Decode and sample one video for a model family (frame sides a multiple of its patch x merge); for the
    Omni thinker also its audio track (None, with a message, when it has none: the input is then video only).
    progress: a decoding bar (the CLI's one long video)."""
    fps = cfg.fps or None  # fps, when given, takes precedence over num_frames
    video = sample_frames(path, fps=fps, num_frames=None if fps else (cfg.num_frames or None),
                          max_frames=cfg.max_frames, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                          size_multiple=SUPPORTED[model_type], progress=progress)
    if model_type.startswith("qwen2_5_omni"):
        if probe(path).has_audio:
            video.audio = load_audio(path, sr=16000)
        else:
            print(f"{path}: no audio track; the Omni thinker gets its frames only")
    return video


def rope_positions(config, input_ids: torch.Tensor, video_grid_thw: torch.Tensor, second_per_grid=None):
    """3-D rope positions [3, L] of one unpadded sequence, by the original Qwen2.5-VL rule:
        text token:  t = h = w = previous max + 1
        video block: t = start + floor(i_t * second_per_grid * tokens_per_second), h = start + i_h, w = start + i_w
                     (grid in merged tokens, start = previous max + 1)
    Qwen3-VL puts each temporal group in its own block (timestamps between them), with i_t = 0.
    Text after the last vision block restarts at max + 1; that is where transformers 5.x differs.
    Models without 3-D rope (LLaVA-style) get 0, 1, 2, ... on all three rows (the decoder reads row 0)."""
    if config.model_type not in MROPE:
        return torch.arange(len(input_ids)).expand(3, -1).clone()
    merge = config.vision_config.spatial_merge_size
    qwen3 = config.model_type == "qwen3_vl"
    tps = getattr(config.vision_config, "tokens_per_second", 1)
    blocks = []  # (t, h, w, seconds per temporal grid), in the order the blocks appear in the sequence
    for v, (t, h, w) in enumerate(video_grid_thw.tolist()):
        if qwen3:
            blocks += [(1, h // merge, w // merge, 0.0)] * t
        else:
            blocks.append((t, h // merge, w // merge, 1.0 if second_per_grid is None else second_per_grid[v]))
    ids = input_ids.tolist()
    pos = torch.zeros(3, len(ids), dtype=torch.long)
    i, nxt, b = 0, 0, 0
    while i < len(ids):
        if ids[i] == config.video_token_id:
            t, h, w, sec = blocks[b]
            n = t * h * w
            ti = (torch.arange(t) * sec * tps).long().view(-1, 1, 1).expand(t, h, w).flatten()
            hi = torch.arange(h).view(1, -1, 1).expand(t, h, w).flatten()
            wi = torch.arange(w).view(1, 1, -1).expand(t, h, w).flatten()
            pos[:, i:i + n] = torch.stack([ti, hi, wi]) + nxt
            nxt = int(pos[:, i:i + n].max()) + 1
            i, b = i + n, b + 1
        else:
            pos[:, i] = nxt
            nxt, i = nxt + 1, i + 1
    if b != len(blocks):
        raise ValueError(f"prompt has {b} video blocks but video_grid_thw describes {len(blocks)}")
    return pos


def continue_positions(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of n text tokens appended after a sequence: max + 1, max + 2, ..."""
    start = int(positions.max()) + 1 if positions.numel() else 0
    return (torch.arange(n) + start).view(1, -1).expand(3, n)


# ----------------------------------------------------------------------------------------------------------
# the policy forward: vision tower -> decoder hidden states -> log-probs at response positions only

def encode_videos(model, prompts: list, max_patches: int = 65536, grad_patches: int = 32768):
    """Run the vision tower over the videos of `prompts` (those with cached video_features skip it), at most
    `max_patches` patch rows per call so that the tower's memory stays bounded for long videos; returns an object
    like get_video_features': pooler_output is a tuple of per-video [tokens, hidden] tensors (Qwen3-VL also
    carries deepstack_features, one tuple per DeepStack layer).
    With grad enabled (the tower trains) the calls hold at most `grad_patches` rows and, when there is more than
    one, each is checkpointed: backward recomputes them one at a time, so the tower's activations exist for one
    call, never for the whole step (1,024 frames at 224 x 224 are 131k patches, ~13 GB of activations in a 3B
    model's tower, kept until the decoder's backward is done). A video longer than a call is cut between temporal
    patches (frame pairs; frames for the embedding VLMs): no attention in these towers crosses them, so the
    pieces' rows, concatenated, are the whole video's. The cost: one more forward of the tower, only past
    grad_patches (256 frames at 224 x 224 are exactly 32,768 patches: one call, as measured in the README)."""
    budget = grad_patches if torch.is_grad_enabled() else max_patches
    pieces = []  # (video, first, last temporal patch) with at most `budget` rows each, in order
    for i, p in enumerate(prompts):
        if p.video_features is None:
            T = int(p.video_grid_thw[0, 0])
            step = max(1, budget // (len(p.pixel_values_videos) // T))   # temporal patches per piece
            pieces += [(i, t, min(t + step, T)) for t in range(0, T, step)]
    calls, rows_in_call = [], 0  # consecutive pieces within the budget (always at least one)
    for piece in pieces:
        size = piece_rows(prompts, piece)
        if calls and rows_in_call + size <= budget:
            calls[-1].append(piece)
            rows_in_call += size
        else:
            calls.append([piece])
            rows_in_call = size
    own = len(calls)
    num_calls = lockstep(own, encoder_blocks(model)[0], model.device)  # the vision tower's first block
    if num_calls > own:  # a peer makes more calls: repeat one temporal patch of our first video, rows dropped
        if not pieces:
            raise RuntimeError("encode_videos: no video to encode on this rank while its FSDP peers encode some: "
                               "give it a placeholder prompt (rollout.placeholder_prompt)")
        calls += [[(pieces[0][0], pieces[0][1], pieces[0][1] + 1)]] * (num_calls - own)
    checkpointed = torch.is_grad_enabled() and num_calls > 1
    parts = [[] for _ in prompts]  # per video: its pieces' (embeds, [deepstack per layer] or None), in order
    dropped = []                   # the padding calls' outputs
    for c, call in enumerate(calls):
        pixels = torch.cat([piece_pixels(prompts, q) for q in call]).to(model.device)
        grid = torch.tensor([[q[2] - q[1], *prompts[q[0]].video_grid_thw[0, 1:].tolist()] for q in call],
                            device=model.device)
        with record_function("vision tower"):  # a named range in train_grpo.py --profile_step's trace
            out = checkpoint(tower_features, model, pixels, grid, use_reentrant=False) if checkpointed \
                else tower_features(model, pixels, grid)
        deep = getattr(out, "deepstack_features", None)
        if c >= own:
            dropped.append(out)
            continue
        for k, q in enumerate(call):
            parts[q[0]].append((out.pooler_output[k], None if deep is None else [layer[k] for layer in deep]))
    rows = [None] * len(prompts)
    for i, got in enumerate(parts):
        if got:
            rows[i] = (torch.cat([e for e, _ in got]), None if got[0][1] is None else
                       [torch.cat([d[j] for _, d in got]) for j in range(len(got[0][1]))])
    for i, p in enumerate(prompts):
        if p.video_features is not None:  # from the embeddings cache (cache_embeddings.py)
            emb, deep = p.video_features
            rows[i] = (emb.to(model.device), None if deep is None else list(deep.to(model.device)))
    if family(model) == "qwen3_vl":  # late: Qwen3-VL's output class only (its module differs across versions)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures as Out
    else:
        Out = BaseModelOutputWithPooling
    out = Out(pooler_output=tuple(e for e, _ in rows))
    if rows and rows[0][1] is not None:
        out.deepstack_features = [tuple(d[i] for _, d in rows) for i in range(len(rows[0][1]))]
    return add_audio_features(model, prompts, tie(out, dropped))


def sharded(block) -> bool:
    """Whether `block` is an FSDP2 unit over several ranks (fsdp_units), whose weights each call all-gathers."""
    return isinstance(block, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1


def lockstep(calls: int, block, device) -> int:
    """The most calls of `block` any rank makes now. FSDP2 all-gathers a unit's weights at each call (and again in
    its backward): every rank must call it as often as its peers, or its next all-gather meets theirs of another
    module (NCCL hangs; gloo reports a size mismatch). A block FSDP2 does not shard: `calls` itself."""
    if not sharded(block):
        return calls
    return int(all_reduce(torch.tensor([calls], device=device), op=dist.ReduceOp.MAX).item())


def tie(feats, dropped: list):
    """feats with the padding calls' outputs (`dropped`) added at weight 0 to its first rows: their values change
    nothing, and a backward runs through them as through a peer's real call (FSDP2's gradient reduce-scatters)."""
    if not dropped or not torch.is_grad_enabled():
        return feats
    zero = sum(t.sum() for out in dropped for t in [*out.pooler_output, *(
        t for layer in (getattr(out, "deepstack_features", None) or []) for t in layer)]) * 0.0
    first = feats.pooler_output
    feats.pooler_output = (first[0] + zero.to(first[0].dtype), *first[1:])
    return feats


def piece_rows(prompts: list, piece) -> int:
    """Pixel rows of a piece (video, first, last temporal patch) of encode_videos."""
    p = prompts[piece[0]]
    return len(p.pixel_values_videos) // int(p.video_grid_thw[0, 0]) * (piece[2] - piece[1])


def piece_pixels(prompts: list, piece):
    """The piece's pixel rows: the processors lay a video's rows out temporal patch after temporal patch."""
    p = prompts[piece[0]]
    per_t = len(p.pixel_values_videos) // int(p.video_grid_thw[0, 0])
    return p.pixel_values_videos[piece[1] * per_t:piece[2] * per_t]


def add_audio_features(model, prompts: list, feats):
    """Omni: put every prompt's audio rows on `feats` (the audio encoder run one track at a time, or the cached
    rows); prompts without audio get none. A no-op for models without audio. Under FSDP2 every rank runs the
    audio encoder as often as its peers (lockstep): the extra runs on a silent second of log-mel, dropped."""
    tower = None if family(model) in FRAMES else getattr(media_model(model), "audio_tower", None)
    if tower is None:
        return feats
    own = sum(p.input_features is not None and p.audio_embeds is None for p in prompts)
    num_calls = lockstep(own, tower.layers[0], model.device)  # before any call: the peers' collectives in order
    if any(p.input_features is not None or p.audio_embeds is not None for p in prompts):
        feats.audio_features = tuple(audio_features(model, p.input_features) if p.audio_embeds is None
                                     else p.audio_embeds.to(model.device) for p in prompts)
    silence = torch.zeros(tower.config.num_mel_bins, 100)  # 100 log-mel frames: one second
    dropped = [BaseModelOutputWithPooling(pooler_output=(audio_features(model, silence),))
               for _ in range(num_calls - own)]
    return tie(feats, dropped)


def video_features(model, pixels, grid):
    """The Qwen families' get_video_features over consecutive videos: pooler_output is per-video [rows, hidden],
    Qwen3-VL's deepstack_features per layer per video (transformers before 5.24 leaves each layer's rows whole:
    split here, or a second video would read the first one's rows)."""
    out = media_model(model).get_video_features(pixels, grid, return_dict=True)
    deep = getattr(out, "deepstack_features", None)
    if deep is not None and torch.is_tensor(deep[0]):
        out.deepstack_features = [layer.split([len(rows) for rows in out.pooler_output]) for layer in deep]
    return out


def tower_features(model, pixels, grid):
    """One vision-tower call over consecutive videos -> per-video [rows, hidden] (Qwen3-VL: + DeepStack)."""
    if family(model) not in FRAMES:
        return video_features(model, pixels, grid)
    if family(model) == "vila":  # what its video encoder runs on the frames: tower + projector, [F, rows, hidden]
        per_frame = model.encode_images(pixels.to(model.dtype))
    else:
        per_frame = model.model.get_image_features(pixel_values=pixels).pooler_output  # F x [tokens, hidden]
    frames = torch.stack(list(per_frame)).split(grid[:, 0].tolist())                # per video [F_v, tokens, hidden]
    return BaseModelOutputWithPooling(pooler_output=tuple(f.flatten(0, 1) for f in frames))


def audio_features(model, input_features):
    """Omni: [audio tokens, hidden] for one track's log-mel [mel bins, frames] (an empty [0, hidden] for none)."""
    if input_features is None:
        return torch.zeros(0, model.config.get_text_config().hidden_size, device=model.device, dtype=model.dtype)
    mel = input_features[None].to(model.device, model.dtype)
    lengths = torch.ones(1, mel.shape[-1], dtype=torch.long, device=model.device)
    out = media_model(model).get_audio_features(mel, lengths)
    return out.last_hidden_state


def media_encoders(model) -> list:
    """The modules that turn media into feature rows: frozen by freeze_vision, skipped with an embeddings cache."""
    if family(model) == "vila":
        return [model.vision_tower, model.mm_projector]
    m = media_model(model)
    if family(model) == "llava":
        return [m.vision_tower, m.multi_modal_projector]
    return [m.visual] + ([m.audio_tower] if hasattr(m, "audio_tower") else [])


def encoder_blocks(model) -> list:
    """The media encoders' repeated blocks (FSDP2 wraps each as a unit)."""
    if family(model) == "vila":  # VILA's SigLIP wrapper holds transformers' SiglipVisionModel as .vision_tower
        tower = model.vision_tower.vision_tower
        return list(getattr(tower, "vision_model", tower).encoder.layers)
    m = media_model(model)
    if family(model) == "llava":
        tower = getattr(m.vision_tower, "vision_model", m.vision_tower)  # CLIPVisionModel nests it in older versions
        return list(tower.encoder.layers)
    return [*m.visual.blocks, *(m.audio_tower.layers if hasattr(m, "audio_tower") else [])]


def fsdp_units(model, vision: bool = True) -> list:
    """FSDP2 units: each decoder layer and each media encoder block (the rest stays with the root)."""
    return [*text_model(model).layers, *(encoder_blocks(model) if vision else [])]


# The parts of a block that eager mode runs as chains of small memory-bound kernels, by name (BLOCK_PARTS' values
# are the attribute names in the decoder layers and the Qwen vision blocks):
#   norms             an RMSNorm is a cast to fp32, a square, a mean, an rsqrt, two products and a cast back, each a
#                     pass over S x hidden
#   mlp               a gated MLP's activation and product: two more passes over S x ffn
#   vision_attention  the Qwen vision rotary embedding: q and k cast to fp32, four products, a rotation, two sums,
#                     cast back (over 32k patches x 1,280 at 256 frames); window_attention itself stays eager
# all repeated in the recompute and again in backward. On the lent H100 the 256-frame update spent ~0.5 s of its
# 1.9 s of GPU time in such kernels (aten::mul, copy_, _to_copy).
BLOCK_PARTS = {"norms": ("input_layernorm", "post_attention_layernorm", "norm1", "norm2"), "mlp": ("mlp",),
               "vision_attention": ("attn",)}


def block_part_names(parts: str) -> list:
    """"norms,mlp" -> the block attributes BLOCK_PARTS names; an unknown part is an error (on any device)."""
    names = [name for part in parts.split(",") if part.strip() for name in BLOCK_PARTS.get(part.strip(), [None])]
    if None in names:
        raise ValueError(f"compile_blocks {parts!r}: parts are {', '.join(BLOCK_PARTS)}, comma-separated")
    return names


def compile_blocks(model, parts: str = "norms,mlp", backend: str = "inductor"):
    """torch.compile the named BLOCK_PARTS ("norms,mlp,vision_attention"; "" none) of every decoder layer and media
    encoder block, each module on its own, so their elementwise chains become a few fused kernels. FlexAttention
    has its own compiled kernel, window_attention runs eager (torch.compiler.disable: its windows' lengths are read
    on the host), and FSDP2's hooks and the activation checkpointing stay on the blocks, outside the compiled
    code. dynamic=True: one kernel for every sequence length (a GRPO step's lengths change every step; static
    shapes would recompile each time until dynamo gives up). A chunked MLP (set_checkpointing's mlp_chunk) is
    left eager: its forward is the chunk loop."""
    names = block_part_names(parts)
    for block in fsdp_units(model):
        for name in names:
            part = getattr(block, name, None)
            if isinstance(part, torch.nn.Module) and "forward" not in vars(part):
                part.compile(backend=backend, dynamic=True)


def encoder_params(model) -> set:
    return {p for m in media_encoders(model) for p in m.parameters()}


def select_videos(feats, index: list):
    """Features for a list of video indices (repeats allowed: n samples of one prompt share one encoding)."""
    if feats is None:  # text-only prompts
        return None
    out = type(feats)(pooler_output=tuple(feats.pooler_output[i] for i in index))
    if getattr(feats, "deepstack_features", None) is not None:
        out.deepstack_features = [tuple(layer[i] for i in index) for layer in feats.deepstack_features]
    if getattr(feats, "audio_features", None) is not None:
        out.audio_features = tuple(feats.audio_features[i] for i in index)
    return out


def embed_inputs(model, input_ids, feats=None):
    """Token embeddings with the video features written into the <|video_pad|> positions, in order; for
    Qwen3-VL also the DeepStack inputs (the features of early vision layers, added to early decoder layers).
    The same explicit recipe in every transformers 5.x (no reliance on newer forward arguments)."""
    emb = input_embeddings(model)(input_ids)
    if feats is None:
        return emb, {}

    def write_rows(emb, mask, rows, kind):  # rows [tokens, hidden] into the positions where mask [B, S] is True
        rows = torch.cat(rows).to(emb.dtype)
        if rows.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} {kind} tokens in the input but {rows.shape[0]} {kind} feature rows")
        return emb.masked_scatter(mask[..., None].expand_as(emb), rows)
    mask = input_ids == media_token_id(model)                        # [B, S]
    emb = write_rows(emb, mask, feats.pooler_output, "video")
    if getattr(feats, "audio_features", None) is not None:          # Omni: the audio rows, the same way
        emb = write_rows(emb, input_ids == model.config.audio_token_id, feats.audio_features, "audio")
    deepstack = getattr(feats, "deepstack_features", None)
    if deepstack is None:
        return emb, {}
    return emb, {"visual_pos_masks": mask,
                 "deepstack_visual_embeds": [torch.cat(layer).to(emb.dtype) for layer in deepstack]}


def decoder_hidden(model, input_ids, positions, feats=None, attention_mask=None, cache=None):
    """Decoder hidden states [B, S, H] (no lm_head: logits are made only where they are needed). A given
    `cache` (DynamicCache / StaticCache) is filled in place."""
    emb, extra = embed_inputs(model, input_ids, feats)
    lm = text_model(model)
    if family(model) not in MROPE:
        positions = positions[0]                                     # 1-D rope: the rows are equal
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"  # 5.24 / 5.17
    offload = getattr(model, "offload_activations", False) and torch.is_grad_enabled()  # set_checkpointing(offload)
    with torch.autograd.graph.save_on_cpu(pin_memory=emb.is_cuda) if offload else contextlib.nullcontext():
        out = lm(inputs_embeds=emb, position_ids=positions, attention_mask=attention_mask, use_cache=cache is not None,
                 **{cache_kw: cache}, **extra)
    return out.last_hidden_state, cache


def masked_logits(model, hidden, suppress_ids, temperature: float = 1.0):
    """fp32 logits / T with the vision and pad tokens removed from the vocabulary (as at sampling time)."""
    logits = output_head(model)(hidden).float()
    if len(suppress_ids):  # a list, or a tensor already on the device (a list is copied there: a wait in a loop)
        logits.index_fill_(-1, torch.as_tensor(suppress_ids, device=logits.device), float("-inf"))
    return logits / temperature


def token_logprobs(model, hidden, labels, suppress_ids, temperature=1.0, chunk=1024, with_entropy=False):
    """log p(label) for rows of `hidden` [N, H] (N = response tokens only), lm_head applied `chunk` rows at a
    time in fp32 and recomputed in backward (checkpointed), so the memory is one chunk of [chunk, vocab]
    logits, never [sequence, vocab]."""
    def one_chunk(h, y):
        logp = torch.log_softmax(masked_logits(model, h, suppress_ids, temperature), dim=-1)
        lp = logp.gather(-1, y[:, None])[:, 0]
        ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) if with_entropy else torch.zeros_like(lp)
        return lp, ent
    outs = []
    for s in range(0, max(hidden.shape[0], 1), chunk):  # an empty shard still runs (stays in the graph, for SP)
        h, y = hidden[s:s + chunk], labels[s:s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(torch.utils.checkpoint.checkpoint(one_chunk, h, y, use_reentrant=False))
        else:
            outs.append(one_chunk(h, y))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


@dataclass
class Packed:
    """Right-padded prompt+response sequences: causal attention then needs no mask (pads come last)."""
    input_ids: torch.Tensor         # [B, S]
    positions: torch.Tensor         # [3, B, S]
    response_mask: torch.Tensor     # [B, S] bool: True at positions that *predict* a response token
    labels: torch.Tensor            # [B, S] the next token (valid where response_mask)


def pack(sequences: list, pad_id: int) -> Packed:
    """sequences: (prompt ids [P], prompt positions [3, P], response ids [R]) triples."""
    S = max(len(p) + len(r) for p, _, r in sequences)
    B = len(sequences)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    pos = torch.zeros(3, B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.bool)
    labels = torch.zeros(B, S, dtype=torch.long)
    for b, (p, ppos, r) in enumerate(sequences):
        r = torch.as_tensor(r, dtype=torch.long)
        P, R = len(p), len(r)
        ids[b, :P], ids[b, P:P + R] = p, r
        pos[:, b, :P], pos[:, b, P:P + R] = ppos, continue_positions(ppos, R)
        mask[b, P - 1:P + R - 1] = True        # position P-1+j predicts response token j
        labels[b, P - 1:P + R - 1] = r
    return Packed(ids, pos, mask, labels)


def response_logprobs(model, packed: Packed, feats, suppress_ids, temperature=1.0, chunk=1024, with_entropy=False):
    """Flat log-probs (and entropies) of all response tokens of a packed batch, in row-major order."""
    dev = output_head(model).weight.device
    with record_function("decoder"):
        hidden, _ = decoder_hidden(model, packed.input_ids.to(dev), packed.positions.to(dev), feats)
    mask = packed.response_mask.to(dev)
    with record_function("log-probs"):
        return token_logprobs(model, hidden[mask], packed.labels.to(dev)[mask], suppress_ids, temperature, chunk,
                              with_entropy)

@dataclass
class PackedGroups:
    """A group's prompt once, then each of its responses: one row [prompt | response_1 | ... | response_k] per
    distinct prompt. A response sees the whole prompt and itself (never another response) and its positions
    continue from the prompt's end, as in its own sequence, so every log-prob equals that of `pack`'s
    prompt+response row while the prompt runs through the decoder once per group instead of once per response.
        row g:   p p p p p | a a a | b b | pad
        segment: 0 0 0 0 0 | 1 1 1 | 2 2 | -1        key j is visible to query i iff j <= i and
                                                     (segment[j] == 0 or segment[j] == segment[i])
    A response's first token is predicted by the prompt's last position (shared by every response of the row),
    the others by the response's own previous position: `pred_rows` lists them flat, in the order of the
    input sequences (so the output lines up with `pack` + `response_logprobs`)."""
    input_ids: torch.Tensor         # [G, S]
    positions: torch.Tensor         # [3, G, S]
    segments: torch.Tensor          # [G, S] 0 = prompt, k = the row's k-th response, -1 = padding
    pred_rows: torch.Tensor         # [N] index into the [G * S] hidden rows that predict each response token
    labels: torch.Tensor            # [N] the response tokens, sequence after sequence


def pack_groups(sequences: list, where: list, prompts: list, pad_id: int) -> PackedGroups:
    """sequences: (response ids) per sampled response; where[i]: the index into `prompts` of sequence i's prompt;
    prompts: (prompt ids [P], prompt positions [3, P]) per distinct prompt, one row each, in that order."""
    rows = [[(ids, pos)] for ids, pos in prompts]       # each row: the prompt, then its responses in order
    lengths = [len(ids) for ids, _ in prompts]
    place = []                                          # (row, offset) of each sequence's response
    for r, g in zip(sequences, where):
        place.append((g, lengths[g]))
        rows[g].append((torch.as_tensor(r, dtype=torch.long), continue_positions(prompts[g][1], len(r))))
        lengths[g] += len(r)
    G, S = len(prompts), max(lengths)
    ids = torch.full((G, S), pad_id, dtype=torch.long)
    pos = torch.zeros(3, G, S, dtype=torch.long)
    seg = torch.full((G, S), -1, dtype=torch.long)
    for g, parts in enumerate(rows):
        at = 0
        for k, (part_ids, part_pos) in enumerate(parts):
            n = len(part_ids)
            ids[g, at:at + n], pos[:, g, at:at + n], seg[g, at:at + n] = part_ids, part_pos, k
            at += n
    pred, labels = [], []
    for r, (g, at) in zip(sequences, place):
        P = len(prompts[g][0])
        if len(r):  # token 0 from the prompt's end, token j from the response's own position j - 1
            pred += [g * S + P - 1] + [g * S + at + j for j in range(len(r) - 1)]
        labels += list(r)
    return PackedGroups(ids, pos, seg, torch.tensor(pred, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def group_visible(q, k, seg_q, seg_k):
    """The rule of PackedGroups, written once for both masks below: key position k is visible to query position q
    iff k <= q and the key is in the prompt (segment 0) or in the query's own response; padding keys never."""
    return (k <= q) & ((seg_k == 0) | (seg_k == seg_q)) & (seg_k >= 0)


def group_attention_mask(segments: torch.Tensor, dtype) -> torch.Tensor:
    """[G, 1, S, S] additive mask (0 = visible, dtype's min = hidden) of group_visible. O(S^2) memory: the CPU /
    reference path; padding rows see the prompt (never a row of only hidden keys: no NaN)."""
    pos = torch.arange(segments.shape[1])
    visible = group_visible(pos[:, None], pos[None, :], segments[:, :, None], segments[:, None, :])   # [G, S, S]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def group_block_mask(segments: torch.Tensor, device, block: int = 128):
    """group_visible as a FlexAttention BlockMask: per block x block tile of the [S, S] mask, "full" (every pair
    visible: the kernel applies no mask there), "partial" (some: the kernel evaluates group_visible) or empty
    (skipped), so a 70k-token group costs no O(S^2) memory. Used with the "group_flex" attention function.

    Built here from the rule's shape, in plain tensor ops, not by create_block_mask: uncompiled, that one first
    materialises the whole S x S mask (9.1 GiB at 35k tokens: out of memory beside a 3B model's AdamW state), and
    compiled, one of its kernels (a sort over the key blocks) spent over 5 minutes in Triton's LLVM / ptxas on the
    lent H100 at 256 frames (torch 2.11), with the GPU idle. tests/test_vlm.py checks this equals create_block_mask.

    What a query q sees (group_visible) is two runs of keys: the prompt up to q, [0, min(P, q + 1)), and, for a
    response token, its own response up to q, [start(q), q + 1). So the visible keys of a key block [lo, hi) are
        count(q, block) = overlap([0, min(P, q+1)), [lo, hi)) + overlap([start(q), q+1), [lo, hi))
    and a tile is full iff count = block for all its queries, empty iff count = 0 for all of them. Rows past S
    (the last tile's padding) count 0, as create_block_mask pads them: a ragged last tile is never full."""
    seg = segments.to(device)
    G, S = seg.shape
    n = -(-S // block)                                                        # tiles per side
    padded = torch.nn.functional.pad(seg, (0, n * block - S), value=-1)        # [G, n*block]
    q = torch.arange(n * block, device=device)
    real = q < S
    prompt_len = (padded == 0).sum(1, keepdim=True)                            # [G, 1]: the prompt opens the row
    first = torch.ones_like(padded, dtype=torch.bool)
    first[:, 1:] = padded[:, 1:] != padded[:, :-1]                             # where each segment starts
    start = torch.where(first, q, 0).cummax(1).values                         # [G, n*block]: start(q)
    own = padded > 0                                                           # a response token
    runs = [(torch.zeros_like(start), torch.minimum(prompt_len, q + 1)),       # the prompt up to q
            (torch.where(own, start, 0), torch.where(own, q + 1, 0))]          # its own response up to q
    lo = torch.arange(n, device=device) * block                               # key tile i: [lo_i, hi_i)
    hi = (lo + block).clamp(max=S)
    any_visible = torch.zeros(G, n, n, dtype=torch.bool, device=device)        # [G, query tile, key tile]
    all_visible = torch.zeros(G, n, n, dtype=torch.bool, device=device)
    step = max(1, 2 ** 22 // (G * n * block))                                  # query tiles at a time: bounded memory
    for t in range(0, n, step):
        rows = slice(t * block, min(t + step, n) * block)
        count = sum((torch.minimum(b[:, rows, None], hi) - torch.maximum(a[:, rows, None], lo)).clamp(min=0)
                    for a, b in runs)                                          # [G, rows, n]
        count = count * real[rows, None]                                       # rows past S see nothing
        count = count.view(G, -1, block, n)                                    # [G, tiles, block, n]
        any_visible[:, t:t + step] = (count > 0).any(2)
        all_visible[:, t:t + step] = (count == block).all(2)
    partial = any_visible & ~all_visible

    def listed(tiles):  # [G, n, n] bool -> ([G, 1, n] how many, [G, 1, n, n] which key tiles, listed ones first)
        order = torch.argsort(tiles.int(), dim=-1, descending=True, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[:, None], order.int()[:, None]

    return BlockMask.from_kv_blocks(*listed(partial), *listed(all_visible), BLOCK_SIZE=block, seq_lengths=(S, S),
                                    mask_mod=lambda b, h, q, k: group_visible(q, k, seg[b, q], seg[b, k]))


_compiled_flex = None  # torch.compile(flex_attention), made on first GPU use (fused kernel, forward and backward)


def group_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "group_flex": q (B,H,S,D), k/v (B,Hkv,S,D), attention_mask a BlockMask
    (group_block_mask) -> ((B,S,H,D), None). Compiled on the GPU; on the CPU the unfused reference (forward only
    in torch 2.14: no backward there)."""
    global _compiled_flex
    fn, options = flex_attention, None
    if query.is_cuda:
        _compiled_flex = _compiled_flex or torch.compile(flex_attention)
        # always the training kernel: inductor would pick its decoding kernel (meant for a few new queries against
        # a long cache) for any query shorter than 128 tokens, and that one found no valid configuration on the
        # H100 for our GQA shapes (NoValidChoicesError); a packed group is queries = keys, never decoding
        fn, options = _compiled_flex, {"FORCE_USE_FLEX_ATTENTION": True}
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
             kernel_options=options)
    return out.transpose(1, 2).contiguous(), None


def group_flex_mask(*args, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry for "group_flex": a BlockMask goes through untouched (transformers returns a
    4-D mask as it is before asking this); anything else is an error, never a silently dropped mask."""
    raise ValueError("group_flex attention takes the BlockMask of vlm.group_block_mask as attention_mask")


AttentionInterface.register("group_flex", group_flex_attention)
AttentionMaskInterface.register("group_flex", group_flex_mask)


def group_logprobs(model, packed: PackedGroups, feats, suppress_ids, temperature=1.0, chunk=1024,
                   with_entropy=False):
    """Flat log-probs (and entropies) of every response token, in the order of pack_groups' sequences. feats: one
    entry per row (per distinct prompt), not per response. The mask follows the language model's attention
    function: a BlockMask under "group_flex" (the GPU path, vlm.use_attention), else the dense additive mask."""
    dev = output_head(model).weight.device
    if model.config.get_text_config()._attn_implementation == "group_flex":
        mask = group_block_mask(packed.segments, dev)
    else:
        mask = group_attention_mask(packed.segments, input_embeddings(model).weight.dtype).to(dev)
    with record_function("decoder"):
        hidden, _ = decoder_hidden(model, packed.input_ids.to(dev), packed.positions.to(dev), feats,
                                   attention_mask=mask)
    rows = hidden.flatten(0, 1)[packed.pred_rows.to(dev)]
    with record_function("log-probs"):
        return token_logprobs(model, rows, packed.labels.to(dev), suppress_ids, temperature, chunk, with_entropy)


def use_attention(model, name: str):
    """Set the language model's attention function (the vision tower keeps its own); returns the previous."""
    previous = model.config.get_text_config()._attn_implementation
    if previous != name and family(model) == "vila":  # its decoder is a causal LM of its own
        model.llm.set_attn_implementation(name)
    elif previous != name:
        model.set_attn_implementation({"text_config": name,
                                       "vision_config": model.config.vision_config._attn_implementation})
    return previous


# ----------------------------------------------------------------------------------------------------------
# activation memory: what the decoder keeps for backward (train_grpo.py's checkpoint_mode / mlp_chunk; bench.py)

def set_checkpointing(model, mode: str = "full", mlp_chunk: int = 0, attention_layers: int = 0):
    """Activation checkpointing of the decoder layers: a layer keeps only its input and reruns its forward in
    backward. Modes:
      none       keep everything (fastest, most memory)
      full       recompute everything
      attention  also keep the attention kernel's outputs (in the first `attention_layers` layers; 0 = all), so
                 backward recomputes the projections but not the O(S^2) attention: at 128k tokens on a 3B model
                 attention is 3/4 of the FLOPs, and its output costs S x hidden x 2 bytes a layer
      offload    full, and the kept layer inputs (S x hidden x 2 bytes a layer) wait in pinned host memory
                 (decoder_hidden wraps the forward in save_on_cpu; the layers use reentrant checkpointing, whose
                 inputs are saved tensors)
    mlp_chunk > 0: every MLP runs over the sequence `mlp_chunk` tokens at a time, each chunk recomputed in backward,
    so its [S, ffn] intermediates (the largest tensors at long S) exist for one chunk at a time."""
    if mode not in ("none", "full", "attention", "offload"):
        raise ValueError(f"checkpoint mode {mode!r}: choose none, full, attention or offload")
    model.offload_activations = mode == "offload"
    layers = text_model(model).layers
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (5.2x; the old names warn there)
    renamed = hasattr(model, "activation_checkpointing_enable")
    if mode == "none":
        model.activation_checkpointing_disable() if renamed else model.gradient_checkpointing_disable()
    elif renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": mode == "offload"})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "offload"})
    if mode == "attention":
        keep = partial(create_selective_checkpoint_contexts, keep_attention_outputs)
        for layer in layers[:attention_layers or len(layers)]:
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False, context_fn=keep)
    for layer in layers:
        if mlp_chunk > 0:
            layer.mlp.forward = partial(chunked_mlp, type(layer.mlp).forward.__get__(layer.mlp), mlp_chunk)
        elif "forward" in vars(layer.mlp):
            del layer.mlp.forward


def keep_attention_outputs(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: save what the fused attention kernels return, recompute everything else."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    keep = getattr(op, "_opname", getattr(op, "__name__", "")).split(".")[0] in names
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def chunked_mlp(forward, chunk: int, x):
    """MLP over the sequence in chunks, each checkpointed: out[:, i:i+c] = mlp(x[:, i:i+c]) (the MLP is per token)."""
    if not torch.is_grad_enabled() or x.shape[-2] <= chunk:
        return forward(x)
    return torch.cat([checkpoint(forward, x[..., i:i + chunk, :], use_reentrant=False)
                      for i in range(0, x.shape[-2], chunk)], dim=-2)
