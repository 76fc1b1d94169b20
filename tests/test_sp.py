"""
sp.py against one process: gloo workers on CPU (world 2: SP=2; world 4: SP=4 and dp=2 x SP=2) compared with the
plain-SDPA single-process forward/backward of the same tiny models.
    python -m pytest tests/test_sp.py -q
"""
import datetime

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sp
from data.tiny import TinySize, make_tiny_model

# name: (family, TinySize overrides, frames of each sample's video); each sample = video + question + response
CASES = {"q25": ("qwen2_5_vl", dict(heads=4, kv_heads=2), [6]),          # 3 temporal groups: at P=4 a rank has none
         "q25_kv1_b2": ("qwen2_5_vl", dict(heads=4, kv_heads=1), [6, 4]),  # kv heads < SP; batch of 2, right-padded
         "q3": ("qwen3_vl", dict(heads=4, kv_heads=2), [8])}               # DeepStack features
PAD, VIDEO = 0, 6  # <|endoftext|>, <|video_pad|> in data/tiny.py


def _load(d):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(d, attn_implementation="sdpa").float()
    return model, AutoProcessor.from_pretrained(d)


def _batch(model, proc, family, frames):
    """Right-padded batch; every sample has an odd length, so S is not a multiple of 2 or 4 (padding is exercised)."""
    rng, side, xs = np.random.RandomState(0), 56 if family == "qwen2_5_vl" else 64, []
    for i, T in enumerate(frames):
        msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        kw = dict(videos=[rng.randint(0, 255, (T, side, side, 3), dtype=np.uint8)], do_sample_frames=False,
                  video_metadata=[{"total_num_frames": T, "fps": 2.0, "frames_indices": list(range(T))}],
                  return_tensors="pt")
        x = proc(text=[prompt + "<think> red </think> <answer> A </answer>" * (i + 2)], **kw)
        L = x["input_ids"].shape[1] - (x["input_ids"].shape[1] % 2 == 0)  # drop the last token if the length is even
        xs.append((x, proc(text=[prompt], **kw)["input_ids"].shape[1], L))
    B, S = len(xs), max(L for *_, L in xs)
    ids, mm, resp = torch.full((B, S), PAD), torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.bool)
    for b, (x, n_prompt, L) in enumerate(xs):
        ids[b, :L], mm[b, :L], resp[b, n_prompt:L] = x["input_ids"][0, :L], x["mm_token_type_ids"][0, :L], True
    grid = torch.cat([x["video_grid_thw"] for x, *_ in xs])
    kw = dict(video_grid_thw=grid, attention_mask=(ids != PAD).long())
    if family == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.cat([x["second_per_grid_ts"] for x, *_ in xs])
    return dict(ids=ids, resp=resp, pix=torch.cat([x["pixel_values_videos"] for x, *_ in xs]), grid=grid,
                pos=model.model.get_rope_index(ids, mm, **kw)[0],  # 3-D rope positions of the full sequence
                adv=torch.randn(B, S, generator=torch.Generator().manual_seed(1)))  # per-token weights (advantages)


def _logp(model, h, labels):
    return model.lm_head(h).float().log_softmax(-1).gather(-1, labels[:, None])[:, 0]


def _results(model, feats, logp, loss):
    vis = [p.grad.abs().sum() for n, p in model.named_parameters() if "visual" in n and p.grad is not None]
    return dict(logp=logp.detach(), loss=loss.detach(), vision_grad=float(sum(vis)),
                grads={n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()},
                feats=[f.detach() for f in feats.pooler_output],
                deep=[[f.detach() for f in d] for d in (getattr(feats, "deepstack_features", None) or [])])


def _reference(d, family, frames):
    """SP=1: plain SDPA on the full batch, no mask (right padding), loss over all response tokens."""
    model, proc = _load(d)
    b = _batch(model, proc, family, frames)
    feats = model.model.get_video_features(b["pix"], b["grid"], return_dict=True)
    h = model.model(input_ids=b["ids"], mm_encoder_outputs={"video": feats}, position_ids=b["pos"],
                    use_cache=False).last_hidden_state
    pad_col = torch.full_like(b["ids"][:, :1], PAD)
    labels = torch.cat([b["ids"][:, 1:], pad_col], 1)  # position t predicts token t+1
    m, w = F.pad(b["resp"][:, 1:], (0, 1)), F.pad(b["adv"][:, 1:], (0, 1))
    logp = h.new_zeros(m.shape)
    logp[m] = _logp(model, h[m], labels[m])
    loss = -(logp * w).sum() / m.sum()
    loss.backward()
    return _results(model, feats, logp, loss)


