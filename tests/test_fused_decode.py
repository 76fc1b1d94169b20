"""
fused_decode.py: the HF engine's fast decode step (StaticKV cache, fused decoder, its prompt pass) against the
model's own layers and transformers' DynamicCache, through rollout.hf_generate and directly.
    python -m pytest tests/test_fused_decode.py -q
"""
import pytest
import torch

import fused_decode
import rollout
import vlm
from data.tiny import make_tiny_model
from test_rollout import prompts_for, tiny, videos  # noqa: F401 (the tiny models and videos are pytest fixtures)


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl"])
def test_static_kv_decode_equals_dynamic_cache(tiny, videos, fam):
    """The GPU fast path's cache (StaticKV: preallocated buffer, GQA heads stacked against their KV head, padded and
    future slots masked) samples the same tokens with the same log-probs as transformers' DynamicCache, for
    left-padded prompts of different lengths."""
    _, model, processor = tiny[fam]
    prompts = prompts_for(model, processor, videos[:1], "What colour?") + \
        prompts_for(model, processor, videos[1:2], "What colour was the flash? Answer in detail please.")
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    kw = dict(n=2, temperature=1.0, max_new_tokens=10, seed=3)
    dynamic = rollout.hf_generate(model, processor, prompts, static_cache=False, **kw)
    static = rollout.hf_generate(model, processor, prompts, static_cache=True, **kw)
    assert [o.response_ids for o in static] == [o.response_ids for o in dynamic]
    diff = max(abs(a - b) for s, d in zip(static, dynamic) for a, b in zip(s.logprobs, d.logprobs))
    assert diff < 1e-4


def text_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 300, (n,), generator=g) for n in lengths]
    return [vlm.Prompt(input_ids=i, positions=torch.arange(len(i)).expand(3, -1).clone(), pixel_values_videos=None,
                       video_grid_thw=None, num_video_tokens=0) for i in ids]


@pytest.mark.parametrize("fam", ["qwen2_5_vl", "qwen3_vl", "qwen2_5_omni_thinker", "llava", "vila"])
def test_fused_forward_equals_the_models_own_layers(tiny, videos, fam, tmp_path, monkeypatch):
    """fused_forward (our decoder written from the layers' weights: prompt pass and decode step) samples the
    same tokens with the same log-probs as the model's own layers on transformers' DynamicCache: with the q/k/v
    and gate/up weights concatenated or not, with its helpers compiled (torch.compile, as on a GPU), for left-
    padded prompts after a video (3-D positions that run ahead of the token index) and for every family."""
    if fam in tiny:
        _, model, processor = tiny[fam]
        prompts = prompts_for(model, processor, videos[:1], "What colour?") + \
            prompts_for(model, processor, videos[1:2], "What colour was the flash? Answer in detail please.")
    else:
        model, processor = vlm.load_model(make_tiny_model(str(tmp_path), fam, seed=0))
        prompts = text_prompts([7, 19])
    assert fused_decode.fused_decoding(model)
    kw = dict(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    reference = rollout.hf_generate(model, processor, prompts, static_cache=False, **kw)
    variants = {"concatenated": {}, "separate": dict(concat_weights=False)}
    if fam == "qwen2_5_vl":
        variants["compiled"] = dict(compile_kernels=True)
    real_forward = rollout.fused_forward
    for name, options in variants.items():
        monkeypatch.setattr(rollout, "fused_forward", lambda m, kv, _, **o: real_forward(m, kv, **{**o, **options}))
        fused = rollout.hf_generate(model, processor, prompts, static_cache=True, fused=True, **kw)
        assert [o.response_ids for o in fused] == [o.response_ids for o in reference], name
        diff = max(abs(a - b) for f, r in zip(fused, reference) for a, b in zip(f.logprobs, r.logprobs))
        assert diff < 1e-4, (name, diff)


def test_fused_prompt_pass_equals_the_models_own_layers(tiny, videos):
    """The prompt pass through fused_forward (left-padded video prompts: causal + padding mask, 3-D positions)
    gives the model's own final hidden states at every real position and writes the same keys and values into
    the cache as the model's own layers (through StaticKV.attend) do."""
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = prompts_for(model, processor, videos[:1], "What colour?") + \
        prompts_for(model, processor, videos[1:2], "What colour was the flash? Answer in detail please.")
    feats = vlm.encode_videos(model, prompts)
    L = max(len(p.input_ids) for p in prompts)
    ids = torch.zeros(2, L, dtype=torch.long)
    pos = torch.zeros(3, 2, L, dtype=torch.long)
    valid = torch.zeros(2, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p.input_ids):], pos[:, i, L - len(p.input_ids):] = p.input_ids, p.positions
        valid[i, L - len(p.input_ids):] = True
    assert not valid.all()  # the shorter prompt is padded
    with torch.no_grad():
        ours_kv, theirs_kv = fused_decode.StaticKV(model, valid), fused_decode.StaticKV(model, valid)
        forward = fused_decode.fused_forward(model, ours_kv)
        ours = forward(vlm.embed_inputs(model, ids, feats)[0], pos, fused_decode.padded_prompt_mask(valid))
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(fused_decode.StaticKV.NAME, theirs_kv.attend)
        AttentionMaskInterface.register(fused_decode.StaticKV.NAME, sdpa_mask)
        previous = vlm.use_attention(model, fused_decode.StaticKV.NAME)
        try:
            theirs, _ = vlm.decoder_hidden(model, ids, pos, feats, valid.long())
        finally:
            vlm.use_attention(model, previous)
    assert int(ours_kv.length) == L
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-4), (ours[valid] - theirs[valid]).abs().max()
    slots = torch.nn.functional.pad(valid, (0, ours_kv.k.shape[3] - L))
    for mine, ref in ((ours_kv.k, theirs_kv.k), (ours_kv.v, theirs_kv.v)):
        mine, ref = mine.permute(1, 3, 0, 2, 4), ref.permute(1, 3, 0, 2, 4)  # [B, slots, layers, H_kv, D]
        assert torch.allclose(mine[slots], ref[slots], atol=1e-4)
        assert torch.isfinite(mine).all()  # padding rows see themselves: no NaN reaches the cache


