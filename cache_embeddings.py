"""
Run the frozen vision tower (merger included; Qwen3-VL's DeepStack features too) over a dataset once and store
its outputs, so that GRPO steps neither decode videos nor run the tower (cf. nanoGPT's data/*/prepare.py).

    python cache_embeddings.py --model=PATH --data=train.jsonl --out=cache/ --num_frames=64
    torchrun --standalone --nproc_per_node=8 cache_embeddings.py --model=PATH --data=train.jsonl --out=cache/
    python train_grpo.py ... --embeddings_cache=cache/ --freeze_vision=true   # readers: train_grpo.py, rollout.py

Cache key: sha256 of (absolute video path, file size, mtime in ns, sampling config {fps, num_frames, max_frames,
max_pixels, min_pixels}, weights = a fingerprint of the media encoders' weights as used). The fingerprint, not the
model folder, names the tower: a run that loads other tower weights over its --model (train_grpo.py --init_from of
an SFT run that trained the tower), or new weights saved into the cached folder, no longer match its entries, and
a cache built from any folder with this run's tower weights (merge.py's output of the SFT run) is valid. It hashes
the weights rounded to bf16, so a cache built in bf16 (dtype=auto on a GPU) serves an fp32 reader. Layout:
OUT/<sha256(video path)[:16]>/<key>.safetensors, one file per video, all entries of a video in one folder, with
    embeds [tokens, hidden]   deepstack [layers, tokens, hidden] (Qwen3-VL)   video_grid_thw [1, 3]
    second_per_grid_ts [1] (Qwen2.5-VL)   audio [tokens, hidden] + audio_mel_frames [1] (Qwen2.5-Omni with sound)
and as JSON in the safetensors metadata ("longrl"): model type, hidden size, weights fingerprint, sampling config,
the model id it was built from (for messages), the video's path/size/mtime and its frame metadata
(total_num_frames, fps, frames_indices, duration), which is all that vlm.build_prompt_cached needs to rebuild the
prompt without decoding the video. `load_cached` returns None for a video with no entry (the caller decodes it
live and counts a miss) and raises a ValueError for a leftover made with another tower, another sampling or
before the video changed. Rank r of W encodes videos r::W; existing entries are skipped (a re-run resumes), bad
videos are skipped and reported; files are written under a temporary name and renamed, so an interrupted run
leaves no truncated entry.
The entries are outputs of a FROZEN tower: train_grpo.py refuses --embeddings_cache with freeze_vision=false.
"""
import glob
import hashlib
import json
import os
import time
import weakref
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tqdm import tqdm

from common import all_reduce, exit_distributed, init_distributed, print0
from configurator import parse_config
from data.datasets import load_jsonl
from data.video import FrameSampling
from vlm import (FRAMES, build_prompt_frames, build_prompt_omni, encode_videos, family, load_model, load_video,
                 media_encoders, video_features, video_kwargs)

FORMAT = 2  # bump when the layout changes: older entries then fail loudly instead of being misread (2: weights)
WHY = {"format": "an older cache format", "model_type": "another model family",
       "hidden_size": "another hidden size", "sampling": "another frame sampling",
       "video": "the video file changed since it was cached",
       "weights": "other vision-tower weights"}  # --init_from a run that trained it, new weights in the folder


@dataclass
class CachedVideo:
    embeds: torch.Tensor                # [tokens, hidden]: the merger's output, one row per video token
    deepstack: torch.Tensor             # [layers, tokens, hidden] (Qwen3-VL) or None
    video_grid_thw: torch.Tensor        # [1, 3] in patches, as the processor returns it
    second_per_grid_ts: torch.Tensor    # [1] (Qwen2.5-VL) or None
    audio: torch.Tensor = None          # [audio tokens, hidden] (Qwen2.5-Omni, a video with sound) or None
    audio_mel_frames: torch.Tensor = None  # [1] log-mel frames of that track (rebuilds the audio/video layout)
    meta: dict = None                   # the JSON metadata described in the module docstring
    path: str = ""                      # the entry's file


def model_id(model) -> str:
    """The folder (absolute) or hub id the model was loaded from: recorded in each entry for its error messages
    (the weights fingerprint below, not this, says whether an entry fits: --init_from loads other weights)."""
    name = model.config._name_or_path
    return os.path.abspath(name) if os.path.isdir(name) else name