def _sp_run(d, family, frames, info, gathered_loss=False):
    """The call sequence of one SP micro-batch (sp.py docstring); grads all-reduced (sum) over the SP group."""
    model, proc = _load(d)
    sp.register_ulysses(info.sp_group)
    model.set_attn_implementation({"text_config": "ulysses", "vision_config": "sdpa"})
    b, r, P, g = _batch(model, proc, family, frames), info.sp_rank, info.sp_size, info.sp_group
    feats = sp.parallel_video_features(model, b["pix"], b["grid"], g, num_chunks=2)
    sh = sp.shard_sequence(b["ids"], b["pos"], b["resp"], r, P, PAD, VIDEO)
    h = model.model(input_ids=sh.input_ids, position_ids=sh.position_ids, use_cache=False,
                    mm_encoder_outputs={"video": sp.slice_video_features(feats, sh.video_rows)}).last_hidden_state
    logp = h.new_zeros(sh.labels.shape)  # (B, S/P)
    logp[sh.loss_mask] = _logp(model, h[sh.loss_mask], sh.labels[sh.loss_mask])
    n_tokens = b["resp"][:, 1:].sum()  # global count of scored tokens, known to every rank
    full = sp.gather_token_values(logp, g)[:, :b["ids"].shape[1]]  # (B, S)
    if gathered_loss:  # every rank computes the same loss from the gathered values
        loss = -(full * F.pad(b["adv"][:, 1:], (0, 1))).sum() / n_tokens
    else:  # each token counted once, on the rank that holds it
        loss = -(logp * sp.shard_values(b["adv"], r, P, 0.0, shift=True)).sum() / n_tokens
    loss.backward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(p.grad, group=g)
    total = loss.detach().clone()
    if not gathered_loss:
        dist.all_reduce(total, group=g)
    return dict(_results(model, feats, full, total), video_rows=len(sh.video_rows))


def _comm(info, rank, world):
    """fp64 ulysses_attention vs SDPA (forward and backward), chunked gathers vs all_gather(_object)."""
    out, P, g = {}, info.sp_size, info.sp_group
    heads = [(4, 2), (4, 1), (8, 4)] + ([(6, 2)] if world == 4 else [])  # (6,2) at P=3: kv heads repeated 3 times
    if world == 4:
        sub = dist.new_group([0, 1, 2])  # every rank creates it; ranks 0-2 use it
    for H, Hkv in heads:
        if (H, Hkv) == (6, 2):
            if rank == 3:
                continue
            P, g = 3, sub
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, h, 5 * P, 8, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
        w = torch.randn(2, 5 * P, H, 8, dtype=torch.float64)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                             is_causal=True, scale=0.3).transpose(1, 2)
        ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
        s = slice(dist.get_rank(g) * 5, (dist.get_rank(g) + 1) * 5)
        ql, kl, vl = (x[:, :, s].detach().requires_grad_() for x in (q, k, v))
        got = sp.ulysses_attention(torch.nn.Module(), ql, kl, vl, None, scaling=0.3, group=g)[0]
        got_grads = torch.autograd.grad((got * w[:, s]).sum(), (ql, kl, vl))
        out[f"attn{H},{Hkv},P{P}"] = [(got, ref[:, s])] + [(a, b_[:, :, s]) for a, b_ in zip(got_grads, ref_grads)]
    g, P, r = info.sp_group, info.sp_size, info.sp_rank
    sizes = [2, 0, 5, 1][:P]
    rows = [torch.randn(n, 3, generator=torch.Generator().manual_seed(q)) for q, n in enumerate(sizes)]
    for chunks in (1, 3, 100):
        out[f"gather{chunks}"] = [(sp.chunked_all_gather(rows[r], chunks, g), torch.cat(rows))]
    even, mine = [torch.empty(4, 3) for _ in range(P)], torch.randn(4, 3) + r
    dist.all_gather(even, mine, group=g)
    out["gather_even"] = [(sp.chunked_all_gather(mine, 3, g), torch.cat(even))]
    obj, objs = {"rank": r, "frames": list(range(1000 * r))}, [None] * P
    dist.all_gather_object(objs, obj, group=g)
    out["objects"] = (sp.chunked_all_gather_object(obj, 4, g), objs)
    groups = [None] * P, [None] * info.dp_size
    dist.all_gather_object(groups[0], rank, group=info.sp_group)
    dist.all_gather_object(groups[1], rank, group=info.dp_group)
    out["groups"] = (groups, info.dp_rank)
    return out


