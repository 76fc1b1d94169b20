"""
cache_embeddings.py: cached prompts and log-probs equal the live ones (Qwen2.5-VL, Qwen3-VL); re-runs skip; stale
entries fail loudly; misses fall back and are counted; 2 torchrun ranks shard the work; training with the cache
equals training without it, refuses a trainable tower, and survives ranks that miss unevenly.
    python -m pytest tests/test_cache_embeddings.py -q
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import cache_embeddings as C
import rollout
import vlm
import common
import train_grpo as T
from data.datasets import Loader, load_jsonl
from data.tiny import make_tiny_model
from data.video import write_video
from conftest import torchrun, write_preset



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """3 videos (9 frames at 3 fps: timestamps that are not round), one asked about twice, a corrupt file; tiny
    Qwen2.5-VL / Qwen3-VL models; the synthetic task for the training tests."""
    from data.synthetic import SyntheticConfig, make_dataset
    d = tmp_path_factory.mktemp("cache")
    rng, rows = np.random.default_rng(0), []
    for i, (n, size, fps) in enumerate([(16, 64, 4), (9, 64, 3), (12, 96, 4)]):
        write_video(str(d / f"v{i}.mp4"), (rng.integers(0, 255, (size, size, 3), np.uint8) for _ in range(n)), fps)
        rows.append({"video": f"v{i}.mp4", "problem": "What colour?", "options": ["A. red", "B. green"], "answer": "A"})
    rows += [dict(rows[0], problem="How many?"), dict(rows[0], video="corrupt.mp4")]
    (d / "corrupt.mp4").write_bytes(b"garbage" * 50)
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fam in ("qwen2_5_vl", "qwen3_vl"):
        make_tiny_model(str(d / fam), fam, seed=0)
    make_dataset(SyntheticConfig(out=str(d / "task"), num_train=16, num_eval=4, frames=8, fps=4.0, seed=0))
    return d


def cache_cfg(d, fam, out="cache", data="data.jsonl", **kw):
    return C.CacheConfig(**{**dict(model=str(d / fam), data=str(d / data), out=str(d / f"{out}_{fam}"),
                                    num_frames=7, max_pixels=64 * 64, progress=False), **kw})


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_cached_prompts_and_logprobs_equal_live(work, fam, capsys):
    cfg = cache_cfg(work, fam)
    assert C.main(cfg) == {"videos": 4, "written": 3, "existing": 0, "bad": 1}  # v0 once, corrupt.mp4 reported
    assert "corrupt.mp4" in capsys.readouterr().out
    model, processor = vlm.load_model(cfg.model)
    samples, skipped, misses = load_jsonl(cfg.data), [], []
    cached = rollout.prepare_prompts(model, processor, samples, cfg, True, skipped, cfg.out, misses)
    live = rollout.prepare_prompts(model, processor, samples, cfg, True, [])
    assert misses == [samples[-1].video] and len(skipped) == 1  # only the corrupt video missed (then skipped)
    assert all(p.pixel_values_videos is None and p.video_features is not None for p in cached)
    for a, b in zip(cached, live):  # the processor's own placeholder expansion, from the stored grid + metadata
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
    mixed = [cached[0], live[1], cached[2], live[3]]  # the tower runs on the live ones only, order kept
    for prompts in (cached, mixed):
        packed = vlm.pack([(p.input_ids, p.positions, [20 + k, 30, 40 + k]) for k, p in enumerate(prompts)], 0)
        with torch.no_grad():
            feats, ref = vlm.encode_videos(model, prompts), vlm.encode_videos(model, live)
            lp, _ = vlm.response_logprobs(model, packed, feats, [])
            lp_live, _ = vlm.response_logprobs(model, packed, ref, [])
        assert type(feats) is type(ref)
        assert torch.allclose(lp, lp_live, atol=1e-5, rtol=0)
    # a re-run skips every existing entry and rewrites none
    stamp = {f: os.stat(f).st_mtime_ns for f in map(str, (work / cfg.out).rglob("*.safetensors"))}
    assert C.main(cfg) == {"videos": 4, "written": 0, "existing": 3, "bad": 1}
    assert "3 already cached (skipped)" in capsys.readouterr().out
    assert stamp == {f: os.stat(f).st_mtime_ns for f in stamp}


def test_stale_entries_are_clear_errors(work, tmp_path):
    q25, q3 = (vlm.load_model(str(work / f))[0] for f in ("qwen2_5_vl", "qwen3_vl"))
    cfg, video = cache_cfg(work, "qwen2_5_vl"), str(work / "v1.mp4")
    C.main(cfg)
    assert C.load_cached(cfg.out, video, cfg, q25) is not None
    with pytest.raises(ValueError, match=r"stale embeddings-cache entry .*v1.mp4: another frame sampling"):
        C.load_cached(cfg.out, video, cache_cfg(work, "qwen2_5_vl", num_frames=5), q25)
    with pytest.raises(ValueError, match=r"another model family .*qwen3_vl.*other vision-tower weights .*"
                                         r"built from --model=.*qwen2_5_vl"):
        C.load_cached(cfg.out, video, cfg, q3)
    (copy := tmp_path / "v.mp4").write_bytes((work / "v1.mp4").read_bytes())
    (tmp_path / "one.jsonl").write_text(json.dumps({"video": str(copy), "problem": "q?", "answer": "A"}) + "\n")
    C.main(one := cache_cfg(tmp_path, "", out="one", data="one.jsonl", model=cfg.model))
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 10 ** 9))  # touched: same bytes
    with pytest.raises(ValueError, match="the video file changed since it was cached"):
        C.load_cached(one.out, str(copy), one, q25)
    assert C.load_cached(one.out, str(work / "v0.mp4"), one, q25) is None  # never cached: a miss, not an error


def test_other_tower_weights_are_stale(work, tmp_path):
    """The key holds a fingerprint of the tower's weights, not only the model folder: new weights saved into the
    cached model's folder, or a run's weights loaded over it (train_grpo.py --model=BASE --init_from=SFT_RUN, the
    SFT run having trained the tower), make its entries stale; a cache built from a folder with those weights is
    used, whatever --model the reader names; a bf16 cache stays valid for an fp32 model of the same weights."""
    model_dir = str(tmp_path / "m")
    make_tiny_model(model_dir, "qwen2_5_vl", seed=0)
    (tmp_path / "one.jsonl").write_text(json.dumps({"video": str(work / "v1.mp4"), "problem": "q?", "answer": "A"}))
    cfg = cache_cfg(tmp_path, "", out="c", data="one.jsonl", model=model_dir)
    C.main(cfg)
    video = str(work / "v1.mp4")
    assert C.load_cached(cfg.out, video, cfg, vlm.load_model(model_dir)[0]) is not None
    bf16 = dataclasses.replace(cfg, out=str(tmp_path / "c_bf16"), dtype="bfloat16")  # what dtype=auto gives on a GPU
    C.main(bf16)
    assert C.load_cached(bf16.out, video, bf16, vlm.load_model(model_dir)[0]) is not None  # read in fp32
    # the documented recipe: a run that trained the tower, loaded over the base model the cache was built from
    tuned, _ = vlm.load_model(model_dir)
    with torch.no_grad():
        for p in tuned.model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    common.save_checkpoint(str(tmp_path / "sft"), 1, tuned, torch.optim.AdamW(tuned.parameters()), {"step": 1})
    model, processor = vlm.load_model(model_dir)
    assert C.load_cached(cfg.out, video, cfg, model) is not None  # fingerprint taken from the base weights ...
    common.load_model_weights(str(tmp_path / "sft"), model)       # ... and taken again once they change
    samples = load_jsonl(cfg.data)
    with pytest.raises(ValueError, match=r"stale embeddings-cache entry .*c_/.*v1.mp4: other vision-tower weights"):
        rollout.prepare_prompts(model, processor, samples, cfg, True, [], cfg.out, [])
    # a cache of the tuned tower (built from a folder holding its weights) serves --model=BASE --init_from=SFT
    tuned.save_pretrained(str(tmp_path / "tuned"))
    processor.save_pretrained(str(tmp_path / "tuned"))
    C.main(tuned_cfg := dataclasses.replace(cfg, model=str(tmp_path / "tuned"), out=str(tmp_path / "c_tuned")))
    misses = []
    cached = rollout.prepare_prompts(model, processor, samples, tuned_cfg, True, [], tuned_cfg.out, misses)
    live = rollout.prepare_prompts(model, processor, samples, tuned_cfg, True, [])
    assert not misses and cached[0].video_features is not None
    with torch.no_grad():
        a, b = vlm.encode_videos(model, cached).pooler_output[0], vlm.encode_videos(model, live).pooler_output[0]
    assert torch.allclose(a, b, atol=1e-5)
    # new weights saved into the cached model's folder (a re-merge, a re-save)
    make_tiny_model(model_dir, "qwen2_5_vl", seed=1)
    with pytest.raises(ValueError, match="other vision-tower weights"):
        C.load_cached(cfg.out, video, cfg, vlm.load_model(model_dir)[0])


def test_two_ranks_write_each_video_once(work):
    C.main(cache_cfg(work, "qwen3_vl"))  # the one-process cache (already there if the test above ran)
    cfg = cache_cfg(work, "qwen3_vl", out="sharded")
    out = torchrun("cache_embeddings.py", [f"--{k}={v}" for k, v in cfg.__dict__.items()])
    assert "[rank 0] wrote 1, already cached 0, bad 1" in out and "[rank 1] wrote 2, already cached 0, bad 0" in out
    assert "3 written, 0 already cached (skipped), 1 bad videos skipped, of 4 videos" in out
    files = sorted(p.relative_to(work / cfg.out) for p in (work / cfg.out).rglob("*.safetensors"))
    single = sorted(p.relative_to(work / "cache_qwen3_vl") for p in (work / "cache_qwen3_vl").rglob("*.safetensors"))
    assert len(files) == 3 and files == single  # the same keys as the one-process cache


def train_cfg(d, out, **kw):
    return T.Config(**{**dict(out_dir=str(out), data=str(d / "task" / "train.jsonl"), model=str(d / "qwen2_5_vl"),
                              num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28, rollout_batch_size=4, n=8,
                              max_new_tokens=16, lr=1e-3, max_steps=2, save_every=100, progress=False,
                              gradient_checkpointing=False, freeze_vision=True, sft_steps=12, sft_batch_size=8,
                              sft_lr=1e-2, temperature=1.5), **kw})


def test_training_with_cache_equals_without(work, tmp_path):
    with pytest.raises(ValueError, match="frozen vision tower.*freeze_vision=true"):
        T.main(train_cfg(work, tmp_path / "x", embeddings_cache=str(tmp_path), freeze_vision=False))
    base = train_cfg(work, tmp_path)  # the same runs that `bench.py cache` times on a GPU
    cache = str(tmp_path / "cache")
    C.main(C.CacheConfig(model=base.model, data=base.data, out=cache, num_frames=base.num_frames,
                         max_pixels=base.max_pixels, min_pixels=base.min_pixels, progress=False))
    for name, cache_dir in (("live", ""), ("cached", cache)):
        T.main(dataclasses.replace(base, out_dir=str(tmp_path / name), embeddings_cache=cache_dir))
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("live", "cached")}
    assert [r["cache_misses"] for r in rows["cached"]] == [0, 0]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and not k.endswith("tokens_per_s")
                       and not k.startswith("cache_")}
    assert rows["live"][0]["loss"] != 0.0  # the warm-up made rewards vary, so the update is not trivially 0
    # same rollouts, losses, updates; not bit-equal: the tower on 4 videos at once (live) vs 1 (cache) differs by 1e-7
    for live, cached in zip(rows["live"], rows["cached"]):
        assert strip(live) == pytest.approx(strip(cached), rel=1e-3)


def test_two_ranks_with_uneven_misses(work, tmp_path):
    """Rank 0's prompts are all cached, rank 1's none: only rank 1 runs the (frozen, unsharded) tower, which must
    not leave rank 0 waiting in a collective; the misses are counted; the checkpoint saves."""
    cfg = train_cfg(work, tmp_path / "run", max_steps=1, sft_steps=0, save_every=1)
    rank0 = Loader(load_jsonl(cfg.data), 2, 0, 2, cfg.seed).next_batch()
    (tmp_path / "rank0.jsonl").write_text("".join(json.dumps({"video": s.video, "problem": "q", "answer": "A"}) + "\n"
                                                  for s in rank0))
    C.main(c := cache_cfg(tmp_path, "", "c", "rank0.jsonl", model=cfg.model, num_frames=8, max_pixels=28 * 28))
    cfg.embeddings_cache = c.out
    torchrun("train_grpo.py", [write_preset(cfg, tmp_path / "preset.py")], timeout=240)
    m = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert m["cache_misses"] == 2 and m["groups_kept"] == 4 and common.latest_checkpoint(cfg.out_dir)