_FINGERPRINTS = weakref.WeakKeyDictionary()  # model -> (state of its encoder tensors, fingerprint): once a run


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """sha256 over the media encoders' tensors (vlm.media_encoders: the vision tower and merger, Omni's audio
    encoder), each its shape and its values rounded to bf16: a bf16 and an fp32 copy of the same checkpoint agree.
    Computed once per model and again only if a tensor was replaced or changed in place since (load_model_weights
    after a first lookup): about 2 s on one CPU core for a 0.67B-parameter tower. The tower must be whole on this
    process (it is with an embeddings cache: policy.build_policy keeps it out of FSDP)."""
    tensors = [t for m in media_encoders(model) for t in m.state_dict(keep_vars=True).values()]
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)  # _version counts in-place writes (copy_, add_)
    if model in _FINGERPRINTS and _FINGERPRINTS[model][0] == stamp:
        return _FINGERPRINTS[model][1]
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy())  # numpy has no bf16
    _FINGERPRINTS[model] = (stamp, h.hexdigest())
    return h.hexdigest()


def sampling_config(cfg) -> dict:
    """The fields that decide which frames are sampled and at what size (num_frames is unused when fps is set)."""
    return {"fps": float(cfg.fps), "num_frames": 0 if cfg.fps else int(cfg.num_frames),
            "max_frames": int(cfg.max_frames), "max_pixels": int(cfg.max_pixels), "min_pixels": int(cfg.min_pixels)}


