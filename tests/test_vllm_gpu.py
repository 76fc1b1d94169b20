"""
The colocated vLLM engine of rollout.py against the training forward, on a GPU with vllm installed (skipped
elsewhere; the README says where it ran). One sleep-mode engine per process, so everything is one test.
    python -m pytest tests/test_vllm_gpu.py -q -s -k "not prompt_embeds"   # prints a JSON line (VLLM {...})
    python -m pytest tests/test_vllm_gpu.py -q -s -k "prompt_embeds and llava"   # embedding VLMs, each family
    python -m pytest tests/test_vllm_gpu.py -q -s -k "prompt_embeds and vila"    # in its own process
    python -m pytest tests/test_vllm_gpu.py -q -s -k "omni"                      # Qwen2.5-Omni: video + audio
Checks: vLLM's sampling log-probs equal the training forward's on the same tokens (bf16 tolerance) before and
after a weight push; a push of changed weights changes the samples (stale weights are the classic bug); sleep
frees the KV cache and the weights; vLLM tokenizes the prompt exactly as our processor path does; each prompt
samples from its own random stream.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import rollout  # noqa: E402
import vlm  # noqa: E402
from data.tiny import TinySize, make_tiny_model  # noqa: E402
from data.video import SampledVideo  # noqa: E402


def video(frames, side, seed):
    pix = np.random.default_rng(seed).integers(0, 255, (frames, side, side, 3), dtype=np.uint8)
    return SampledVideo(frames=pix, timestamps=np.arange(frames) / 2.0, indices=list(range(frames)), fps=2.0,
                        total_frames=frames, duration=frames / 2.0)


def training_logprobs(model, prompts, outs, suppress):
    seqs = [(prompts[o.prompt_index].input_ids, prompts[o.prompt_index].positions, o.response_ids) for o in outs]
    feats = vlm.select_videos(vlm.encode_videos(model, prompts), [o.prompt_index for o in outs])
    with torch.no_grad():
        lp, _ = vlm.response_logprobs(model, vlm.pack(seqs, 0), feats, suppress)
    return lp.float().cpu()


def test_vllm_engine_matches_training_forward_and_takes_weight_pushes(tmp_path):
    path = make_tiny_model(str(tmp_path / "m"), "qwen2_5_vl", TinySize(hidden=256, layers=4, heads=4, kv_heads=2,
                                                                      ffn=512, vision_hidden=128, vision_depth=2))
    model, processor = vlm.load_model(path, "bfloat16", "sdpa", "cuda")
    model.eval()
    prompts = [vlm.build_prompt(model, processor, "What colour was the flash?", video(16, 112, s)) for s in range(4)]
    engine = rollout.VLLMEngine(path, gpu_memory_utilization=0.3, max_model_len=4096, seed=0, enforce_eager=True)
    summary = {"vllm": vllm.__version__, "device": torch.cuda.get_device_name()}
    suppress = vlm.suppress_ids(model, processor)  # never sampled, as in train_grpo.py

    outs = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress)
    assert not set(suppress) & {t for o in outs for t in o.response_ids}
    summary["prompt_mismatches"] = engine.prompt_mismatches  # vLLM's prompt ids vs our processor path's
    engine_lp = torch.tensor([x for o in outs for x in o.logprobs])
    diff = (engine_lp - training_logprobs(model, prompts, outs, suppress)).abs()
    summary["logprob_maxdiff_before_push"] = float(diff.max())
    summary["logprob_meandiff_before_push"] = float(diff.mean())
    assert diff.max() < 0.1 and diff.mean() < 0.02  # bf16 on both sides
    # each prompt its own random stream: the same prompt twice in one call gets different samples (with one seed
    # for the call, vLLM gave the k-th samples of every prompt the same random numbers)
    twin = engine.generate([prompts[0], prompts[0]], n=4, temperature=1.0, max_new_tokens=24, seed=5,
                           suppress_ids=suppress)
    samples = [[o.response_ids for o in twin if o.prompt_index == i] for i in (0, 1)]
    summary["same_prompt_twice_samples_differ"] = samples[0] != samples[1]
    assert samples[0] != samples[1]

    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep()
    summary["sleep_freed_GiB"] = (torch.cuda.mem_get_info()[0] - free0) / 2**30
    try:
        assert summary["sleep_freed_GiB"] > 0.5  # the KV cache (most of 30% of the GPU) and the weights
        # "train": change the language model, push, compare; then change the vision tower, push, compare
        groups = {"embed_tokens": "embed_tokens", "attention": "self_attn", "mlp": "language_model.layers",
                  "norms": "norm", "lm_head": "lm_head", "vision_tower": "model.visual"}
        for part, key in groups.items():  # one weight group at a time: a stale group shows up by name
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if key in name and (part != "mlp" or ".mlp." in name) and \
                            (part == "vision_tower" or "visual" not in name):
                        # norms: all ones
                        scale = 0.2 * p.float().std() if p.numel() > 1 and p.float().std() > 1e-3 else 0.05
                        p.add_(torch.randn_like(p) * scale)  # relative to the weights, like a training step
            stale = training_logprobs(model, prompts, outs, suppress)
            summary[f"{part}_stale_weights_would_differ_by"] = float((engine_lp - stale).abs().mean())
            engine.load_weights(((n, p.detach()) for n, p in model.state_dict().items()))
            engine.wake()
            again = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress)
            summary[f"{part}_samples_changed_after_push"] = [o.response_ids for o in again] != \
                [o.response_ids for o in outs]
            new_lp = torch.tensor([x for o in again for x in o.logprobs])
            diff_after = (new_lp - training_logprobs(model, prompts, again, suppress)).abs()
            summary[f"{part}_logprob_maxdiff_after_push"] = float(diff_after.max())
            summary[f"{part}_logprob_meandiff_after_push"] = float(diff_after.mean())
            outs, engine_lp = again, new_lp
        for part in groups:
            assert summary[f"{part}_samples_changed_after_push"]
            assert summary[f"{part}_logprob_maxdiff_after_push"] < 0.1
            assert summary[f"{part}_logprob_meandiff_after_push"] < 0.02
    finally:
        print("VLLM " + json.dumps(summary), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "vllm_test.json"), "w") as f:
                json.dump(summary, f)


@pytest.mark.parametrize("fam", ["llava", "vila"])
def test_vllm_prompt_embeds_for_embedding_vlm(tmp_path, fam):
    """Embedding VLMs: vLLM runs the exported language model on our prompt embeddings (frames' tokens in place);
    its log-probs equal the training forward's, and a pushed language-model change reaches it. Run each family in
    its own process (-k "prompt_embeds and llava"): one sleep-mode engine per process."""
    path = make_tiny_model(str(tmp_path / "m"), fam, TinySize(hidden=256, layers=4, heads=4, kv_heads=2, ffn=512,
                                                                  vision_hidden=128, vision_depth=2))
    model, processor = vlm.load_model(path, "bfloat16", "sdpa", "cuda")
    model.eval()
    prompts = [vlm.build_prompt(model, processor, "What colour was the flash?", video(16, 28, s)) for s in range(4)]
    lm_dir = rollout.export_language_model(model, processor, str(tmp_path / "lm"))
    engine = rollout.VLLMEngine(lm_dir, gpu_memory_utilization=0.3, max_model_len=4096, seed=0, enforce_eager=True,
                                prompt_embeds=True)
    suppress = vlm.suppress_ids(model, processor)
    summary = {"vllm": vllm.__version__, "device": torch.cuda.get_device_name(), "family": f"{fam} (prompt_embeds)"}
    try:
        outs = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress,
                               embeds=rollout.prompt_embeddings(model, prompts))
        engine_lp = torch.tensor([x for o in outs for x in o.logprobs])
        diff = (engine_lp - training_logprobs(model, prompts, outs, suppress)).abs()
        summary.update(logprob_maxdiff=float(diff.max()), logprob_meandiff=float(diff.mean()))
        assert diff.max() < 0.1 and diff.mean() < 0.02
        engine.sleep()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ("language_model" in name or name.startswith("llm.")) and p.numel() > 1:  # llava / vila
                    p.add_(torch.randn_like(p) * 0.2 * p.float().std())
        engine.load_weights(((n, p.detach()) for n, p in model.state_dict().items()))
        engine.wake()
        again = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress,
                                embeds=rollout.prompt_embeddings(model, prompts))
        summary["samples_changed_after_push"] = [o.response_ids for o in again] != [o.response_ids for o in outs]
        diff = (torch.tensor([x for o in again for x in o.logprobs]) - training_logprobs(model, prompts, again,
                                                                                         suppress)).abs()
        summary.update(logprob_maxdiff_after_push=float(diff.max()), logprob_meandiff_after_push=float(diff.mean()))
        assert summary["samples_changed_after_push"] and diff.max() < 0.1 and diff.mean() < 0.02
    finally:
        print("VLLM " + json.dumps(summary), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"vllm_prompt_embeds_{fam}.json"), "w") as f:
                json.dump(summary, f)


def with_audio(v, kind: str, seed: int):
    """The video with a 16 kHz track over its whole duration: a beep (its pitch from the seed) or loud noise."""
    rng, t = np.random.default_rng(seed), np.arange(int(v.duration * 16000)) / 16000
    track = 0.3 * np.sin(2 * np.pi * (330 + 110 * seed) * t) if kind == "beep" else 0.5 * rng.standard_normal(len(t))
    return dataclasses.replace(v, audio=track.astype(np.float32))


def test_vllm_omni_thinker_hears_the_video_and_takes_weight_pushes(tmp_path):
    """Qwen2.5-Omni thinker on vLLM (rollout.export_omni_config + VLLMEngine(omni=True)): each video with its own
    audio track, interleaved as vlm.omni_layout writes it. vLLM's prompt ids equal ours; its log-probs equal the
    training forward's (bf16) before and after weight pushes of the language model, the vision tower and the
    audio encoder, and each push changes the samples; changing only the audio changes vLLM's log-probs as much as
    it changes the training forward's."""
    path = make_tiny_model(str(tmp_path / "m"), "qwen2_5_omni_thinker",
                           TinySize(hidden=256, layers=4, heads=4, kv_heads=2, ffn=512, vision_hidden=128,
                                    vision_depth=2))
    model, processor = vlm.load_model(path, "bfloat16", "sdpa", "cuda")
    model.eval()
    clips = [video(16, 112, s) for s in range(4)]
    prompts = [vlm.build_prompt(model, processor, "What sound?", with_audio(v, "beep", s)) for s, v in enumerate(clips)]
    assert all(p.num_audio_tokens > 0 for p in prompts)
    engine = rollout.VLLMEngine(rollout.export_omni_config(model, processor, str(tmp_path / "vllm")),
                                gpu_memory_utilization=0.3, max_model_len=4096, seed=0, enforce_eager=True, omni=True)
    summary = {"vllm": vllm.__version__, "device": torch.cuda.get_device_name(), "family": "qwen2_5_omni_thinker",
               "audio_tokens": [p.num_audio_tokens for p in prompts], "video_tokens": prompts[0].num_video_tokens}
    suppress = vlm.suppress_ids(model, processor)
    try:
        with pytest.raises(RuntimeError, match="random weights"):
            engine.generate(prompts, n=1, max_new_tokens=2, suppress_ids=suppress)
        engine.load_weights(rollout.full_tensors(model))  # the folder has no weights: the first push brings them
        outs = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress)
        summary["prompt_mismatches"] = engine.prompt_mismatches
        engine_lp = torch.tensor([x for o in outs for x in o.logprobs])
        diff = (engine_lp - training_logprobs(model, prompts, outs, suppress)).abs()
        summary.update(logprob_maxdiff=float(diff.max()), logprob_meandiff=float(diff.mean()))

        # only the audio changes (loud noise instead of the beep): the first sampled token's log-prob moves in vLLM
        # as it moves in the training forward (same seed: compare samples whose first token is the same)
        noisy = [vlm.build_prompt(model, processor, "What sound?", with_audio(v, "noise", s))
                 for s, v in enumerate(clips)]
        other = engine.generate(noisy, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress)
        same = [(a, b) for a, b in zip(outs, other) if a.response_ids[:1] == b.response_ids[:1]]
        first = [(a.logprobs[0], b.logprobs[0]) for a, b in same]
        engine_moved = torch.tensor([abs(x - y) for x, y in first])
        train_a = training_logprobs(model, prompts, [a for a, _ in same], suppress)
        train_b = training_logprobs(model, noisy, [b for _, b in same], suppress)
        starts = np.cumsum([0] + [len(a.response_ids) for a, _ in same])[:-1]
        train_moved = (train_a[starts] - train_b[starts]).abs()
        summary.update(audio_only_change_samples_compared=len(same),
                       audio_only_change_vllm_first_logprob_moved=float(engine_moved.mean()),
                       audio_only_change_training_first_logprob_moved=float(train_moved.mean()))

        # pushes: the language model, the vision tower, the audio encoder, one at a time
        engine.sleep()
        for part, key in {"language_model": "model.layers", "vision_tower": "visual.",
                          "audio_encoder": "audio_tower."}.items():
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.startswith(key) and p.numel() > 1 and p.float().std() > 1e-3:
                        p.add_(torch.randn_like(p) * 0.2 * p.float().std())
            engine.load_weights(rollout.full_tensors(model))
            engine.wake()
            again = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=24, seed=1, suppress_ids=suppress)
            summary[f"{part}_samples_changed_after_push"] = [o.response_ids for o in again] != \
                [o.response_ids for o in outs]
            diff_after = (torch.tensor([x for o in again for x in o.logprobs]) -
                          training_logprobs(model, prompts, again, suppress)).abs()
            summary[f"{part}_logprob_maxdiff_after_push"] = float(diff_after.max())
            summary[f"{part}_logprob_meandiff_after_push"] = float(diff_after.mean())
            outs = again
            engine.sleep()

        assert summary["prompt_mismatches"] == 0
        assert diff.max() < 0.1 and diff.mean() < 0.02  # bf16 on both sides
        assert len(same) >= 4 and train_moved.mean() > 0.01  # the audio matters to this model
        assert (engine_moved.mean() - train_moved.mean()).abs() < 0.25 * train_moved.mean() + 0.01
        for part in ("language_model", "vision_tower", "audio_encoder"):
            assert summary[f"{part}_samples_changed_after_push"], part
            assert summary[f"{part}_logprob_maxdiff_after_push"] < 0.1, part
            assert summary[f"{part}_logprob_meandiff_after_push"] < 0.02, part
    finally:
        print("VLLM " + json.dumps(summary), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "vllm_omni.json"), "w") as f:
                json.dump(summary, f)
