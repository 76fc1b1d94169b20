"""
vlm.py's model families beyond Qwen-VL: the Qwen2.5-Omni thinker (video + its audio track) and the embedding VLMs:
LLaVA-style, and VILA-style (LongVILA-R1's remote-code interface: our stand-in data/vila_standin.py, loaded with
trust_remote_code). Our forward (features written into the placeholder embeddings, decoder fed inputs_embeds)
must give the logits of the model's own forward on the same input.
    python -m pytest tests/test_vlm.py -q
"""
import json
import os

import numpy as np
import pytest
import torch

import vlm
from data.tiny import TinySize, make_tiny_model
from data.video import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class VideoCfg:
    fps, num_frames, max_frames, max_pixels, min_pixels = 0.0, 8, 64, 56 * 56, 28 * 28


def tone(seconds: float, hz: float, sr: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three 5-second videos with the same frames: a 440 Hz track, a 1,000 Hz track, and no audio."""
    d = tmp_path_factory.mktemp("media")
    frames = np.random.default_rng(0).integers(0, 255, (40, 56, 56, 3), dtype=np.uint8)
    paths = {"a440": str(d / "a440.mp4"), "a1000": str(d / "a1000.mp4"), "silent": str(d / "silent.mp4")}
    write_video(paths["a440"], frames, fps=8, audio=tone(5, 440))
    write_video(paths["a1000"], frames, fps=8, audio=tone(5, 1000))
    write_video(paths["silent"], frames, fps=8)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for fam in ("qwen2_5_omni_thinker", "llava", "vila"):
        model, processor = vlm.load_model(make_tiny_model(str(tmp_path_factory.mktemp(fam)), fam, seed=0))
        out[fam] = (model.eval(), processor)
    return out


def our_logits(model, prompt):
    feats = vlm.encode_videos(model, [prompt])
    hidden, _ = vlm.decoder_hidden(model, prompt.input_ids[None], prompt.positions[:, None], feats)
    return vlm.output_head(model)(hidden)[0]


def their_logits(model, processor, prompt, response=None):
    """The model's own forward on the same prompt (+ response tokens). VILA: its _embed on the templated ids (one
    media token, pad/eos ids still in) and the frames, then its LLM, with the response embedded after the prompt
    embeddings as Long-RL's actor does (dp_actor._forward_micro_batch_vila)."""
    if vlm.family(model) == "llava":
        ids = prompt.input_ids if response is None else torch.cat([prompt.input_ids, response])
        return model(input_ids=ids[None], pixel_values=prompt.pixel_values_videos).logits[0]
    raw = processor.tokenizer(prompt.text, return_tensors="pt").input_ids
    emb, _, mask = model._embed(raw, {"video": [prompt.pixel_values_videos]}, {"video": {}}, None, None)
    if response is not None:
        emb = torch.cat([emb, vlm.input_embeddings(model)(response)[None]], dim=1)
    return model.llm(inputs_embeds=emb).logits[0]


def test_omni_layout_matches_the_processor(models, media):
    """Our interleaved <video chunk><audio chunk> ids equal transformers' processor output for the same frames
    and audio (its use_audio_in_video path), and our logits equal the thinker's own forward on them."""
    model, processor = models["qwen2_5_omni_thinker"]
    video = vlm.load_video(media["a440"], VideoCfg, "qwen2_5_omni_thinker")
    prompt = vlm.build_prompt(model, processor, "What sound?", video, think=False)
    assert prompt.num_audio_tokens > 0 and prompt.num_video_tokens > 0
    sampled_fps = len(video.indices) / video.total_frames * video.fps
    # else the class default wins
    size = {k: v for k, v in dict(processor.video_processor.size).items() if v is not None}
    ref = processor(size=size, text=[prompt.text], videos=[video.frames], audio=[video.audio],
                    load_audio_from_video=True,
                    audio_from_video_indices=[0], fps=sampled_fps, do_sample_frames=False, return_tensors="pt",
                    audio_kwargs={"truncation": False, "padding": "longest"})
    assert ref["input_ids"][0].tolist() == prompt.input_ids.tolist()
    with torch.no_grad():
        theirs = model(**ref, use_audio_in_video=True).logits[0]
        ours = our_logits(model, prompt)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_omni_audio_reaches_the_model(models, media):
    """Same frames, different audio track: the log-probs of the same response change; no audio: video only."""
    model, processor = models["qwen2_5_omni_thinker"]
    response = torch.tensor(processor.tokenizer("<answer> A </answer>")["input_ids"])
    logps = {}
    for name in ("a440", "a1000", "silent"):
        prompt = vlm.build_prompt(model, processor, "What sound?", vlm.load_video(media[name], VideoCfg,
                                                                                 "qwen2_5_omni_thinker"), think=False)
        packed = vlm.pack([(prompt.input_ids, prompt.positions, response)], pad_id=0)
        with torch.no_grad():
            logps[name], _ = vlm.response_logprobs(model, packed, vlm.encode_videos(model, [prompt]), [])
        if name == "silent":
            assert prompt.num_audio_tokens == 0 and prompt.input_features is None
            assert (prompt.input_ids == model.config.audio_token_id).sum() == 0
    assert (logps["a440"] - logps["a1000"]).abs().max() > 1e-4
    assert logps["silent"].shape == logps["a440"].shape and torch.isfinite(logps["silent"]).all()