def expected_meta(video_path: str, cfg, model) -> dict:
    """What an entry for this video must say to be valid for this run (os.stat raises for a missing file)."""
    st = os.stat(video_path)
    return {"format": FORMAT, "model_type": family(model), "hidden_size": model.config.get_text_config().hidden_size,
            "weights": weights_fingerprint(model), "sampling": sampling_config(cfg),
            "video": {"path": os.path.abspath(video_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}}


def cache_key(want: dict) -> str:
    """sha256 of (absolute video path, size, mtime, sampling config, tower weights fingerprint)."""
    blob = json.dumps({k: want[k] for k in ("video", "sampling", "weights")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_path(cache_dir: str, want: dict) -> str:
    folder = hashlib.sha256(want["video"]["path"].encode()).hexdigest()[:16]  # every entry of one video
    return os.path.join(cache_dir, folder, cache_key(want) + ".safetensors")


def read_entry(path: str) -> CachedVideo:
    with safe_open(path, "pt") as f:
        meta, t = json.loads(f.metadata()["longrl"]), {k: f.get_tensor(k) for k in f.keys()}
    return CachedVideo(t["embeds"], t.get("deepstack"), t["video_grid_thw"], t.get("second_per_grid_ts"),
                       t.get("audio"), t.get("audio_mel_frames"), meta, path)


def check(path: str, meta: dict, want: dict):
    """A ValueError naming the entry and every field in which it differs from what this run needs."""
    diffs = [f"{WHY[k]} ({k}: cached {meta.get(k)!r}, this run {v!r})" for k, v in want.items() if meta.get(k) != v]
    if diffs:
        raise ValueError(f"stale embeddings-cache entry {path} for {want['video']['path']}: {'; '.join(diffs)} "
                         f"(built from --model={meta.get('model')}). Re-run cache_embeddings.py with this run's "
                         "sampling flags and a --model holding this run's tower weights (with --init_from: merge.py's "
                         "folder of that run), or run without --embeddings_cache")


def load_cached(cache_dir: str, video_path: str, cfg, model):
    """The CachedVideo for (video, sampling config `cfg`, model); None when the video has no entry (or is missing:
    the live path then reports it); a ValueError when its only entries were made for something else."""
    if not os.path.exists(video_path):
        return None
    want = expected_meta(video_path, cfg, model)
    path = entry_path(cache_dir, want)
    if not os.path.exists(path):
        for other in sorted(glob.glob(os.path.join(os.path.dirname(path), "*.safetensors"))):
            check(other, read_entry(other).meta, want)  # always raises: the key differs, so some field does
        return None
    entry = read_entry(path)
    check(path, entry.meta, want)  # the key matched; the type or hidden size may still differ
    return entry


@torch.no_grad()
def encode_video(model, processor, video) -> dict:
    """The tower's outputs for one sampled video, with the processor called exactly as vlm.build_prompt does."""
    if family(model) in FRAMES:  # embedding VLMs: every frame's tokens, frame after frame
        prompt = build_prompt_frames(model, processor, "", video, think=False)
        return {"embeds": encode_videos(model, [prompt]).pooler_output[0].contiguous().cpu(),
                "video_grid_thw": prompt.video_grid_thw}
    if family(model) == "qwen2_5_omni_thinker":  # the vision rows, and the audio encoder's rows of its track
        prompt = build_prompt_omni(model, processor, "", video, think=False)
        feats = encode_videos(model, [prompt])
        tensors = {"embeds": feats.pooler_output[0], "video_grid_thw": prompt.video_grid_thw}
        if prompt.input_features is not None:
            tensors.update(audio=feats.audio_features[0],
                           audio_mel_frames=torch.tensor([prompt.input_features.shape[-1]]))
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    out = processor(text=[processor.video_token], videos=[video.frames], video_metadata=[video.metadata()],
                    do_sample_frames=False, return_tensors="pt", **video_kwargs(processor))
    dev = model.device
    feats = video_features(model, out["pixel_values_videos"].to(dev), out["video_grid_thw"].to(dev))
    tensors = {"embeds": feats.pooler_output[0], "video_grid_thw": out["video_grid_thw"]}
    if getattr(feats, "deepstack_features", None) is not None:
        tensors["deepstack"] = torch.stack([layer[0] for layer in feats.deepstack_features])
    if out.get("second_per_grid_ts") is not None:
        tensors["second_per_grid_ts"] = out["second_per_grid_ts"]
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_entry(path: str, tensors: dict, meta: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"longrl": json.dumps(meta)})
    os.replace(tmp, path)  # atomic: readers see a whole entry or none


@dataclass
class CacheConfig(FrameSampling):  # fps, num_frames, max_frames, max_pixels, min_pixels: must match the training run
    model: str = ""                 # checkpoint folder or hub id whose (frozen) vision tower is run
    data: str = ""                  # jsonl (data/datasets.py format); each distinct video is encoded once
    out: str = ""                   # cache folder; pass the same path as --embeddings_cache when training
    dtype: str = "auto"             # tower dtype: auto = bf16 on GPU (as FSDP computes it), fp32 on CPU
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (if installed) | eager
    device: str = "auto"            # auto | cpu | cuda
    progress: bool = True           # tqdm progress bar (rank 0)


def main(cfg: CacheConfig) -> dict:
    if not (cfg.model and cfg.data and cfg.out):
        raise SystemExit("give --model, --data and --out (see --help)")
    d = init_distributed(cfg.device)
    model, processor = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, d.device)
    model.eval()
    videos = sorted({s.video for s in load_jsonl(cfg.data)})  # a video asked about several times: encoded once
    mine, written, existing, bad, t0 = videos[d.rank::d.world_size], 0, 0, [], time.time()
    for path in tqdm(mine, desc="cache", disable=not (cfg.progress and d.is_main)):
        try:
            want = expected_meta(path, cfg, model)
            out = entry_path(cfg.out, want)
            if os.path.exists(out):
                existing += 1
                continue
            video = load_video(path, cfg, family(model))
        except (ValueError, OSError) as e:  # missing, not a video, corrupt: skipped and reported, never fatal
            bad.append(str(e) if path in str(e) else f"{path}: {e}")
            continue
        tensors = encode_video(model, processor, video)
        write_entry(out, tensors, {**want, "model": model_id(model), "frames": video.metadata(),
                                   "frame_shape": list(video.frames.shape[:3]), "dtype": str(tensors["embeds"].dtype)})
        written += 1
    for line in bad:
        print(f"[rank {d.rank}] bad video skipped: {line}", flush=True)
    print(f"[rank {d.rank}] wrote {written}, already cached {existing}, bad {len(bad)} of its {len(mine)} videos",
          flush=True)
    tot = all_reduce(torch.tensor([written, existing, len(bad)], device=d.device)).tolist()
    print0(f"embeddings cache {cfg.out}: {tot[0]} written, {tot[1]} already cached (skipped), {tot[2]} bad videos "
           f"skipped, of {len(videos)} videos, {time.time() - t0:.1f} s on {d.world_size} rank(s)")
    return {"videos": len(videos), "written": tot[0], "existing": tot[1], "bad": tot[2]}


if __name__ == "__main__":
    main(parse_config(CacheConfig))
    exit_distributed()