def _worker(rank, world, tmp, dirs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg{world}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a deadlock fails the test instead of hanging
    res = {}
    for P in ([2] if world == 2 else [4, 2]):
        info = sp.init_sp(P)
        for name in (CASES if P == world else ["q25_kv1_b2"]):
            res[P, name] = _sp_run(dirs[name], *CASES[name][::2], info)
        if P == world:
            res[P, "q25 gathered"] = _sp_run(dirs["q25"], *CASES["q25"][::2], info, gathered_loss=True)
        res[P, "comm"] = _comm(info, rank, world)
    torch.save(res, f"{tmp}/res{world}_{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(str(root / name), fam, TinySize(**size)) for name, (fam, size, _) in CASES.items()}


@pytest.fixture(scope="module")
def refs(dirs):
    return {name: _reference(dirs[name], *CASES[name][::2]) for name in CASES}


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
    tmp, out = tmp_path_factory.mktemp("sp"), {}
    for world in (2, 4):
        mp.spawn(_worker, args=(world, str(tmp), dirs), nprocs=world)
        out[world] = [torch.load(f"{tmp}/res{world}_{r}.pt", weights_only=False) for r in range(world)]
    return out


RUNS = ([(2, 2, n) for n in CASES] + [(4, 4, n) for n in CASES]
        + [(4, 2, "q25_kv1_b2"), (2, 2, "q25 gathered"), (4, 4, "q25 gathered")])


@pytest.mark.parametrize("world,P,name", RUNS)
def test_sp_matches_single_process(runs, refs, world, P, name):
    ref = refs[name.split()[0]]
    for rank in range(world):  # all ranks (both dp replicas at world 4, P 2) hold the full gathered values
        got = runs[world][rank][P, name]
        m = ref["logp"] != 0  # response positions
        torch.testing.assert_close(got["logp"][m], ref["logp"][m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        for n, gr in ref["grads"].items():
            torch.testing.assert_close(got["grads"][n], gr, rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")
        assert got["vision_grad"] > 0  # stage 1 passes gradients back to the vision tower
        for a, b in zip(got["feats"] + sum(got["deep"], []), ref["feats"] + sum(ref["deep"], [])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert len(got["deep"]) == len(ref["deep"]) == (1 if name == "q3" else 0)
    if P == 4:  # some rank's slice holds no video token (it gets empty features: the model accepts them)
        assert min(runs[world][rank][P, name]["video_rows"] for rank in range(world)) == 0


@pytest.mark.parametrize("world,P", [(2, 2), (4, 4), (4, 2)])
def test_collectives(runs, world, P):
    for rank in range(world):
        res = runs[world][rank][P, "comm"]
        for key, pairs in res.items():
            if key.startswith(("attn", "gather")):
                for got, want in pairs:
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda s: f"{key}: {s}")
        assert res["objects"][0] == res["objects"][1]
        (sp_ranks, dp_ranks), dp_rank = res["groups"]
        assert sp_ranks == list(range(rank // P * P, rank // P * P + P)) and dp_ranks == list(range(rank % P, world, P))
        assert dp_rank == rank // P
    assert any(k.startswith("attn6,2,P3") for k in runs[world][0][P, "comm"]) == (world == 4)


def test_check_heads():
    with pytest.raises(ValueError, match="28 query heads.*SP must be one of 1, 2, 4, 7, 14, 28$"):  # Qwen2.5-VL-7B
        sp.check_heads(28, 4, 8)
    with pytest.raises(ValueError, match="SP must be one of 1, 2, 4, 8, 16$"):
        sp.check_heads(16, 2, 3)
    # kv-head copies: P | kv -> 1; kv | P -> P/kv; else P/gcd (7B at SP=7: each of the 4 kv heads 7 times)
    cases = [(16, 4, 2), (16, 2, 8), (4, 1, 4), (28, 4, 7), (28, 4, 14), (6, 2, 3)]
    assert [sp.check_heads(*a) for a in cases] == [1, 4, 4, 7, 7, 3]


def test_shard_sequence_round_trip():
    ids = torch.tensor([[1, 6, 6, 6, 2, 6, 8, 9, 3, 0], [1, 2, 6, 6, 3, 4, 5, 0, 0, 0]])
    pos, resp = torch.arange(10).expand(3, 2, 10), ids > 6
    shards = [sp.shard_sequence(ids, pos, resp, r, 3, 0, 6) for r in range(3)]
    cat = lambda key: torch.cat([getattr(s, key) for s in shards], dim=-1)
    assert cat("input_ids").shape == (2, 12) and (cat("input_ids")[:, :10] == ids).all()
    assert (cat("input_ids")[:, 10:] == 0).all() and not cat("loss_mask")[:, 9:].any()  # pads: pad id, no loss
    assert (cat("labels")[:, :9] == ids[:, 1:]).all() and (cat("loss_mask")[:, :9] == resp[:, 1:]).all()
    assert shards[0].labels[0, -1] == ids[0, 4] and (cat("position_ids")[..., :10] == pos).all()
    rows = [s.video_rows.tolist() for s in shards]
    assert rows == [[0, 1, 2, 4, 5], [3], []]  # feature rows are numbered sample 0 first, then sample 1


def test_sp1_equals_sdpa(dirs):
    """Without torch.distributed, init_sp(1) gives group None and 'ulysses' is plain causal SDPA."""
    info = sp.init_sp(1)
    assert info.sp_group is None and info.sp_size == 1 and info.dp_rank == 0
    model, proc = _load(dirs["q25"])
    b = _batch(model, proc, "qwen2_5_vl", CASES["q25"][2])
    run = lambda: model.model(input_ids=b["ids"], pixel_values_videos=b["pix"], video_grid_thw=b["grid"],
                              position_ids=b["pos"], use_cache=False).last_hidden_state
    want = run()
    model.set_attn_implementation({"text_config": sp.register_ulysses(None, "ulysses_sp1"), "vision_config": "sdpa"})
    assert model.config.text_config._attn_implementation == "ulysses_sp1"
    assert model.config.vision_config._attn_implementation == "sdpa"
    torch.testing.assert_close(run(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="right-padded"):  # a mask that hides a token is refused, not dropped
        model.model(input_ids=b["ids"], attention_mask=torch.ones_like(b["ids"]).index_fill(1, torch.tensor([0]), 0),
                    pixel_values_videos=b["pix"], video_grid_thw=b["grid"], position_ids=b["pos"], use_cache=False)


# ----------------------------------------------------------------------------------------------------------
# packed groups (vlm.PackedGroups) under SP: sp.sp_group_logprobs + RowSplit against vlm.group_logprobs

def _packed_case(root):
    import vlm
    from data.video import SampledVideo
    model, processor = vlm.load_model(f"{root}/model")
    rng = np.random.default_rng(0)
    prompts = []
    for q in ("What colour?", "Which one?"):
        frames = rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
        video = SampledVideo(frames=frames, timestamps=np.arange(4) / 2.0, indices=list(range(4)), fps=2.0,
                             total_frames=4, duration=2.0)
        prompts.append(vlm.build_prompt(model, processor, q, video, think=False))
    pool = torch.tensor(processor.tokenizer("the flash was red then green <answer> B </answer>").input_ids)
    g = torch.Generator().manual_seed(0)
    responses = [pool[torch.randint(0, len(pool), (n,), generator=g)] for n in (4, 1, 6, 2, 5)]
    packed = vlm.pack_groups(responses, [0, 1, 0, 0, 1], [(p.input_ids, p.positions) for p in prompts], PAD)
    weights = torch.rand(len(packed.labels), generator=g)
    return model, prompts, packed, weights


def _packed_worker(rank, world, root):
    import vlm
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    info = sp.init_sp(world)
    model, prompts, packed, weights = _packed_case(root)
    vlm.use_attention(model, sp.register_ulysses(info.sp_group))
    logp, ent, split = sp.sp_group_logprobs(model, prompts, packed, info, [], 1.0, 1024, True, True)
    (-(logp * split.align(weights, logp.device)).sum()).backward()   # each token once, on the rank that holds it
    grads = {}
    for n, p in model.named_parameters():
        grads[n] = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(grads[n], group=info.sp_group)
    torch.save({"logp": split.gather(logp.detach()), "entropy": split.gather(ent.detach()), "grads": grads},
               f"{root}/packed{rank}.pt")
    dist.destroy_process_group()


def test_packed_groups_under_sp2_equal_one_process(tmp_path):
    """Packed groups sliced over 2 SP ranks (the group mask applied after Ulysses' all-to-all, each rank scoring
    the tokens whose predicting row it holds) give one process's log-probs, entropies and gradients."""
    import vlm
    make_tiny_model(str(tmp_path / "model"), "qwen2_5_vl", TinySize(heads=4, kv_heads=2))
    model, prompts, packed, weights = _packed_case(str(tmp_path))
    logp, ent = vlm.group_logprobs(model, packed, vlm.encode_videos(model, prompts), [], with_entropy=True)
    (-(logp * weights).sum()).backward()
    mp.spawn(_packed_worker, args=(2, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"packed{rank}.pt")
        torch.testing.assert_close(got["logp"], logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["entropy"], ent.detach(), rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