@pytest.mark.parametrize("fam", ["llava", "vila"])
def test_embedding_vlm_logits_equal_its_own_forward(models, media, fam):
    """inputs_embeds built by us (every frame's rows in order) == the model's own forward, for the whole prompt,
    and our response log-probs == log_softmax of its logits: LlavaForConditionalGeneration on input_ids +
    pixel_values; VILA's _embed (its video encoder, its prompt layout) + its LLM."""
    model, processor = models[fam]
    prompt = vlm.build_prompt(model, processor, "What colour?", vlm.load_video(media["silent"], VideoCfg, fam),
                              think=False)
    assert prompt.num_video_tokens == 8 * vlm.frame_tokens(model)
    assert (prompt.positions[0] == torch.arange(len(prompt.input_ids))).all()
    if fam == "vila":  # a frame: 4 projected rows, then "\n"; its _embed drops eos (<|im_end|>) from the prompt
        assert vlm.frame_block(model) == [vlm.media_token_id(model)] * 4 + processor.tokenizer("\n").input_ids
        assert processor.tokenizer.eos_token_id not in prompt.input_ids.tolist()
    response = torch.tensor(processor.tokenizer("<answer> A </answer>")["input_ids"] + [2])
    packed = vlm.pack([(prompt.input_ids, prompt.positions, response)], pad_id=0)
    with torch.no_grad():
        assert torch.allclose(our_logits(model, prompt), their_logits(model, processor, prompt), atol=1e-5)
        theirs = their_logits(model, processor, prompt, response)[len(prompt.input_ids) - 1:-1].log_softmax(-1)
        ours, _ = vlm.response_logprobs(model, packed, vlm.encode_videos(model, [prompt]), [])
    theirs = theirs.gather(-1, response[:, None])[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_placeholder_errors_are_clear(models):
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="0 media placeholders"):
        vlm.expand_placeholder(ids, 9, [9, 9])
    assert vlm.expand_placeholder(torch.tensor([1, 9, 3]), 9, [9, 9]).tolist() == [1, 9, 9, 3]


# ---- the families through the GRPO loop ------------------------------------------------------------------------

def test_deepstack_rows_come_per_video_in_every_transformers(tmp_path, monkeypatch):
    """Qwen3-VL's DeepStack rows are per layer per video in transformers 5.24; before it, get_video_features
    returns each layer's rows whole. vlm.video_features gives per-video rows either way (two videos: the second
    gets its own rows, not the first one's)."""
    model, _ = vlm.load_model(make_tiny_model(str(tmp_path), "qwen3_vl", seed=0))
    c = model.config.vision_config
    grid = torch.tensor([[2, 4, 4], [1, 4, 8]])
    pix = torch.randn(int(grid.prod(-1).sum()), c.in_channels * c.temporal_patch_size * c.patch_size ** 2)
    inner = vlm.media_model(model)
    real = inner.get_video_features

    def whole_layers(*args, **kwargs):  # what transformers 5.17 (the GPU image's) returns
        out = real(*args, **kwargs)
        out.deepstack_features = [d if torch.is_tensor(d) else torch.cat(d) for d in out.deepstack_features]
        return out
    with torch.no_grad():
        per_video = vlm.video_features(model, pix, grid)
        monkeypatch.setattr(inner, "get_video_features", whole_layers)
        from_whole = vlm.video_features(model, pix, grid)
    assert len(per_video.deepstack_features) == len(from_whole.deepstack_features) > 0
    for a, b in zip(per_video.deepstack_features, from_whole.deepstack_features):
        assert [len(x) for x in a] == [len(x) for x in b] == [len(e) for e in per_video.pooler_output]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def family_cfg(run_dir, model_dir, out, **kw):
    import train_grpo as T
    base = dict(out_dir=str(out), data=os.path.join(run_dir, "train.jsonl"), model=model_dir, num_frames=8,
                max_pixels=56 * 56, min_pixels=28 * 28, rollout_batch_size=2, n=4, max_new_tokens=8, lr=1e-3,
                max_steps=1, eval_every=0, save_every=100, progress=False, gradient_checkpointing=False,
                micro_batch_size=8, think=False)
    return T.Config(**{**base, **kw})


def first_metrics(out_dir) -> dict:
    return json.loads(open(os.path.join(out_dir, "metrics.jsonl")).readline())


