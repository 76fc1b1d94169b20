"""
The vision-language policy as plain functions: loading a checkpoint, turning (video, question) into model
inputs, and the forward from vision tower to log-probs at response positions only. rollout.py (sampling),
train_grpo.py (training), sp.py and cache_embeddings.py all go through these, so that rollout and training
see exactly the same inputs.

Models: Qwen2.5-VL and Qwen3-VL through transformers' own classes and processors (a hub id or a local path).
Inputs: frames decoded by data/video.py are handed to the processor *with their metadata* (without it
Qwen2.5-VL silently assumes 24 fps); 3-D rope positions come from `rope_positions` below, which follows the
original Qwen2.5-VL rule (transformers 5.x starts text after a video at a different position), and are passed
explicitly everywhere, so that rollout and training log-probs agree.
"""
import inspect
from dataclasses import dataclass

import torch


THINK_PROMPT = (
    "You are a helpful assistant. The user asks a question, and then you solves it.\n\n"
    "Please first think deeply about the question based on the given video, and then provide the final answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n\n"
    " Question: {question}")  # Long-RL's system_prompt_thinking, verbatim
PLAIN_PROMPT = "{question}\nPut the final answer inside <answer> </answer> tags."
# model_type -> frame size multiple (patch size x spatial merge)
SUPPORTED = {"qwen2_5_vl": 28, "qwen3_vl": 32}
SUPPRESS_TOKENS = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]


# ----------------------------------------------------------------------------------------------------------
# loading