@pytest.mark.parametrize("engine", ["dynamic", "static", "fused"])
def test_prompt_pass_once_per_prompt(tiny, videos, engine, monkeypatch):
    """n samples of a prompt share one prompt pass (its keys and values copied to the n rows): the first decoder
    layer's prompt pass sees 2 prompt rows, not 4, and the samples equal those of the prompts passed twice each
    with n=1. Through the model's own layers (DynamicCache, StaticKV) and through fused_forward."""
    _, model, processor = tiny["qwen2_5_vl"]
    a, b = prompts_for(model, processor, videos[:2], "What colour?")
    rows = []
    real_write = fused_decode.StaticKV.write

    def write(kv, layer, key, value):  # fused_forward writes every layer's keys [rows, H_kv, S, D] here
        if layer == 0 and key.shape[2] > 1:
            rows.append(key.shape[0])
        return real_write(kv, layer, key, value)
    if engine == "fused":
        monkeypatch.setattr(fused_decode.StaticKV, "write", write)
    hook = vlm.text_model(model).layers[0].register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[0]) if args[0].shape[1] > 1 else None)
    kw = dict(temperature=1.0, max_new_tokens=8, seed=11, static_cache=engine != "dynamic", fused=engine == "fused")
    try:
        shared = rollout.hf_generate(model, processor, [a, b], n=2, **kw)
        repeated = rollout.hf_generate(model, processor, [a, a, b, b], n=1, **kw)
    finally:
        hook.remove()
    assert rows == [2, 4]  # the two calls' prompt passes
    assert [o.response_ids for o in shared] == [o.response_ids for o in repeated]
    diff = max(abs(x - y) for s, r in zip(shared, repeated) for x, y in zip(s.logprobs, r.logprobs))
    assert diff < 1e-4


def test_failed_decode_setup_leaves_the_model_as_it_was(tiny, videos, monkeypatch):
    """An error while the fused step is being built (after the prompt pass switched the model to StaticKV's
    attention) reaches the caller with the model's own attention restored, so training does not run on it."""
    _, model, processor = tiny["qwen2_5_vl"]
    before = model.config.get_text_config()._attn_implementation

    def broken(*args, **kwargs):
        raise MemoryError("no room for the concatenated weights")
    monkeypatch.setattr(rollout, "fused_forward", broken)
    with pytest.raises(MemoryError):
        rollout.hf_generate(model, processor, prompts_for(model, processor, videos[:1]), static_cache=True,
                            fused=True, max_new_tokens=4)
    assert model.config.get_text_config()._attn_implementation == before != fused_decode.StaticKV.NAME


@pytest.mark.parametrize("fused", [False, True])
def test_no_kv_cache_outlives_the_rollout(tiny, videos, fused):
    """After hf_generate returns, no StaticKV buffer is alive: transformers' attention registry keeps the last
    cache's attend function (and so the cache object) until the next rollout, and its k / v would otherwise stay
    allocated through the update (at 1,024 frames x 8 samples of the 3B shape, ~10 GB of an 80 GB GPU)."""
    import gc
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = prompts_for(model, processor, videos[:2])
    text = model.config.get_text_config()

    def kv_buffers():
        gc.collect()
        return [t for t in gc.get_objects() if torch.is_tensor(t) and t.dim() == 5 and
                t.shape[0] == text.num_hidden_layers and t.shape[1] == 2 * 3]
    assert not kv_buffers()
    rollout.hf_generate(model, processor, prompts, n=3, max_new_tokens=4, static_cache=True, fused=fused,
                        cuda_graph=False)
    assert not kv_buffers()


@pytest.mark.parametrize("engine", ["static", "fused"])
def test_one_token_prompts_with_several_samples(tiny, engine):
    """A prompt pass of one-token prompts has S = 1 like a decode step, but P rows, not the cache's P x n: it is
    still the prompt pass (before: a shape error, or n^2 rows for one prompt). Same samples as DynamicCache."""
    _, model, processor = tiny["qwen2_5_vl"]
    prompts = text_prompts([1, 1])
    kw = dict(n=2, temperature=1.0, max_new_tokens=5, seed=3)
    ref = rollout.hf_generate(model, processor, prompts, static_cache=False, **kw)
    out = rollout.hf_generate(model, processor, prompts, static_cache=True, fused=engine == "fused",
                              cuda_graph=False, **kw)
    assert [o.response_ids for o in out] == [o.response_ids for o in ref]
    assert max(abs(a - b) for s, r in zip(out, ref) for a, b in zip(s.logprobs, r.logprobs)) < 1e-4