def test_omni_grpo_step_on_video_with_audio(tmp_path):
    """One GRPO step of the tiny Omni thinker on synthetic videos whose audio beeps with the flash; SP=2 on two
    gloo processes (video and audio rows sliced per rank) gives the same loss."""
    import train_grpo as T
    from conftest import torchrun, write_preset
    from data.synthetic import SyntheticConfig, make_dataset
    make_dataset(SyntheticConfig(out=str(tmp_path / "data"), num_train=4, num_eval=2, frames=16, size=56, audio=True))
    model_dir = make_tiny_model(str(tmp_path / "omni"), "qwen2_5_omni_thinker", seed=0)
    # a short format warm-up so that rewards vary and the loss is not trivially 0; then the same step with SP=2
    common = dict(sft_steps=12, sft_lr=1e-2, sft_batch_size=4, temperature=1.5, sp_split_rollout=False)
    T.main(family_cfg(tmp_path / "data", model_dir, tmp_path / "run", **common))
    m = first_metrics(tmp_path / "run")
    assert m["step"] == 1 and m["skipped_samples"] == 0 and m["loss"] != 0.0 and np.isfinite(m["loss"])
    cfg = family_cfg(tmp_path / "data", model_dir, tmp_path / "sp2", sp_size=2, **common)
    assert "dp 1 x sp 2" in torchrun("train_grpo.py", [write_preset(cfg, tmp_path / "sp2.py")])
    sp2 = first_metrics(tmp_path / "sp2")
    assert sp2["reward"] == m["reward"] and sp2["loss"] == pytest.approx(m["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("fam", ["llava", "vila"])
def test_embedding_vlm_rollout_grpo_cache_and_sp2(tmp_path, fam):
    """An embedding VLM (LLaVA-style; VILA-style through trust_remote_code): HF rollout + one GRPO step; the same
    step from the embeddings cache (same loss); and SP=2 on two gloo processes (same loss as SP=1)."""
    import cache_embeddings
    import train_grpo as T
    from conftest import torchrun, write_preset
    from data.synthetic import SyntheticConfig, make_dataset
    make_dataset(SyntheticConfig(out=str(tmp_path / "data"), num_train=4, num_eval=2, frames=8, size=56))
    model_dir = make_tiny_model(str(tmp_path / fam), fam, seed=0)
    # a short format warm-up so that rewards vary and the loss is not trivially 0 (a long one amplifies float
    # differences between SP=1 and SP=2 into different samples); the tower frozen for the cache run
    common = dict(sft_steps=12, sft_lr=1e-2, sft_batch_size=4, temperature=1.5, freeze_vision=True,
                  sp_split_rollout=False)
    T.main(family_cfg(tmp_path / "data", model_dir, tmp_path / "live", **common))
    live = first_metrics(tmp_path / "live")
    assert live["loss"] != 0.0
    cache = str(tmp_path / "cache")
    res = cache_embeddings.main(cache_embeddings.CacheConfig(model=model_dir,
                                                             data=str(tmp_path / "data" / "train.jsonl"),
                                                             out=cache, num_frames=8, max_pixels=56 * 56,
                                                             progress=False))
    assert res["written"] == 4 and res["bad"] == 0
    T.main(family_cfg(tmp_path / "data", model_dir, tmp_path / "cached", embeddings_cache=cache, **common))
    cached = first_metrics(tmp_path / "cached")
    assert cached["reward"] == live["reward"] and cached["loss"] == pytest.approx(live["loss"], rel=1e-4, abs=1e-6)
    cfg = family_cfg(tmp_path / "data", model_dir, tmp_path / "sp2", sp_size=2, **common)
    assert "dp 1 x sp 2" in torchrun("train_grpo.py", [write_preset(cfg, tmp_path / "sp2.py")])
    sp2 = first_metrics(tmp_path / "sp2")
    assert sp2["reward"] == live["reward"] and sp2["loss"] == pytest.approx(live["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("fam", ["llava", "vila"])
def test_exported_language_model_on_prompt_embeds(models, media, tmp_path, fam):
    """What the vLLM engine gets for an embedding VLM: the decoder exported as a causal LM, fed our prompt
    embeddings, gives our logits (vLLM itself: tests/test_vllm_gpu.py on a GPU)."""
    import rollout
    from transformers import AutoModelForCausalLM
    model, processor = models[fam]
    prompt = vlm.build_prompt(model, processor, "What?", vlm.load_video(media["silent"], VideoCfg, fam),
                              think=False)
    lm = AutoModelForCausalLM.from_pretrained(rollout.export_language_model(model, processor, str(tmp_path / "lm")))
    with torch.no_grad():
        theirs = lm(inputs_embeds=rollout.prompt_embeddings(model, [prompt])[0][None]).logits[0]
        ours = our_logits(model, prompt)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_checkpoint_modes_same_gradients_and_attention_kept(tmp_path):
    """Every activation-memory mode gives the gradients of no checkpointing; "attention" runs the attention kernel
    once per layer (kept for backward), "full" twice (recomputed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func) and "backward" not in str(func):
                CountAttention.calls += 1
            return func(*args, **(kwargs or {}))

    model, _ = vlm.load_model(make_tiny_model(str(tmp_path / "q"), "qwen2_5_vl", seed=0))
    model.train()
    ids = torch.randint(20, 300, (2, 96), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(96).view(1, 1, -1).expand(3, 2, -1)

    def grads(mode, chunk=0):
        vlm.set_checkpointing(model, mode, chunk)
        model.zero_grad()
        CountAttention.calls = 0
        with CountAttention():
            hidden, _ = vlm.decoder_hidden(model, ids, pos)
            logp, _ = vlm.token_logprobs(model, hidden[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), [])
            logp.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, CountAttention.calls

    ref, _ = grads("none")
    layers = model.config.get_text_config().num_hidden_layers
    for mode, chunk in [("full", 0), ("attention", 0), ("offload", 0), ("offload", 32), ("full", 40)]:
        g, calls = grads(mode, chunk)
        assert g.keys() == ref.keys()
        assert max((g[n] - ref[n]).abs().max() for n in ref) < 1e-5, (mode, chunk)
        if chunk == 0:
            assert calls == (layers if mode == "attention" else 2 * layers), (mode, calls)


def test_omni_embeddings_cache_equals_live(models, media, tmp_path):
    """Qwen2.5-Omni through cache_embeddings.py: vision and audio rows cached; the rebuilt prompt (same ids, same
    positions) gives the live log-probs, with and without an audio track."""
    import cache_embeddings
    model, processor = models["qwen2_5_omni_thinker"]
    response = torch.tensor(processor.tokenizer("<answer> A </answer>")["input_ids"])
    for name in ("a440", "silent"):
        video = vlm.load_video(media[name], VideoCfg, "qwen2_5_omni_thinker")
        live = vlm.build_prompt(model, processor, "What sound?", video, think=False)
        want = cache_embeddings.expected_meta(media[name], VideoCfg, model)
        path = cache_embeddings.entry_path(str(tmp_path), want)
        cache_embeddings.write_entry(path, cache_embeddings.encode_video(model, processor, video),
                                     {**want, "frames": video.metadata()})
        entry = cache_embeddings.load_cached(str(tmp_path), media[name], VideoCfg, model)
        cached = vlm.build_prompt_cached(model, processor, "What sound?", entry, think=False)
        assert cached.input_ids.tolist() == live.input_ids.tolist() and (cached.positions == live.positions).all()
        assert (entry.audio is not None) == (name == "a440")
        logps = []
        for p in (live, cached):
            packed = vlm.pack([(p.input_ids, p.positions, response)], pad_id=0)
            with torch.no_grad():
                logps.append(vlm.response_logprobs(model, packed, vlm.encode_videos(model, [p]), [])[0])
        assert torch.allclose(logps[0], logps[1], atol=1e-5)


WHERE = [0, 1, 0, 0, 1]  # the prompt of each response: the two prompts' responses interleaved


def group_case(tmp_path, media, fam, device="cpu", size=TinySize()):
    """A tiny model of `fam` (fp32), two video prompts and five ragged text-only responses, packed as groups."""
    torch.manual_seed(0)
    model, processor = vlm.load_model(make_tiny_model(str(tmp_path / fam), fam, size, seed=0), "float32",
                                      device=device)
    prompts = [vlm.build_prompt(model, processor, q, vlm.load_video(media[m], VideoCfg, fam), think=False)
               for q, m in (("What colour?", "a440"), ("Which sound?", "a1000"))]
    pool = torch.tensor(processor.tokenizer("the flash was red then green then blue <answer> B </answer>").input_ids)
    responses = [pool[torch.randint(0, len(pool), (n,))] for n in (4, 1, 6, 2, 5)]
    packed = vlm.pack_groups(responses, WHERE, [(p.input_ids, p.positions) for p in prompts], pad_id=0)
    return model, prompts, packed, responses


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "llava", "vila"])
def test_group_packing_equals_separate_sequences(tmp_path, media, fam):
    """One row per prompt, [prompt | response_1 | ... | response_k], with the group mask (vlm.PackedGroups): every
    response token's log-prob, entropy and every parameter's gradient equal those of one prompt+response row per
    response (vlm.pack), with ragged responses given in an order that interleaves the two prompts."""
    model, prompts, packed, responses = group_case(tmp_path, media, fam)
    weights = torch.rand(sum(len(r) for r in responses))       # a loss that weights every token differently

    def run(grouped: bool):
        model.zero_grad(set_to_none=True)
        feats = vlm.encode_videos(model, prompts)
        if grouped:
            lp, ent = vlm.group_logprobs(model, packed, feats, [], with_entropy=True)
        else:
            rows = vlm.pack([(prompts[g].input_ids, prompts[g].positions, r) for g, r in zip(WHERE, responses)], 0)
            lp, ent = vlm.response_logprobs(model, rows, vlm.select_videos(feats, WHERE), [], with_entropy=True)
        (lp * weights).sum().backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp_sep, ent_sep, grad_sep = run(False)
    lp_grp, ent_grp, grad_grp = run(True)
    assert lp_grp.shape == (18,)
    assert torch.allclose(lp_grp, lp_sep, atol=1e-5), (lp_grp - lp_sep).abs().max()
    assert torch.allclose(ent_grp, ent_sep, atol=1e-5)
    assert grad_grp.keys() == grad_sep.keys() and len(grad_sep) > 10
    for name, g in grad_sep.items():
        assert torch.allclose(grad_grp[name], g, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("fam, backend", [("qwen2_5_vl", "inductor"), ("qwen3_vl", "aot_eager"),
                                          ("llava", "aot_eager")])
def test_compiled_blocks_equal_eager(tmp_path, media, fam, backend):
    """vlm.compile_blocks (each block's norms, MLP and Qwen vision attention under torch.compile) changes no
    number: the packed groups' log-probs and every gradient equal eager mode's, under full checkpointing (the
    compiled parts run again in the recompute). inductor: the fused kernels themselves (here its C++ ones; on a GPU
    Triton's), to fp32 rounding (fused reductions sum in another order); aot_eager: dynamo's capture and the
    autograd graph alone, exactly. The parts must really be compiled, and window_attention, kept eager, must not
    break a graph with a warning."""
    model, prompts, packed, responses = group_case(tmp_path, media, fam)
    vlm.set_checkpointing(model, "full")
    model.train()
    weights = torch.rand(sum(len(r) for r in responses))

    def run():
        model.zero_grad(set_to_none=True)
        lp, _ = vlm.group_logprobs(model, packed, vlm.encode_videos(model, prompts), [])
        (lp * weights).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp_eager, grad_eager = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    vlm.compile_blocks(model, "norms,mlp,vision_attention", backend=backend)
    names = [n for part in vlm.BLOCK_PARTS.values() for n in part]
    parts = [getattr(b, n) for b in vlm.fsdp_units(model) for n in names if hasattr(b, n)]
    assert len(parts) >= 2 * len(vlm.fsdp_units(model)) and all(p._compiled_call_impl is not None for p in parts)
    lp_compiled, grad_compiled = run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0               # dynamo did capture them
    assert not [b for b in torch._dynamo.utils.counters["graph_break"] if "disable" not in b]   # only the eager one
    atol, rtol = (1e-5, 1e-4) if backend == "inductor" else (1e-6, 1e-5)
    assert torch.allclose(lp_compiled, lp_eager, atol=atol), (lp_compiled - lp_eager).abs().max()
    assert grad_compiled.keys() == grad_eager.keys()
    for name, g in grad_eager.items():
        assert torch.allclose(grad_compiled[name], g, atol=atol, rtol=rtol), name


def test_compile_blocks_names_its_parts():
    assert vlm.block_part_names("") == [] and vlm.block_part_names("mlp, norms") == ["mlp", *vlm.BLOCK_PARTS["norms"]]
    for bad in ("norms,attention", "mlp,,x"):
        with pytest.raises(ValueError, match="norms, mlp, vision_attention"):
            vlm.compile_blocks(torch.nn.Module(), bad)


def test_group_mask_hides_other_responses():
    packed = vlm.pack_groups([[7, 8], [9]], [0, 0], [(torch.tensor([1, 2, 3]), torch.arange(3).expand(3, 3))], 0)
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 2]]
    assert packed.positions[0, 0].tolist() == [0, 1, 2, 3, 4, 3]    # each response continues from the prompt
    assert packed.pred_rows.tolist() == [2, 3, 2] and packed.labels.tolist() == [7, 8, 9]
    visible = vlm.group_attention_mask(packed.segments, torch.float32)[0, 0] == 0
    assert visible.tolist() == [[1, 0, 0, 0, 0, 0],
                                [1, 1, 0, 0, 0, 0],
                                [1, 1, 1, 0, 0, 0],
                                [1, 1, 1, 1, 0, 0],
                                [1, 1, 1, 1, 1, 0],
                                [1, 1, 1, 0, 0, 1]]             # response 2 sees the prompt and itself only
    empty = vlm.pack_groups([[], [9]], [0, 0], [(torch.tensor([1, 2, 3]), torch.arange(3).expand(3, 3))], 0)
    assert empty.pred_rows.tolist() == [2] and empty.labels.tolist() == [9]   # an empty response scores nothing


@pytest.mark.parametrize("block, lengths", [
    (8, [[17, 5, 9, 0, 12], [30, 3, 3]]),            # ragged rows, an empty response, padding, a ragged last tile
    (8, [[16, 8, 8, 16]]),                           # every run on a tile boundary: full tiles off the diagonal
    (8, [[15, 9, 16]]),                              # a key tile of 7 prompt keys + 1 other response's: partial
    (128, [[300, 70, 128, 1, 200], [129, 400]]),     # the kernel's tile size
])
def test_group_block_mask_equals_create_block_mask(block, lengths):
    """vlm.group_block_mask builds the BlockMask from the rule's shape (no compile, no S x S tensor); it must list
    exactly the tiles create_block_mask (the dense reference: materialise, then tile) lists: the same full and
    partial tiles in the same order, for the forward and (transposed) for the backward."""
    from torch.nn.attention.flex_attention import create_block_mask
    S = max(sum(row) for row in lengths)
    segments = torch.full((len(lengths), S), -1)
    for g, row in enumerate(lengths):
        segments[g, :sum(row)] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    got = vlm.group_block_mask(segments, "cpu", block)
    want = create_block_mask(lambda b, h, q, k: vlm.group_visible(q, k, segments[b, q], segments[b, k]),
                             B=len(lengths), H=None, Q_LEN=S, KV_LEN=S, device="cpu", BLOCK_SIZE=block)
    assert got.seq_lengths == want.seq_lengths and got.BLOCK_SIZE == want.BLOCK_SIZE
    assert (got.full_kv_num_blocks > 0).any() and (got.kv_num_blocks > 0).any()    # both kinds of tile occur
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for count, name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                        ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n = getattr(want, count)
        listed = torch.arange(getattr(want, name).shape[-1]) < n[..., None]          # the listed entries only
        assert torch.equal(getattr(got, name)[listed], getattr(want, name)[listed]), name
    assert torch.equal(got.to_dense(), want.to_dense())
    q, k = torch.arange(S)[:, None], torch.arange(S)[None, :]
    for b in range(len(lengths)):                     # the mask the partial tiles apply is the rule itself
        assert torch.equal(got.mask_mod(b, 0, q, k), vlm.group_visible(q, k, segments[b, q], segments[b, k]))


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "llava", "vila"])
def test_group_flex_attention_equals_dense_mask_forward(tmp_path, media, fam):
    """The GPU path's attention ("group_flex": FlexAttention over vlm.group_block_mask) gives the dense-mask
    log-probs; on the CPU FlexAttention runs forward only (its backward is GPU-only in torch 2.14), so the
    gradients are checked on a GPU (test_group_flex_attention_gradients_on_gpu)."""
    model, prompts, packed, _ = group_case(tmp_path, media, fam)
    with torch.no_grad():
        feats = vlm.encode_videos(model, prompts)
        dense, _ = vlm.group_logprobs(model, packed, feats, [])
        previous = vlm.use_attention(model, "group_flex")
        flex, _ = vlm.group_logprobs(model, packed, feats, [])
        vlm.use_attention(model, previous)
    assert torch.allclose(flex, dense, atol=1e-5), (flex - dense).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernel runs on a GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_group_flex_kernel_in_bf16_at_real_head_sizes(head_dim):
    """The kernel as training runs it: bf16, GQA, the head sizes of real models (Qwen2.5-VL-3B/7B: 128), two
    packed rows with ragged responses and padding. Forward and backward equal SDPA under the dense group mask to
    bf16 precision (on the lent H100 a tiny model's head_dim 16 did not compile: NoValidChoicesError)."""
    torch.manual_seed(0)
    segments = torch.tensor([[0] * 150 + [1] * 40 + [2] * 30 + [-1] * 36, [0] * 100 + [1] * 60 + [2] * 50 + [3] * 46])
    G, S = segments.shape
    q = torch.randn(G, 4, S, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(G, 2, S, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    weight = torch.randn(G, S, 4, head_dim, device="cuda", dtype=torch.bfloat16)
    flex, _ = vlm.group_flex_attention(None, q, k, v, vlm.group_block_mask(segments, "cuda"), head_dim ** -0.5)
    (flex.float() * weight).sum().backward()
    got = [flex.detach().float()] + [t.grad.float() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dense = vlm.group_attention_mask(segments, torch.bfloat16).cuda()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=head_dim ** -0.5,
                                                           enable_gqa=True).transpose(1, 2)
    (ref.float() * weight).sum().backward()
    want = [ref.detach().float()] + [t.grad.float() for t in (q, k, v)]
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU in torch 2.14")
@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_group_flex_attention_gradients_on_gpu(tmp_path, media, fam):
    """FlexAttention's forward and backward on the GPU equal the dense-mask SDPA path's, in fp32 (head_dim 64: the
    GPU kernel's tiles; real models have 64-128)."""
    model, prompts, packed, _ = group_case(tmp_path, media, fam, device="cuda",
                                           size=TinySize(hidden=128, heads=2, kv_heads=1))
    weights = torch.rand(len(packed.labels), device="cuda")
    grads = {}
    for name in ("sdpa", "group_flex"):
        vlm.use_attention(model, name)
        model.zero_grad(set_to_none=True)
        lp, _ = vlm.group_logprobs(model, packed, vlm.encode_videos(model, prompts), [])
        (lp * weights).sum().backward()
        grads[name] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (lp_d, g_d), (lp_f, g_f) = grads["sdpa"], grads["group_flex"]
    assert torch.allclose(lp_f, lp_d, atol=1e-4)
    for n, g in g_d.items():
        assert torch.allclose(g_f[n], g, atol=1e-4, rtol=1e-3), n


def vision_gradients(model, pixels, grid):
    """The tower's per-video outputs and d(sum of squares)/d(pixels and weights) (the training case)."""
    model.zero_grad(set_to_none=True)
    pixels = pixels.clone().requires_grad_(True)
    out = vlm.media_model(model).get_video_features(pixels, grid, return_dict=True).pooler_output
    sum(o.float().square().sum() for o in out).backward()
    grads = {n: p.grad.float() for n, p in vlm.media_model(model).visual.named_parameters() if p.grad is not None}
    return [o.detach().float() for o in out], pixels.grad.float(), grads


def random_pixel_rows(vc, grid, **kwargs):
    """Random pixel rows as the Qwen processors lay them out: one row (channels x temporal patch x patch x patch
    values) per patch of every video's grid (t, h, w); vc the vision config."""
    return torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                       **kwargs)


def assert_equal_to_bf16_precision(got, ref):
    """Two vision_gradients results (outputs, pixel gradient, weight gradients) agree to bf16 precision."""
    (out, dpix, grads), (out_ref, dpix_ref, grads_ref) = got, ref
    for a, b in [*zip(out, out_ref), (dpix, dpix_ref), *((grads[n], g) for n, g in grads_ref.items())]:
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3


# grids (t, h, w) in patches: [2, 8, 8] gives Qwen2.5-VL equal 112-pixel windows (4 x 4 merged units); [2, 10, 6]
# and [1, 12, 14] do not divide into them: ragged windows, and frames of two sizes in one call
@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker"])
@pytest.mark.parametrize("grids", [[[2, 8, 8], [1, 8, 8]], [[2, 10, 6], [1, 12, 14]]])
def test_batched_window_attention_equals_the_loop(tmp_path, fam, grids):
    """vlm.window_attention (all of a layer's windows in one SDPA call) gives the vision tower's outputs and every
    gradient of transformers' own loop (one SDPA call per window), with equal and with ragged windows."""
    path = make_tiny_model(str(tmp_path), fam, seed=0)
    (loop, _), (batched, _) = vlm.load_model(path, vision_attention="loop"), vlm.load_model(path)
    assert loop.config.vision_config._attn_implementation == "sdpa"
    assert batched.config.vision_config._attn_implementation == vlm.WINDOW_ATTENTION
    assert batched.config.get_text_config()._attn_implementation == "sdpa"   # the decoder's is left alone
    grid = torch.tensor(grids)
    pixels = random_pixel_rows(loop.config.vision_config, grid, generator=torch.Generator().manual_seed(0))
    (out_l, dpix_l, g_l), (out_b, dpix_b, g_b) = (vision_gradients(m, pixels, grid) for m in (loop, batched))
    for a, b in zip(out_b, out_l):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(dpix_b, dpix_l, atol=1e-8, rtol=1e-5)
    assert g_b.keys() == g_l.keys() and len(g_b) > 10
    for n, g in g_l.items():
        assert torch.allclose(g_b[n], g, atol=1e-7, rtol=1e-4), n


def assert_same_tower(model, reference, weight: str, atol: float):
    """Two fp32 models' towers on the same two videos: equal outputs (atol, rtol 1e-5), pixel gradients (atol 1e-7,
    rtol 1e-4) and weight gradients (atol, rtol 1e-4), the same parameters getting them, `weight` among them."""
    grid = torch.tensor([[2, 8, 8], [1, 12, 14]])
    pixels = random_pixel_rows(reference.config.vision_config, grid, generator=torch.Generator().manual_seed(0))
    (out_r, dpix_r, g_r), (out_m, dpix_m, g_m) = (vision_gradients(m, pixels, grid) for m in (reference, model))
    for a, b in zip(out_m, out_r):
        assert torch.allclose(a, b, atol=atol, rtol=1e-5)
    assert torch.allclose(dpix_m, dpix_r, atol=1e-7, rtol=1e-4)
    assert g_m.keys() == g_r.keys() and weight in g_m
    for n, g in g_r.items():
        assert torch.allclose(g_m[n], g, atol=atol, rtol=1e-4), n


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker"])
def test_patch_projection_equals_the_conv3d(tmp_path, fam):
    """vlm.PatchProjection (the tower's Conv3d patch embedding as one matrix product, the default) gives the tower's
    outputs and every gradient of transformers' Conv3d, holds the same parameters under the same names (checkpoints,
    merge and vLLM weight pushes see no difference), and the conv is swapped in every Qwen family."""
    path = make_tiny_model(str(tmp_path), fam, seed=0)
    (conv, _), (linear, _) = vlm.load_model(path, patch_embed="conv"), vlm.load_model(path)
    proj = vlm.media_model(linear).visual.patch_embed.proj
    assert isinstance(proj, vlm.PatchProjection)
    assert type(vlm.media_model(conv).visual.patch_embed.proj) is torch.nn.Conv3d
    assert {k: v.shape for k, v in linear.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    assert proj.weight.dim() == 5 and (fam == "qwen3_vl") == (proj.bias is not None)   # Qwen3-VL's has a bias
    assert_same_tower(linear, conv, "patch_embed.proj.weight", atol=1e-5)   # fp32 sums over every patch row, reordered
    with pytest.raises(ValueError, match="non-overlapping"):
        vlm.PatchProjection(torch.nn.Conv3d(3, 8, kernel_size=2, stride=1))
    with pytest.raises(ValueError, match="patch_embed 'fast'"):
        vlm.load_model(path, patch_embed="fast")


def test_patch_projection_by_hand():
    """One patch, one output channel: the output is the sum of weight x pixel over the patch, plus the bias."""
    conv = torch.nn.Conv3d(2, 3, kernel_size=(2, 2, 2), stride=(2, 2, 2), bias=True)
    x = torch.randn(5, 2, 2, 2, 2)
    out = vlm.PatchProjection(conv)(x)
    assert out.shape == (5, 3, 1, 1, 1)
    by_hand = torch.stack([(conv.weight[d] * x).sum((1, 2, 3, 4)) + conv.bias[d] for d in range(3)], 1)
    assert torch.allclose(out.flatten(1), by_hand, atol=1e-6)
    assert torch.allclose(out, conv(x), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's bf16 kernels")
@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_patch_projection_in_bf16_on_gpu(tmp_path, fam):
    """On the GPU in bf16, with the lent machine's cuDNN: the matrix product equals the Conv3d's outputs and
    gradients to bf16 precision."""
    path = make_tiny_model(str(tmp_path), fam, size=TinySize(hidden=128, heads=2, kv_heads=1), seed=0)
    (conv, _), (linear, _) = (vlm.load_model(path, "bfloat16", device="cuda", patch_embed=kind)
                              for kind in ("conv", "linear"))
    grid = torch.tensor([[4, 8, 8], [2, 10, 6]], device="cuda")
    pixels = random_pixel_rows(conv.config.vision_config, grid, device="cuda", dtype=torch.bfloat16)
    assert_equal_to_bf16_precision(vision_gradients(linear, pixels, grid), vision_gradients(conv, pixels, grid))


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen2_5_omni_thinker"])
def test_padded_mlp_equals_the_mlp(tmp_path, fam):
    """vision_mlp="padded" (vlm.PaddedMLP: the towers' gated MLPs computed at a width padded to a multiple of 64)
    gives the tower's outputs and every gradient of the plain MLP, holds the same parameters under the same names,
    swaps every vision block's MLP (width 96 here: padded to 128) and nothing else (decoder, audio tower)."""
    path = make_tiny_model(str(tmp_path), fam, size=TinySize(vision_hidden=48), seed=0)
    (plain, _), (padded, _) = vlm.load_model(path), vlm.load_model(path, vision_mlp="padded")
    tower = vlm.media_model(padded).visual
    assert all(type(b.mlp) is vlm.PaddedMLP and b.mlp.pad == 32 for b in tower.blocks)
    swapped = [m for m in padded.modules() if isinstance(m, vlm.PaddedMLP)]
    assert len(swapped) == len(tower.blocks)
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert_same_tower(padded, plain, "blocks.0.mlp.down_proj.weight", atol=1e-6)
    with pytest.raises(ValueError, match="vision_mlp 'wide'"):
        vlm.load_model(path, vision_mlp="wide")


def test_padded_mlp_by_hand():
    """Width 100 computed as 128: the output and the gradients of x and of every real weight are the plain MLP's,
    and nothing padded is a parameter."""
    torch.manual_seed(0)

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(16, 100), torch.nn.Linear(16, 100)
            self.down_proj, self.act_fn = torch.nn.Linear(100, 16), torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    plain = Gated()
    padded = vlm.PaddedMLP(plain)
    assert padded.pad == 28
    assert sum(p.numel() for p in padded.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randn(7, 16, requires_grad=True)
    results = []
    for m in (plain, padded):
        x.grad = None
        plain.zero_grad()
        out = m(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in plain.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_window_attention_by_hand():
    """Three windows of lengths 2, 3, 1 over N = 6 tokens: each token's output is softmax attention over its own
    window's keys only (computed here window by window), ragged and with GQA-free heads."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in "qkv")
    cu = torch.tensor([0, 2, 5, 6])
    out, _ = vlm.window_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=cu)
    assert out.shape == (1, 6, 2, 4)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        weights = torch.softmax(q[0, :, a:b] @ k[0, :, a:b].transpose(-1, -2) * 0.5, -1)   # [H, len, len]
        assert torch.allclose(out[0, a:b], (weights @ v[0, :, a:b]).transpose(0, 1), atol=1e-6)
    equal, _ = vlm.window_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=torch.tensor([0, 3, 6]))
    ragged_path, _ = vlm.window_attention(None, q[:, :, :5], k[:, :, :5], v[:, :, :5], scaling=0.5,
                                          cu_seq_lens_q=torch.tensor([0, 3, 5]))
    assert torch.allclose(equal[0, :3], ragged_path[0, :3], atol=1e-6)   # the two code paths agree


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's bf16 kernels")
@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_batched_window_attention_in_bf16_on_gpu(tmp_path, fam):
    """On the GPU in bf16 (the training dtype), with the lent machine's transformers: batched windows equal the
    loop's outputs and gradients to bf16 precision, ragged windows included."""
    path = make_tiny_model(str(tmp_path), fam, size=TinySize(hidden=128, heads=2, kv_heads=1), seed=0)
    (loop, _), (batched, _) = (vlm.load_model(path, "bfloat16", device="cuda", vision_attention=a)
                               for a in ("loop", "batched"))
    assert batched.config.vision_config._attn_implementation == vlm.WINDOW_ATTENTION
    grid = torch.tensor([[4, 8, 8], [2, 10, 6]], device="cuda")
    pixels = random_pixel_rows(loop.config.vision_config, grid, device="cuda", dtype=torch.bfloat16)
    assert_equal_to_bf16_precision(vision_gradients(batched, pixels, grid), vision_gradients(loop, pixels, grid))


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "llava", "vila"])
def test_vision_in_checkpointed_pieces_equals_one_call(tmp_path, media, fam, monkeypatch):
    """encode_videos with grad: a budget of a few temporal patches cuts each 8-frame video into pieces, each
    tower call checkpointed; the features (DeepStack rows too), the log-probs and every gradient equal one call
    over both videos. The tower ran once per piece in the forward and again in the backward (the recompute)."""
    model, prompts, packed, responses = group_case(tmp_path, media, fam)
    per_t = len(prompts[0].pixel_values_videos) // int(prompts[0].video_grid_thw[0, 0])
    weights = torch.rand(sum(len(r) for r in responses))
    calls = []
    tower = vlm.tower_features
    monkeypatch.setattr(vlm, "tower_features", lambda *a: calls.append(len(a[1])) or tower(*a))

    def run(grad_patches):
        model.zero_grad(set_to_none=True)
        feats = vlm.encode_videos(model, prompts, grad_patches=grad_patches)
        lp, _ = vlm.group_logprobs(model, packed, feats, [])
        (lp * weights).sum().backward()
        deep = [torch.cat(layer) for layer in getattr(feats, "deepstack_features", [])]
        return (torch.cat(feats.pooler_output).detach(), [d.detach() for d in deep], lp.detach(),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    whole = run(10**9)
    assert calls == [sum(len(p.pixel_values_videos) for p in prompts)]          # one call, no checkpoint
    calls.clear()
    pieces = run(3 * per_t)                      # 3 temporal patches a call: each video in pieces of 3, 3, ...
    T = [int(p.video_grid_thw[0, 0]) for p in prompts]
    assert max(calls) <= 3 * per_t and len(calls) == 2 * sum(-(-t // 3) for t in T)   # forward + recompute
    (f1, d1, lp1, g1), (f2, d2, lp2, g2) = whole, pieces
    assert torch.allclose(f2, f1, atol=1e-6) and torch.allclose(lp2, lp1, atol=1e-6)
    assert bool(d1) == (fam == "qwen3_vl") and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(d2, d1))
    vision = [n for n in g1 if "visual" in n or "vision" in n]
    assert vision and g2.keys() == g1.keys()
    for n in g1:  # fp32 sums in another order (the pieces' rows enter the decoder's gradients separately)
        assert torch.allclose(g2[n], g1[n], atol=1e-6, rtol=1e-4), (n, (g2[n] - g1[n]).abs().max())


@pytest.mark.parametrize("frames,fps,seconds", [(16, 8, 5.0), (24, 8, 9.0), (40, 8, 3.0), (24, 6, 0.0), (7, 4, 4.0)])
def test_omni_positions_equal_get_rope_index(models, tmp_path, frames, fps, seconds):
    """vlm.omni_positions (what our vLLM engine gives vLLM) equals the thinker's own get_rope_index on our prompts:
    audio shorter and longer than the video, sampled fps that puts groups between seconds, no audio; and the
    answer tokens after the prompt continue from the maximum + 1 in both."""
    model, processor = models["qwen2_5_omni_thinker"]
    pix = np.random.default_rng(frames).integers(0, 255, (int(fps * 6), 56, 56, 3), dtype=np.uint8)
    write_video(str(tmp_path / "v.mp4"), pix, fps=fps, audio=tone(seconds, 440) if seconds else None)

    class Cfg(VideoCfg):
        num_frames = frames
    video = vlm.load_video(str(tmp_path / "v.mp4"), Cfg, "qwen2_5_omni_thinker")
    prompt = vlm.build_prompt(model, processor, "What sound?", video, think=False)
    assert (prompt.num_audio_tokens > 0) == (seconds > 0)
    sec = vlm.omni_seconds_per_group(model, video.metadata())
    ids = prompt.input_ids.tolist() + processor.tokenizer("<answer> A </answer>")["input_ids"]
    theirs, _ = vlm.media_model(model).get_rope_index(
        torch.tensor([ids]), None, prompt.video_grid_thw, None, use_audio_in_video=seconds > 0,
        audio_seqlens=torch.tensor([prompt.input_features.shape[-1]]) if seconds else None,
        second_per_grids=torch.tensor([sec]))
    ours = vlm.omni_positions(model.config, ids, prompt.video_grid_thw[0].tolist(), sec)
    assert torch.equal(ours, theirs[:, 0])
    assert torch.equal(ours[:, :len(prompt.input_ids)], prompt.positions)


def _lockstep_worker(rank, world, init_file, model_dir, fam, out):
    """Rank 0 encodes 8 frames (with 2 s of audio for Omni), rank 1 two frames (no audio): under a budget of one
    2-frame video a call, rank 0 makes 4 tower calls (and 1 audio call), rank 1 one (and none)."""
    import datetime
    import torch.distributed as dist
    from common import Dist, Root, wrap_fsdp
    from data.video import SampledVideo
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a collective mismatch may hang: fail instead
    try:
        torch.manual_seed(0)
        ref, processor = vlm.load_model(model_dir)
        frames = 8 if rank == 0 else 2
        rng = np.random.default_rng(rank)
        clip = SampledVideo(frames=rng.integers(0, 255, (frames, 56, 56, 3), dtype=np.uint8),
                            timestamps=np.arange(frames) / 2.0, indices=list(range(frames)), fps=2.0,
                            total_frames=frames, duration=frames / 2.0,
                            audio=np.sin(np.arange(32000) * 0.2).astype(np.float32) if rank == 0 else None)
        prompts = [vlm.build_prompt(ref, processor, "What colour?", clip, think=False)]
        budget = 2 * 56 * 56 // 14 ** 2  # patch rows of one 2-frame clip

        def loss_of(model):  # features -> a scalar with a different weight per row
            feats = vlm.encode_videos(model, prompts, grad_patches=budget)
            rows = torch.cat([*feats.pooler_output, *getattr(feats, "audio_features", ())])
            return (rows * torch.linspace(-1, 1, rows.numel()).view(rows.shape)).sum()
        ref.requires_grad_(True)
        loss_of(ref).backward()  # the unsharded model: this rank's own loss
        expected = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in ref.named_parameters()}
        for g in expected.values():  # FSDP2 averages the ranks' gradients
            dist.all_reduce(g)
            g /= world
        expected = {k: g for k, g in expected.items() if g.any()}  # the media encoders' (and the merger's)
        model, _ = vlm.load_model(model_dir)
        policy = wrap_fsdp(Root(model), vlm.fsdp_units(model), Dist(rank=rank, world_size=world), False)
        loss = policy(loss_of)
        loss.backward()
        grads = {k[len("model."):]: p.grad.full_tensor() for k, p in policy.named_parameters() if p.grad is not None}
        out[rank] = (abs(loss.item() - loss_of(ref).item()),
                     max((grads.get(k, torch.zeros_like(g)) - g).abs().max().item() for k, g in expected.items()),
                     all(not g.any() for k, g in grads.items() if k not in expected), len(expected))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen2_5_omni_thinker"])
def test_media_encoders_run_in_lockstep_under_fsdp2(tmp_path, fam):
    """FSDP2 all-gathers a vision (or audio) block's weights at every call: ranks whose videos need different
    numbers of tower calls (encode_videos' patch budget; Omni: tracks with audio) must still call each block
    equally often, or the collectives pair up wrong (gloo: size mismatch; NCCL: a hang). Each rank's features
    and the averaged gradients equal the unsharded model's: the padding calls add nothing."""
    import torch.multiprocessing as mp
    make_tiny_model(str(tmp_path / "m"), fam)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_lockstep_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "m"), fam, out), nprocs=2,
                 join=True)
        for rank in range(2):
            loss_diff, grad_diff, no_others, num_trained = out[rank]
            assert loss_diff < 1e-4 and grad_diff < 1e-5 and no_others and num_trained > 10, (rank, out[rank])