def load_model(path: str, dtype: str = "auto", attn_implementation: str = "sdpa", device: str = "cpu"):
    """(model, processor) for a supported VLM checkpoint folder or hub id."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED:
        raise ValueError(f"{path}: model type {config.model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            print("flash-attn is not installed: using PyTorch SDPA attention")
            attn_implementation = "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype),
                                                        attn_implementation=attn_implementation).to(device)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def family(model) -> str:
    return model.config.model_type


def token_ids(processor, tokens) -> list:
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    return [i for i in ids if i is not None and i != processor.tokenizer.unk_token_id]


def eos_ids(model, processor) -> list:
    """Stop tokens: the tokenizer's eos plus the generation config's (Qwen: <|im_end|> and <|endoftext|>)."""
    ids = {processor.tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)


def suppress_ids(model, processor) -> list:
    """Token ids that are never sampled nor scored: the vision placeholders and the pad token (a sampled
    <|video_pad|> would break re-scoring the response), unless one of them is also a stop token."""
    stop = eos_ids(model, processor)
    return [i for i in token_ids(processor, SUPPRESS_TOKENS) + [processor.tokenizer.pad_token_id] if i not in stop]


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


def prompt_text(processor, question: str, think: bool) -> str:
    user = (THINK_PROMPT if think else PLAIN_PROMPT).format(question=question)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_prompt(model, processor, question: str, video, think: bool = True, sample=None) -> Prompt:
    """`video` is a data.video.SampledVideo (frames already sampled and resized)."""
    text = prompt_text(processor, question, think)
    out = processor(text=[text], videos=[video.frames], video_metadata=[video.metadata()], do_sample_frames=False,
                    return_tensors="pt")
    ids = out["input_ids"][0]
    sec = out.get("second_per_grid_ts")
    positions = rope_positions(model.config, ids, out["video_grid_thw"], None if sec is None else sec.tolist())
    video_id = model.config.video_token_id
    return Prompt(input_ids=ids, positions=positions, pixel_values_videos=out["pixel_values_videos"],
                  video_grid_thw=out["video_grid_thw"], num_video_tokens=int((ids == video_id).sum()),
                  text=text, frames=video, sample=sample)


def build_prompt_cached(model, processor, question: str, entry, think: bool = True, sample=None) -> Prompt:
    """A Prompt from a cache_embeddings.py entry, without decoding the video: the processor's own
    replace_video_token expands the placeholder from the stored grid and frame metadata (Qwen2.5-VL: N
    <|video_pad|>; Qwen3-VL: a timestamp and a vision block per temporal group), exactly as for frames."""
    from transformers.video_utils import VideoMetadata
    text = prompt_text(processor, question, think)
    video = {"video_grid_thw": entry.video_grid_thw, "video_metadata": [VideoMetadata(**entry.meta["frames"])]}
    expanded, _ = processor.get_text_with_replacements([text], videos_replacements=[
        processor.replace_video_token(video, video_idx=0)])
    ids = torch.tensor(processor.tokenizer(expanded)["input_ids"][0])
    sec = entry.second_per_grid_ts
    positions = rope_positions(model.config, ids, entry.video_grid_thw, None if sec is None else sec.tolist())
    return Prompt(input_ids=ids, positions=positions, pixel_values_videos=None, video_grid_thw=entry.video_grid_thw,
                  num_video_tokens=int((ids == model.config.video_token_id).sum()), text=text, sample=sample,
                  video_features=(entry.embeds, entry.deepstack))


def load_video(path: str, cfg, model_type: str):
    """Decode and sample one video for a model family (frame sides a multiple of its patch x merge)."""
    from data.video import sample_frames
    fps = cfg.fps or None  # fps, when given, takes precedence over num_frames
    return sample_frames(path, fps=fps, num_frames=None if fps else (cfg.num_frames or None), max_frames=cfg.max_frames,
                         max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels, size_multiple=SUPPORTED[model_type])


def rope_positions(config, input_ids: torch.Tensor, video_grid_thw: torch.Tensor, second_per_grid=None):
    """3-D rope positions [3, L] of one unpadded sequence, by the original Qwen2.5-VL rule:
        text token:  t = h = w = previous max + 1
        video block: t = start + floor(i_t * second_per_grid * tokens_per_second), h = start + i_h, w = start + i_w
                     (grid in merged tokens, start = previous max + 1)
    Qwen3-VL puts each temporal group in its own block (timestamps between them), with i_t = 0.
    Text after the last vision block restarts at max + 1; that is where transformers 5.x differs."""
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

def encode_videos(model, prompts: list, max_patches: int = 65536):
    """Run the vision tower over the videos of `prompts` (those with cached video_features skip it), at most
    `max_patches` patches per call so that the tower's memory stays bounded for long videos; returns an object
    like get_video_features': pooler_output is a tuple of per-video [tokens, hidden] tensors (Qwen3-VL also
    carries deepstack_features, one tuple per DeepStack layer)."""
    rows = [None] * len(prompts)  # per video: (embeds, [deepstack per layer] or None)
    live = [i for i, p in enumerate(prompts) if p.video_features is None]
    while live:
        group, patches = [], 0    # consecutive videos within the patch budget (always at least one)
        while live and (not group or patches + len(prompts[live[0]].pixel_values_videos) <= max_patches):
            patches += len(prompts[live[0]].pixel_values_videos)
            group.append(live.pop(0))
        pixels = torch.cat([prompts[i].pixel_values_videos for i in group]).to(model.device)
        grid = torch.cat([prompts[i].video_grid_thw for i in group]).to(model.device)
        out = model.model.get_video_features(pixels, grid, return_dict=True)
        deep = getattr(out, "deepstack_features", None)
        for k, i in enumerate(group):
            rows[i] = (out.pooler_output[k], None if deep is None else [layer[k] for layer in deep])
    for i, p in enumerate(prompts):
        if p.video_features is not None:  # from the embeddings cache (cache_embeddings.py)
            emb, deep = p.video_features
            rows[i] = (emb.to(model.device), None if deep is None else list(deep.to(model.device)))
    if family(model) == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures as Out
    else:
        from transformers.modeling_outputs import BaseModelOutputWithPooling as Out
    out = Out(pooler_output=tuple(e for e, _ in rows))
    if rows and rows[0][1] is not None:
        out.deepstack_features = [tuple(d[i] for _, d in rows) for i in range(len(rows[0][1]))]
    return out


def select_videos(feats, index: list):
    """Features for a list of video indices (repeats allowed: n samples of one prompt share one encoding)."""
    if feats is None:  # text-only prompts
        return None
    out = type(feats)(pooler_output=tuple(feats.pooler_output[i] for i in index))
    if getattr(feats, "deepstack_features", None) is not None:
        out.deepstack_features = [tuple(layer[i] for i in index) for layer in feats.deepstack_features]
    return out


def embed_inputs(model, input_ids, feats=None):
    """Token embeddings with the video features written into the <|video_pad|> positions, in order; for
    Qwen3-VL also the DeepStack inputs (the features of early vision layers, added to early decoder layers).
    The same explicit recipe in every transformers 5.x (no reliance on newer forward arguments)."""
    emb = model.model.get_input_embeddings()(input_ids)
    if feats is None:
        return emb, {}
    mask = input_ids == model.config.video_token_id                  # [B, S]
    rows = torch.cat(feats.pooler_output).to(emb.dtype)              # [video tokens, hidden]
    if rows.shape[0] != int(mask.sum()):
        raise ValueError(f"{int(mask.sum())} video tokens in the input but {rows.shape[0]} video feature rows")
    emb = emb.masked_scatter(mask[..., None].expand_as(emb), rows)
    deepstack = getattr(feats, "deepstack_features", None)
    if deepstack is None:
        return emb, {}
    return emb, {"visual_pos_masks": mask,
                 "deepstack_visual_embeds": [torch.cat(layer).to(emb.dtype) for layer in deepstack]}


def decoder_hidden(model, input_ids, positions, feats=None, attention_mask=None, cache=None):
    """Decoder hidden states [B, S, H] (no lm_head: logits are made only where they are needed). A given
    `cache` (DynamicCache / StaticCache) is filled in place."""
    emb, extra = embed_inputs(model, input_ids, feats)
    lm = model.model.language_model
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"  # 5.24 / 5.17
    out = lm(inputs_embeds=emb, position_ids=positions, attention_mask=attention_mask, use_cache=cache is not None,
             **{cache_kw: cache}, **extra)
    return out.last_hidden_state, cache


def masked_logits(model, hidden, suppress_ids, temperature: float = 1.0):
    """fp32 logits / T with the vision and pad tokens removed from the vocabulary (as at sampling time)."""
    logits = model.lm_head(hidden).float()
    if suppress_ids:
        logits[..., suppress_ids] = float("-inf")
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
    dev = model.lm_head.weight.device
    hidden, _ = decoder_hidden(model, packed.input_ids.to(dev), packed.positions.to(dev), feats)
    mask = packed.response_mask.to(dev)
    return token_logprobs(model, hidden[mask], packed.labels.to(dev)[mask], suppress_ids, temperature, chunk,
                          with_entropy)

def use_attention(model, name: str):
    """Set the language model's attention function (the vision tower keeps its own); returns the previous."""
    previous = model.config.get_text_config()._attn_implementation
    if previous != name:
        model.set_attn_implementation({"text_config": name, "vision_config": model.config.vision_config._attn_implementation})
    return previous
