"""
rollout.py: model inputs, our 3-D rope positions, the HF engine, log-prob agreement, CLI and eval.
    python -m pytest tests/test_rollout.py -q
"""
import json
import os
from types import SimpleNamespace
import logging

import numpy as np
import pytest
import torch

import rollout

import vlm
from data.tiny import make_tiny_model
from data.video import write_video


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Qwen2.5-VL and Qwen3-VL folders, loaded back with from_pretrained."""
    out = {}
    for fam in ("qwen2_5_vl", "qwen3_vl"):
        path = make_tiny_model(str(tmp_path_factory.mktemp(fam)), fam, seed=0)
        model, processor = vlm.load_model(path)
        out[fam] = (path, model.eval(), processor)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (frames, size) in enumerate([(16, 64), (8, 64), (12, 96)]):
        p = str(d / f"v{i}.mp4")
        write_video(p, (rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(frames)), fps=4)
        paths.append(p)
    return paths


class VideoCfg:
    fps, num_frames, max_frames, max_pixels, min_pixels = 0.0, 8, 64, 64 * 64, 28 * 28


def prompts_for(model, processor, paths, question="What colour was the flash?"):
    fam = vlm.family(model)
    return [vlm.build_prompt(model, processor, question, vlm.load_video(p, VideoCfg, fam)) for p in paths]


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_video_token_count_matches_sampled_frames(tiny, videos, fam):
    _, model, processor = tiny[fam]
    for p in prompts_for(model, processor, videos):
        T, H, W = p.frames.frames.shape[:3]
        unit = vlm.SUPPORTED[fam]  # one merged token covers unit x unit pixels of 2 frames
        assert p.num_video_tokens == (T // 2) * (H // unit) * (W // unit)
        assert p.positions.shape == (3, len(p.input_ids))


def test_rope_positions_hand_computed(tiny):
    """Original Qwen2.5-VL rule on a hand-made sequence: 2 text, one video block (t=2, h=2, w=2 merged),
    2 text. tokens_per_second=2 and 1 s per temporal grid -> temporal ids 0 and 2."""
    _, model, _ = tiny["qwen2_5_vl"]
    V = model.config.video_token_id
    ids = torch.tensor([10, 11] + [V] * 8 + [12, 13])
    grid = torch.tensor([[2, 4, 4]])  # in patches; merged 2x2 -> h = w = 2
    pos = vlm.rope_positions(model.config, ids, grid, [1.0])
    start = 2
    expected_t = [0, 1] + [start + x for x in [0, 0, 0, 0, 2, 2, 2, 2]] + [5, 6]
    expected_h = [0, 1] + [start + x for x in [0, 0, 1, 1, 0, 0, 1, 1]] + [5, 6]
    expected_w = [0, 1] + [start + x for x in [0, 1, 0, 1, 0, 1, 0, 1]] + [5, 6]
    assert pos.tolist() == [expected_t, expected_h, expected_w]
    # a slower video (2 s per temporal grid) spreads the temporal ids further: 0 and 4
    pos2 = vlm.rope_positions(model.config, ids, grid, [2.0])
    assert pos2[0, 6].item() == start + 4 and pos2[0, -2].item() == start + 5


def test_rope_positions_equal_transformers_for_qwen3(tiny, videos):
    """Qwen3-VL's blocks have t = 1, where the original rule and transformers' coincide."""
    _, model, processor = tiny["qwen3_vl"]
    p = prompts_for(model, processor, videos[:1])[0]
    ids = p.input_ids[None]
    mm = (ids == model.config.video_token_id).int() * 2
    ref, _ = model.model.get_rope_index(ids, mm, video_grid_thw=p.video_grid_thw)
    assert torch.equal(ref[:, 0], p.positions)


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_sampling_reproducible_and_logprobs_match_forward(tiny, videos, fam):
    _, model, processor = tiny[fam]
    prompts = prompts_for(model, processor, videos)
    a = rollout.hf_generate(model, processor, prompts, n=3, temperature=1.0, max_new_tokens=10, seed=5)
    b = rollout.hf_generate(model, processor, prompts, n=3, temperature=1.0, max_new_tokens=10, seed=5)
    c = rollout.hf_generate(model, processor, prompts, n=3, temperature=1.0, max_new_tokens=10, seed=6)
    assert [o.response_ids for o in a] == [o.response_ids for o in b]
    assert [o.response_ids for o in a] != [o.response_ids for o in c]
    assert [o.prompt_index for o in a] == [i for i in range(3) for _ in range(3)]
    # the sampling log-probs equal a fresh training-style forward over prompt + response
    seqs = [(prompts[o.prompt_index].input_ids, prompts[o.prompt_index].positions, o.response_ids) for o in a]
    packed = vlm.pack(seqs, processor.tokenizer.pad_token_id)
    feats = vlm.select_videos(vlm.encode_videos(model, prompts), [o.prompt_index for o in a])
    with torch.no_grad():
        lp, _ = vlm.response_logprobs(model, packed, feats, vlm.suppress_ids(model, processor))
    ref = torch.tensor([x for o in a for x in o.logprobs])
    assert lp.shape == ref.shape
    assert torch.allclose(lp, ref, atol=1e-4)


@pytest.mark.parametrize("top_p, kept", [(0.0, 1), (0.3, 1), (0.5, 1), (0.75, 2), (0.76, 3), (0.90625, 3),
                                          (0.95, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    """Nucleus sampling over p = [1/2, 1/4, 5/32, 3/32] (exact in float32): the kept set is the smallest prefix
    whose mass reaches top_p (at 0.75 exactly, two tokens), the same set as transformers' TopPLogitsWarper, and
    the samples follow p renormalised over it."""
    from transformers.generation.logits_process import TopPLogitsWarper
    p = torch.tensor([0.5, 0.25, 0.15625, 0.09375])
    logits = p.log().repeat(20000, 1)
    tokens, logp = rollout.sample_token(logits, 1.0, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.equal(freq > 0, torch.arange(4) < kept)
    assert torch.allclose(freq[:kept], p[:kept] / p[:kept].sum(), atol=0.015)
    assert torch.allclose(logp[0], p.log())  # the log-probs are before truncation: what the trainer recomputes
    if top_p > 0:
        hf = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), p.log()[None])
        assert torch.equal(torch.isfinite(hf[0]), torch.arange(4) < kept)


def test_generated_tokens_never_vision_or_pad(tiny, videos):
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = prompts_for(model, processor, videos)
    outs = rollout.hf_generate(model, processor, prompts, n=4, temperature=1.5, max_new_tokens=24, seed=0)
    banned = set(vlm.suppress_ids(model, processor))
    assert not banned & {t for o in outs for t in o.response_ids}


def test_on_token_streams_every_sampled_token(tiny, videos):
    """on_token (the web demo's stream) sees each step's tokens, one per row, in order: row b's stream up to its
    length is its response; after a row stops it gets pad ids."""
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = prompts_for(model, processor, videos)
    steps = []
    outs = rollout.hf_generate(model, processor, prompts, n=2, temperature=1.0, max_new_tokens=16, seed=3,
                               on_token=steps.append)
    again = rollout.hf_generate(model, processor, prompts, n=2, temperature=1.0, max_new_tokens=16, seed=3)
    assert [o.response_ids for o in outs] == [o.response_ids for o in again]   # streaming changes nothing
    assert all(len(step) == len(outs) for step in steps)
    for b, o in enumerate(outs):
        assert [step[b] for step in steps[:len(o.response_ids)]] == o.response_ids
        assert all(step[b] == processor.tokenizer.pad_token_id for step in steps[len(o.response_ids):])


def test_mixed_length_batch_equals_one_at_a_time(tiny, videos):
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = prompts_for(model, processor, videos)
    prompts[1] = prompts_for(model, processor, videos[1:2], question="How many?")[0]  # a shorter prompt
    assert len({len(p.input_ids) for p in prompts}) > 1
    batch = rollout.hf_generate(model, processor, prompts, n=1, temperature=0.0, max_new_tokens=12)
    single = [rollout.hf_generate(model, processor, [p], n=1, temperature=0.0, max_new_tokens=12)[0] for p in prompts]
    assert [o.response_ids for o in batch] == [o.response_ids for o in single]


def test_response_logprobs_never_touch_prompt_positions(tiny, videos):
    """lm_head must only see response rows: count its input rows."""
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = prompts_for(model, processor, videos[:1])
    packed = vlm.pack([(prompts[0].input_ids, prompts[0].positions, [20, 21, 22])], 0)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    vlm.response_logprobs(model, packed, vlm.encode_videos(model, prompts), [], chunk=2)
    hook.remove()
    assert rows == [2, 1]


def test_unsupported_model_type_lists_supported(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="qwen2_5_vl, qwen3_vl"):
        vlm.load_model(str(tmp_path))


def test_cli_answers_about_an_hour_long_video_at_8192_frames(tiny, tmp_path, capsys):
    """The long end of the CLI: an hour at 4 fps (14,400 tiny frames) sampled to 8,192 frames -> 4,096 video
    tokens (one merged 28x28 patch per frame pair); decoding shows a bar, and the summary gives the decoded size,
    the tokens, the seconds per stage and the peak RSS."""
    path, _, _ = tiny["qwen2_5_vl"]
    write_video(str(tmp_path / "hour.mp4"), (np.full((28, 28, 3), (7 * i) % 256, np.uint8) for i in range(14400)),
                fps=4, gop=64)
    out = rollout.main(rollout.RolloutConfig(model=path, video=str(tmp_path / "hour.mp4"), question="What changed?",
                                             num_frames=8192, max_pixels=28 * 28, min_pixels=28 * 28,
                                             max_new_tokens=4, think=False, progress=True))
    captured = capsys.readouterr()
    printed = captured.out
    assert "decoding hour.mp4" in captured.err and "8192/8192" in captured.err   # the decoding bar
    assert "8192 frames of 28x28 (18 MiB decoded) -> 4096 video tokens" in printed
    assert "seconds: decode + sample" in printed and "peak RSS" in printed and out.response_ids


def test_cli_question_and_eval_skip_bad_videos(tiny, videos, tmp_path, capsys):
    path, _, _ = tiny["qwen2_5_vl"]
    cfg = rollout.RolloutConfig(model=path, video=videos[0], question="What colour was the flash?", num_frames=8,
                                max_new_tokens=8, max_pixels=64 * 64, progress=False)
    out = rollout.main(cfg)
    assert isinstance(out, rollout.Rollout) and "video tokens" in capsys.readouterr().out
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01not a video" * 100)
    rows = [{"video": v, "problem": "q?", "options": ["A. red", "B. green"], "answer": "A",
             "problem_type": "multiple_choice", "category": cat}
            for v, cat in zip(videos, ["Temporal", "Spatial", "Temporal"])]
    rows += [{"video": "missing.mp4", "problem": "q?", "answer": "B", "problem_type": "multiple_choice"},
             {"video": "corrupt.mp4", "problem": "q?", "answer": "B", "problem_type": "multiple_choice"}]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = rollout.main(rollout.RolloutConfig(model=path, eval=str(eval_file), num_frames=8, max_new_tokens=8,
                                             max_pixels=64 * 64, eval_batch_size=2, progress=False))
    assert res["num_scored"] == 3 and len(res["skipped"]) == 2
    assert any("missing.mp4" in s for s in res["skipped"]) and any("corrupt.mp4" in s for s in res["skipped"])
    assert set(res["per_category"]) == {"Temporal", "Spatial"}
    header, *preds = [json.loads(line) for line in open(tmp_path / "eval.predictions.jsonl")]
    assert len(preds) == 3 and all("response" in p and "read_as" in p for p in preds)
    assert header["settings"]["num_frames"] == 8 and header["settings"]["think"] is True and \
        header["settings"]["temperature"] == 0.0 and header["settings"]["max_new_tokens"] == 8
    assert sum(res["read_as"].values()) == 3   # every answer is counted under the shape it was read in
    printed = capsys.readouterr().out
    assert "2 skipped" in printed and "engine: HF" in printed
    assert "settings: model" in printed and "read as " in printed


def test_eval_header_says_greedy_and_default_path_is_beside_the_eval_file(tiny, videos, tmp_path, monkeypatch):
    """--eval answers greedily whatever --temperature says: the settings line says what ran (temperature 0, no
    top-p or seed; the embeddings cache). The default predictions file sits beside an eval file without an
    extension in a folder with a dot in its name."""
    path, _, _ = tiny["qwen2_5_vl"]
    monkeypatch.chdir(tmp_path)
    os.makedirs("ev.d")
    with open("ev.d/evalset", "w") as f:
        f.write(json.dumps({"video": videos[1], "problem": "q?", "options": ["A. a", "B. b"], "answer": "A"}) + "\n")
    rollout.main(rollout.RolloutConfig(model=path, eval="./ev.d/evalset", num_frames=8, max_new_tokens=4,
                                       max_pixels=64 * 64, temperature=1.5, top_p=0.5, seed=3, progress=False))
    settings = json.loads(open(tmp_path / "ev.d" / "evalset.predictions.jsonl").readline())["settings"]
    assert settings["temperature"] == 0.0 and "top_p" not in settings and "seed" not in settings
    assert settings["embeddings_cache"] == "" and settings["max_new_tokens"] == 4


@pytest.mark.parametrize("max_new_tokens", [0, 32769, 10 ** 12])
def test_cli_refuses_max_new_tokens_outside_the_context_before_decoding(tiny, videos, max_new_tokens, monkeypatch):
    """Checked against the text model's context (the tiny model's 32,768 positions) before any video is decoded
    (a huge cap used to fail in the allocator after the decoding)."""
    path, _, _ = tiny["qwen2_5_vl"]
    monkeypatch.setattr(rollout, "load_video", lambda *a, **k: pytest.fail("the video was decoded"))
    with pytest.raises(SystemExit, match=r"--max_new_tokens=\d+: give 1 to 32768 \(max_position_embeddings"):
        rollout.main(rollout.RolloutConfig(model=path, video=videos[0], question="q?", num_frames=8,
                                           max_new_tokens=max_new_tokens, progress=False))


def test_reload_noise_filter_drops_only_position_table_lines():
    """The filter on vLLM's layerwise-reload logger drops its 'Failed to load weights' line for rotary embeddings
    and the Omni audio encoder's sinusoids (computed tables, nothing to push there; both seen on an H100) and keeps
    it for any other layer, and keeps every other message."""
    def record(msg, *args):
        return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, __file__, 1,
                                 msg, args, None)
    assert not rollout.position_table_reload_noise(record("%s: Failed to load weights", "MRotaryEmbedding"))
    assert not rollout.position_table_reload_noise(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not rollout.position_table_reload_noise(record("%s: Failed to load weights", "SinusoidsPositionEmbedding"))
    assert rollout.position_table_reload_noise(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert rollout.position_table_reload_noise(record("%s: Delayed processing", "MRotaryEmbedding"))


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_vllm_request_gives_our_prompt_through_the_processor(tiny, videos, fam):
    """What VLLMEngine hands vLLM for a Qwen-VL prompt (rollout.vllm_request with the engine's processor
    arguments), through the model's processor as vLLM's processing calls it: our ids and pixels, and the argument
    that keeps transformers from warning about its per-frame pixel cap on every video."""
    path, model, processor = tiny[fam]
    prompt = prompts_for(model, processor, videos[:1])[0]
    request = rollout.vllm_request(prompt, rollout.engine_processor_kwargs(processor, omni=False))
    assert request["mm_processor_kwargs"] == {"cap_pixels_per_frame": False}
    video, meta = request["multi_modal_data"]["video"][0]
    assert meta.pop("do_sample_frames") is False  # vLLM takes it from the metadata
    out = processor(text=[request["prompt"]], videos=[video], video_metadata=[meta], do_sample_frames=False,
                    return_tensors="pt", **request["mm_processor_kwargs"])
    assert out["input_ids"][0].tolist() == prompt.input_ids.tolist()
    assert torch.equal(out["pixel_values_videos"], prompt.pixel_values_videos)


def test_omni_vllm_request_gives_our_prompt_through_the_processor(tmp_path):
    """What VLLMEngine hands vLLM for a Qwen2.5-Omni thinker (rollout.vllm_request), passed through transformers'
    Omni processor as vLLM's own processing calls it (text + videos + audio, the request's mm_processor_kwargs):
    the same prompt ids as our path (vlm.omni_layout: interleaved 2-second chunks of video and audio), the same
    pixels, the same audio features (not cut at 30 s) and the same seconds per temporal patch. A silent video:
    no audio item, no interleaving. On the GPU, tests/test_vllm_gpu.py checks vLLM itself."""
    path = make_tiny_model(str(tmp_path / "omni"), "qwen2_5_omni_thinker", seed=0)
    model, processor = vlm.load_model(path)
    frames = np.random.default_rng(0).integers(0, 255, (36 * 8, 56, 56, 3), dtype=np.uint8)
    beep = (0.3 * np.sin(2 * np.pi * 440 * np.arange(36 * 16000) / 16000)).astype(np.float32)  # 36 s > 30 s
    write_video(str(tmp_path / "beep.mp4"), frames, fps=8, audio=beep)
    write_video(str(tmp_path / "silent.mp4"), frames[:40], fps=8)

    class Cfg:
        fps, num_frames, max_frames, max_pixels, min_pixels = 0.0, 24, 64, 56 * 56, 28 * 28
    engine_kwargs = rollout.engine_processor_kwargs(processor, omni=True)
    for name, heard in (("beep", True), ("silent", False)):
        video = vlm.load_video(str(tmp_path / f"{name}.mp4"), Cfg, "qwen2_5_omni_thinker")
        prompt = vlm.build_prompt(model, processor, "What sound?", video, think=False)
        assert (prompt.num_audio_tokens > 36 * 25 - 2) == heard  # 25 audio tokens a second, all 36 s of them
        request = rollout.vllm_request(prompt, engine_kwargs, omni=True)
        data, kwargs = request["multi_modal_data"], request["mm_processor_kwargs"]
        assert ("audio" in data) == heard and kwargs.get("use_audio_in_video", False) == heard
        assert kwargs["fps"] == pytest.approx(24 / 36) if heard else True
        if heard:  # the processor of transformers >= 5.24 reads use_audio_in_video as load_audio_from_video
            kwargs = {**kwargs, "audio_from_video_indices": [0]}
        out = processor(text=[request["prompt"]], videos=[v for v, _ in data["video"]],
                        audio=[a for a, _ in data.get("audio", [])] or None, return_tensors="pt", **kwargs)
        assert out["input_ids"][0].tolist() == prompt.input_ids.tolist()
        assert torch.equal(out["pixel_values_videos"], prompt.pixel_values_videos)
        assert out["video_second_per_grid"][0] == pytest.approx(vlm.omni_seconds_per_group(model, video.metadata()))
        if heard:
            mel = int(out["feature_attention_mask"][0].sum())
            assert torch.equal(out["input_features"][0, :, :mel], prompt.input_features)

        # the positions our vLLM thinker gives this request, from what vLLM hands it (the prompt ids and its
        # multimodal features, here stand-ins with vLLM's attribute names): the training forward's positions
        def field(x):
            return SimpleNamespace(data=torch.as_tensor(x))
        video_data = {"video_grid_thw": field(out["video_grid_thw"][0]),
                      "second_per_grid_ts": field(out["video_second_per_grid"][0]), "use_audio_in_video": field(heard)}
        features = [SimpleNamespace(modality="video", data=video_data)]
        if heard:
            features.append(SimpleNamespace(modality="audio", data={"audio_feature_lengths": field(mel)}))
        positions, delta = rollout.omni_request_positions(model.config, prompt.input_ids.tolist(), features)
        assert torch.equal(positions, prompt.positions)
        assert len(prompt.input_ids) + delta == int(vlm.continue_positions(prompt.positions, 1)[0, 0])
        # not one of our requests (an image beside the video, or two videos): vLLM's own rule
        for extra in ("image", "video"):
            assert rollout.omni_request_positions(model.config, prompt.input_ids.tolist(),
                                                  features + [SimpleNamespace(modality=extra, data={})]) is None


def test_export_omni_config_is_the_whole_models_config_around_our_thinker(tmp_path):
    """vLLM builds Qwen2.5-Omni from the whole model's config: the exported folder holds Qwen2_5OmniConfig
    (our registered architecture: vLLM's thinker with our positions; no audio output) whose thinker is ours field
    for field, and our processor;
    no weights (the engine takes them by a push, under thinker.*)."""
    from transformers import AutoConfig, AutoProcessor
    path = make_tiny_model(str(tmp_path / "omni"), "qwen2_5_omni_thinker", seed=0)
    model, processor = vlm.load_model(path)
    out = rollout.export_omni_config(model, processor, str(tmp_path / "vllm"))
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen2_5_omni" and config.architectures == [rollout.OMNI_ARCHITECTURE]
    assert not config.enable_audio_output
    theirs, ours = config.thinker_config.to_dict(), model.config.to_dict()
    for key in ("text_config", "vision_config", "audio_config", "audio_token_index", "video_token_index",
                "position_id_per_seconds", "seconds_per_chunk"):
        assert theirs[key] == ours[key], key
    assert rollout.engine_processor_kwargs(AutoProcessor.from_pretrained(out), True) == \
        rollout.engine_processor_kwargs(processor, True)
    assert not [f for f in os.listdir(out) if f.endswith(".safetensors")]


class SleepModeLLM:
    """vllm 0.24's sleep-mode bookkeeping, as read from its source (v1/engine/core.py, v1/executor/abstract.py):
    sleep(level >= 1) puts the "weights" and "kv_cache" tags to sleep; wake_up(tags) warns "Executor is not
    sleeping." when nothing sleeps and "Tag ... is not in sleeping tags" for a tag that is awake. Records those
    warnings and every weight push (which must find the weights awake)."""
    def __init__(self):
        self.sleeping, self.warnings, self.pushes = set(), [], 0
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: None)

    def sleep(self, level=1):
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        if not self.sleeping:
            self.warnings.append("Executor is not sleeping.")
            return
        for tag in tags or []:
            if tag not in self.sleeping:
                self.warnings.append(f"Tag {tag} is not in sleeping tags {self.sleeping}")
                return
        self.sleeping -= set(tags) if tags else self.sleeping

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and "weights" not in self.sleeping, "a push into sleeping weights"
        list(kwargs["weights_iterator"])
        self.pushes += 1

    def reset_prefix_cache(self):
        pass


def test_vllm_engine_wakes_only_what_sleeps():
    """VLLMEngine's wake / sleep / load_weights in train_grpo.py's order (a push into the fresh engine, evaluation,
    then per step: wake, rollout, sleep, push) against vLLM's sleep-mode rules: never a wake-up of something
    awake (vLLM's "Executor is not sleeping." / "Tag ... is not in sleeping tags"), never a push into sleeping
    weights, and everything awake whenever a rollout would run."""
    engine = object.__new__(rollout.VLLMEngine)  # its state machine alone: no vLLM here
    engine.llm, engine.awake, engine.sleep_level = SleepModeLLM(), {"weights": True, "kv_cache": True}, 1
    engine.prompt_embeds = engine.omni = False
    push = [("w", torch.zeros(1))]
    engine.load_weights(iter(push))          # the policy's first weights (train_grpo.py, before evaluation)
    engine.wake()                            # evaluation before training
    for _ in range(3):
        engine.wake()                        # rollout
        assert not engine.llm.sleeping and all(engine.awake.values())
        engine.sleep()                       # the trainer's turn
        engine.load_weights(iter(push))      # the updated policy (wakes the weights only)
        assert engine.llm.sleeping == {"kv_cache"}
    engine.wake()
    assert not engine.llm.sleeping and engine.llm.pushes == 4 and engine.llm.warnings == []


def test_vllm_engine_without_vllm_says_so_and_keeps_vllm_quiet(monkeypatch):
    """Without vllm installed (this machine, CI) the engine stops with an instruction; before importing vllm it sets
    vLLM's log level to WARNING unless the user chose one (vLLM reads it at its first import)."""
    import sys
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing it fails, as where it is not installed
    with pytest.raises(SystemExit, match="needs vllm"):
        rollout.VLLMEngine("/nowhere")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    with pytest.raises(SystemExit):
        rollout.VLLMEngine("/nowhere")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


class _EmbedsEngine:
    """What VLLMEngine shows rollout.evaluate for an embedding VLM (vLLM takes prompt embeddings): no vLLM here."""
    prompt_embeds = True

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=8, embeds=None):
        assert embeds is not None and len(embeds) == len(prompts)
        return [rollout.Rollout(i, p.input_ids.tolist(), [0], "<answer> A </answer>", [0.0])
                for i, p in enumerate(prompts)]


def _eval_with_embeds_engine(rank, world, init_file, model_dir, eval_file, out_dir, out):
    import datetime
    import torch.distributed as dist
    from common import Dist, Root, wrap_fsdp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model, processor = vlm.load_model(model_dir)
        policy = wrap_fsdp(Root(model), vlm.fsdp_units(model), Dist(rank=rank, world_size=world), False)
        cfg = rollout.RolloutConfig(eval_batch_size=1, max_new_tokens=4, num_frames=4, max_pixels=56 * 56,
                                    min_pixels=28 * 28, think=False, progress=False)
        ev = rollout.evaluate_all(policy, processor, rollout.load_jsonl(eval_file), cfg, _EmbedsEngine(), "t",
                                  out_dir)
        out[rank] = ev["num_scored"]
    finally:
        dist.destroy_process_group()


def test_eval_through_a_prompt_embeddings_engine_keeps_ranks_in_lockstep(tmp_path):
    """vLLM with prompt embeddings (LLaVA, VILA): each eval batch still encodes its frames through the FSDP2
    policy, so 3 held-out rows in batches of 1 on 2 ranks (2 batches and 1) need a placeholder batch on rank 1
    (before: gloo's size mismatch, a hang on NCCL)."""
    import torch.multiprocessing as mp
    make_tiny_model(str(tmp_path / "m"), "llava")
    rows = []
    for k in range(3):
        frames = [np.random.default_rng(k).integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(8)]
        write_video(str(tmp_path / f"v{k}.mp4"), frames, 4)
        rows.append({"video": f"v{k}.mp4", "problem": "Which colour?", "options": ["A. red", "B. blue"],
                     "answer": "A"})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_eval_with_embeds_engine, args=(2, str(tmp_path / "pg"), str(tmp_path / "m"),
                                                  str(tmp_path / "eval.jsonl"), str(tmp_path), out), nprocs=2)
        assert out[0] == out[1] == 3
