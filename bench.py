"""
The benchmarks behind every number in the README. Each prints a table and one JSON line (`BENCH {...}`).

    python bench.py video                 # data/video.py: seek-based frame sampling vs decoding every frame (CPU)
    python bench.py rollout               # HF engine tokens/s: generate() vs our loop (dynamic / static / compiled)
    python bench.py train                 # one GRPO step by phase, 64 and 256 frames; longest fwd+bwd; naive baseline
    python bench.py sp                    # Ulysses attention + all-to-all vs plain SDPA; chunked vs plain gather
    python bench.py rollout --vllm=True   # ... and the vLLM engine beside the HF one (GPU node with vllm)
    python bench.py cache                 # GRPO step time with cached vision embeddings vs live decode + encode
    python bench.py memory                # per-GPU memory plan for Qwen2.5-VL-7B at 256 / 1,024 / 3,600 frames
    python bench.py train --tiny=True     # every bench also runs on a tiny model (CPU smoke test)

Models are random-initialised at the shape of Qwen2.5-VL-3B (or 7B with --shape=7b): no download. MFU counts
6 x (LM parameters) x tokens + 6 x layers x hidden x S^2 / 2 x 2 (causal attention, forward + backward), recompute
not counted, against the bf16 matmul rate measured on the same GPU in the same run.
"""
import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = {  # Qwen2.5-VL-3B / 7B language model and vision tower shapes (their config.json)
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, ffn=11008, vocab=151936, tie=True,
               v_hidden=1280, v_depth=32, v_heads=16, v_ffn=3420),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, vocab=152064, tie=False,
               v_hidden=1280, v_depth=32, v_heads=16, v_ffn=3420),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=256, vocab=512, tie=False,
                 v_hidden=64, v_depth=2, v_heads=4, v_ffn=128),
}


@dataclass
class BenchConfig:
    shape: str = "3b"               # 3b | 7b | tiny: the random model's shape
    tiny: bool = False              # shortcut for shape=tiny and small sizes (a CPU smoke test)
    frames: list = None             # frame counts (rollout, train); default per bench
    seq_lens: list = None           # train: sequence lengths for the longest-sequence / MFU scan
    batch: int = 8                  # rollout: sequences decoded together
    new_tokens: int = 256           # rollout: generated tokens per sequence
    vllm: bool = False              # rollout: also time the vLLM engine (needs vllm + CUDA)
    compile: bool = True            # rollout: also time the compiled static-cache decode step
    hf: bool = True                 # rollout: time the HF engines (False: only vLLM, with --vllm=True)
    out: str = ""                   # also write the JSON result here
    seed: int = 0                   # random init / data seed


def log(result: dict, cfg: BenchConfig):
    line = json.dumps(result, default=float)
    print("BENCH " + line, flush=True)
    if cfg.out:
        with open(cfg.out, "a") as f:
            f.write(line + "\n")


def device_info():
    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__}
    import transformers
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def matmul_tflops(n=8192, reps=20):
    """Measured bf16 matmul rate of this GPU (the MFU denominator)."""
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


# ----------------------------------------------------------------------------------------------------------
# a random model of a real shape, saved with our tiny tokenizer/processor so every code path is the real one

def make_model(shape: str, out_dir: str, dtype=torch.bfloat16, device="cuda", save=False):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig
    from data.tiny import make_processor, train_tokenizer
    s = SHAPES[shape]
    tok = train_tokenizer()
    head_dim = s["hidden"] // s["heads"]
    t = head_dim // 2 // 4
    hw = (head_dim // 2 - t) // 2
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in [("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>")]}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=262144,
                         tie_word_embeddings=s["tie"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [head_dim // 2 - 2 * hw, hw, hw]}),
        vision_config=dict(depth=s["v_depth"], hidden_size=s["v_hidden"], num_heads=s["v_heads"],
                           intermediate_size=s["v_ffn"], patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31][: max(1, s["v_depth"] // 8)],
                           out_hidden_size=s["hidden"], tokens_per_second=2),
        tie_word_embeddings=s["tie"], **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    processor = make_processor("qwen2_5_vl", tok)
    if save:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model.eval(), processor


def lm_params(model):
    lm = model.model.language_model
    return sum(p.numel() for p in lm.parameters()) + (0 if model.config.get_text_config().tie_word_embeddings
                                                       else model.lm_head.weight.numel())


@dataclass
class RandomVideo:
    """Random frames with the metadata data.video.SampledVideo carries (no decoding: PyAV is not needed)."""
    frames: np.ndarray

    def metadata(self):
        n = len(self.frames)
        return {"total_num_frames": n, "fps": 2.0, "duration": n / 2.0, "frames_indices": list(range(n))}


def text_prompts(batch: int, length: int, seed=0):
    """`batch` copies of a video-free prompt of `length` random allowed token ids (the same for every engine)."""
    import vlm
    ids = torch.randint(20, 300, (length,), generator=torch.Generator().manual_seed(seed))
    return [vlm.Prompt(input_ids=ids, positions=torch.arange(length).expand(3, -1).clone(),
                           pixel_values_videos=None, video_grid_thw=None, num_video_tokens=0) for _ in range(batch)]


def random_video(frames: int, side: int, seed=0):
    return RandomVideo(np.random.default_rng(seed).integers(0, 255, (frames, side, side, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------
# rollout: generated tokens/s

def bench_rollout(cfg: BenchConfig):
    import rollout
    import vlm
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = make_model(cfg.shape, "/tmp/bench-model", device=dev,
                                  dtype=torch.bfloat16 if dev == "cuda" else torch.float32, save=cfg.vllm)
    frames = cfg.frames or [64, 512]  # 64 frames at 448x448 (8k video tokens), 512 at 224x224 (16k)
    cases = [("text 1k", 0, 0), (f"{frames[0]} frames", frames[0], 448), (f"{frames[-1]} frames", frames[-1], 224)]
    if cfg.tiny:
        cases = [("text", 0, 0), ("8 frames", 8, 56)]
    rows = []
    for name, frames, side in (cases if cfg.hf else []):
        if frames:
            prompts = [vlm.build_prompt(model, processor, "Describe the video.", random_video(frames, side, b))
                       for b in range(cfg.batch)]
        else:
            prompts = text_prompts(cfg.batch, 64 if cfg.tiny else 1024)
        P = len(prompts[0].input_ids)
        try:
            with torch.no_grad():
                feats = vlm.encode_videos(model, prompts) if frames else None
        except torch.OutOfMemoryError as e:
            rows.append({"case": name, "prompt_tokens": P, "engine": "vision tower", "error": f"OOM: {e}"[:200]})
            continue
        engines = {"ours (DynamicCache)": dict(static_cache=False)}
        if cfg.compile and dev == "cuda":
            engines["ours (static KV, compiled)"] = dict(static_cache=True, compile_step=True)
        for engine, kw in engines.items():
            run = functools.partial(rollout.hf_generate, model, processor, prompts, 1, 1.0, 1.0, cfg.new_tokens, 0,
                                    feats, **kw)
            try:
                run()  # warm-up (and compilation)
                sync()
                t = time.perf_counter()
                outs = run()
                sync()
                dt = time.perf_counter() - t
                new = sum(len(o.response_ids) for o in outs)
                rows.append({"case": name, "prompt_tokens": P, "engine": engine, "tokens_per_s": new / dt, "s": dt})
                print(rows[-1], flush=True)
            except Exception as e:  # report, keep measuring the others
                rows.append({"case": name, "prompt_tokens": P, "engine": engine, "error": f"{type(e).__name__}: {e}"[:300]})
        rows.append(bench_plain_generate(model, prompts, feats, cfg, name, P))
        del prompts, feats
        torch.cuda.empty_cache() if dev == "cuda" else None
    if cfg.vllm:
        rows += bench_vllm_rollout(cfg, processor, model, cases)
    print_table(rows, ["case", "prompt_tokens", "engine", "tokens_per_s", "s", "error"])
    log({"bench": "rollout", **device_info(), "shape": cfg.shape, "batch": cfg.batch, "new_tokens": cfg.new_tokens,
         "rows": rows}, cfg)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_plain_generate(model, prompts, feats, cfg, name, P):
    """transformers' own model.generate on the same inputs (its own positions; timing only)."""
    try:
        dev = model.lm_head.weight.device
        ids = torch.stack([p.input_ids for p in prompts]).to(dev)
        kw = {}
        if prompts[0].pixel_values_videos is not None:
            kw = dict(pixel_values_videos=torch.cat([p.pixel_values_videos for p in prompts]).to(dev),
                      video_grid_thw=torch.cat([p.video_grid_thw for p in prompts]).to(dev),
                      mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                      second_per_grid_ts=torch.ones(len(prompts), device=dev))
        gen = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, **kw)
        gen()
        sync()
        t = time.perf_counter()
        out = gen()
        sync()
        dt = time.perf_counter() - t
        return {"case": name, "prompt_tokens": P, "engine": "transformers generate()",
                "tokens_per_s": (out.shape[1] - ids.shape[1]) * len(prompts) / dt, "s": dt}
    except Exception as e:
        return {"case": name, "prompt_tokens": P, "engine": "transformers generate()", "error": f"{type(e).__name__}: {e}"[:300]}


def bench_vllm_rollout(cfg, processor, model, cases):
    """The same prompts through the colocated vLLM engine (the model saved to /tmp/bench-model)."""
    import rollout
    import vlm
    rows = []
    try:
        engine = rollout.VLLMEngine("/tmp/bench-model", gpu_memory_utilization=0.35, max_model_len=32768)
    except Exception as e:
        return [{"case": "all", "engine": "vLLM", "error": f"{type(e).__name__}: {e}"[:300]}]
    for name, frames, side in cases:
        if frames:
            prompts = [vlm.build_prompt(model, processor, "Describe the video.", random_video(frames, side, b))
                       for b in range(cfg.batch)]
        else:  # the same 1k-token text prompt as the HF engines get
            prompts = text_prompts(cfg.batch, 1024)
        try:
            engine.generate(prompts, 1, 1.0, 1.0, cfg.new_tokens, 0)
            t = time.perf_counter()
            outs = engine.generate(prompts, 1, 1.0, 1.0, cfg.new_tokens, 1)
            dt = time.perf_counter() - t
            rows.append({"case": name, "prompt_tokens": len(prompts[0].input_ids), "engine": "vLLM",
                         "tokens_per_s": sum(len(o.response_ids) for o in outs) / dt, "s": dt})
        except Exception as e:
            rows.append({"case": name, "engine": "vLLM", "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


# ----------------------------------------------------------------------------------------------------------
# train: one GRPO step by phase; the longest forward+backward; the naive baseline

def bench_train(cfg: BenchConfig):
    import rollout
    import vlm
    import train_grpo as T
    from data.rewards import compute_rewards
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = make_model(cfg.shape, "", dtype=torch.float32, device=dev)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d = T.Dist(device=dev)
    policy = T.wrap_fsdp(T.Root(model), T.vlm_units(model), d, bf16=dev == "cuda")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    tcfg = T.Config(max_new_tokens=cfg.new_tokens if not cfg.tiny else 8, micro_batch_size=1, n=4)
    rows = []
    for frames in (cfg.frames or ([8] if cfg.tiny else [64, 256])):
        side = 56 if cfg.tiny else 224  # 64 video tokens per frame pair (HF's non-flash vision attention loops per window)
        prompts = [vlm.build_prompt(model, processor, "What colour was the flash? Options: A. red B. green",
                                        random_video(frames, side, k)) for k in range(2)]
        sample = {"answer": "A", "problem_type": "multiple_choice", "options": ["A. red", "B. green"]}
        torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
        times = {}
        t = time.perf_counter()
        policy.eval()
        outs = policy(rollout.hf_generate, processor, prompts, tcfg.n, 1.0, 1.0, tcfg.max_new_tokens, 0)
        sync()
        times["rollout"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = compute_rewards([o.text for o in outs], [sample] * len(outs))
        times["reward"] = time.perf_counter() - t
        reward = torch.as_tensor(scores["reward"], dtype=torch.float32).view(len(prompts), tcfg.n)
        reward += torch.randn_like(reward) * 0.1  # a random model earns no reward: give the update a signal
        adv = T.compute_advantages(reward).flatten()
        seqs = [T.Seq(prompt=prompts[o.prompt_index], response_ids=o.response_ids,
                      advantages=torch.full((len(o.response_ids),), float(a))) for o, a in zip(outs, adv)]
        t = time.perf_counter()
        T.fill_logprobs(policy, seqs, tcfg, [], "logp_old", seqs[0])
        sync()
        times["logprobs"] = time.perf_counter() - t
        policy.train()
        t = time.perf_counter()
        metrics = T.update(policy, optimizer, seqs, tcfg, d, [], seqs[0])
        sync()
        times["update"] = time.perf_counter() - t
        tokens = sum(len(s.prompt.input_ids) + len(s.response_ids) for s in seqs)
        print(times, flush=True)
        rows.append({"frames": frames, "seq_tokens": len(prompts[0].input_ids) + tcfg.max_new_tokens,
                     "video_tokens": prompts[0].num_video_tokens, "sequences": len(seqs),
                     **{f"{k}_s": v for k, v in times.items()}, "update_tokens_per_s": tokens / times["update"],
                     "peak_GiB": peak_gib(), "loss": metrics["loss"]})
    print_table(rows, list(rows[0]))
    del policy, optimizer, model
    torch.cuda.empty_cache() if dev == "cuda" else None
    log({"bench": "train_step", **device_info(), "shape": cfg.shape, "rows": rows}, cfg)
    bench_longest(cfg)


def fwd_bwd(model, S: int, response: int, naive: bool, chunk=1024):
    """Forward + backward of response-only log-probs on one sequence of S text tokens (the policy-gradient
    forward without the vision tower); naive = full-vocabulary logits over the whole sequence."""
    import vlm
    dev = model.lm_head.weight.device
    ids = torch.randint(20, 300, (1, S), device=dev)
    pos = torch.arange(S, device=dev).view(1, 1, S).expand(3, 1, S)
    hidden, _ = vlm.decoder_hidden(model, ids, pos)
    if naive:
        logits = model.lm_head(hidden).float()
        logp = torch.log_softmax(logits[0, S - response - 1:-1], -1).gather(-1, ids[0, S - response:, None])
    else:
        logp, _ = vlm.token_logprobs(model, hidden[0, S - response - 1:-1], ids[0, S - response:], [], chunk=chunk)
    logp.sum().backward()


def bench_longest(cfg: BenchConfig):
    """Time and MFU of forward+backward at growing lengths until out of memory, ours vs the naive baseline."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = make_model(cfg.shape, "", dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev)
    model.model.visual.to("cpu")  # the LM alone here
    n_params = lm_params(model)
    text = model.config.get_text_config()
    peak = matmul_tflops()
    lens = cfg.seq_lens or ([256, 512] if cfg.tiny else [16384, 32768, 65536, 131072, 196608, 262144])
    if dev == "cuda":  # "fits on an 80 GB GPU": cap this process at an H100's memory whatever the card
        torch.cuda.set_per_process_memory_fraction(min(1.0, 78 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fwd_bwd(model, lens[0] // 2, lens[0] // 8, False)  # warm-up (kernels, allocator) once
    rows = []
    for variant in ("ours: response-only log-probs, checkpointing", "naive: full logits, no checkpointing"):
        naive = variant.startswith("naive")
        if naive:
            model.gradient_checkpointing_disable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for S in lens:
            model.zero_grad(set_to_none=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                t = time.perf_counter()
                fwd_bwd(model, S, min(1024, S // 4), naive)
                sync()
                dt = time.perf_counter() - t
                flops = 6 * n_params * S + 6 * text.num_hidden_layers * text.hidden_size * S * S
                rows.append({"variant": variant, "tokens": S, "s": dt, "MFU": flops / dt / 1e12 / peak,
                             "peak_GiB": peak_gib()})
                print(rows[-1], flush=True)
            except torch.OutOfMemoryError:
                rows.append({"variant": variant, "tokens": S, "s": "OOM"})
                model.zero_grad(set_to_none=True)
                break
    print_table(rows, ["variant", "tokens", "s", "MFU", "peak_GiB"])
    log({"bench": "longest_fwd_bwd", **device_info(), "shape": cfg.shape, "lm_params": n_params,
         "bf16_matmul_TFLOPs": peak, "rows": rows}, cfg)


# ----------------------------------------------------------------------------------------------------------
# sp: Ulysses attention (+ its all-to-alls) vs plain SDPA on one GPU; chunked vs plain all-gather memory

def bench_sp(cfg: BenchConfig):
    """(1) Ulysses attention through nccl at world size 1 (the all-to-alls run as self-exchanges, so this is
    their fixed overhead, not multi-GPU communication) vs plain SDPA; (2) peak host memory of a chunked vs a
    plain all-gather over 4 gloo processes."""
    import torch.distributed as dist
    import torch.nn.functional as F
    import sp
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if dev == "cuda" else "gloo", rank=0, world_size=1)
    rows = []
    B, H, D = 1, 16, 128
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    def exchange(x):  # an all-to-all that really runs (sp.all_to_all skips the call at world size 1)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous())
        return out
    for S in ([256] if cfg.tiny else [8192, 32768, 131072]):
        q, k, v = (torch.randn(B, H if i == 0 else 2, S, D, device=dev, dtype=dtype) for i in range(3))
        module = type("M", (), {"is_causal": True})()
        plain = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ulysses = lambda: exchange(sp.ulysses_attention(module, exchange(q), exchange(k), exchange(v), None,
                                                        group=dist.group.WORLD)[0])
        for name, fn in (("plain SDPA", plain), ("ulysses: 3 a2a + SDPA + a2a", ulysses)):
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(10):
                fn()
            sync()
            rows.append({"what": name, "tokens": S, "ms": (time.perf_counter() - t) / 10 * 1e3})
    dist.destroy_process_group()
    print_table(rows, ["what", "tokens", "ms"])
    import torch.multiprocessing as mp
    mb = 16 if cfg.tiny else 256
    gather = []
    for chunks in (0, 8):  # 0 = plain dist.all_gather
        result = mp.get_context("spawn").Queue()
        mp.spawn(_gather_worker, args=(4, mb, chunks, result), nprocs=4, join=True)
        gather.append({"gather": "plain all_gather" if chunks == 0 else f"chunked_all_gather ({chunks} chunks)",
                       "tensor_MB_per_rank": mb, "extra_peak_MB_rank0": result.get()})
    print_table(gather, list(gather[0]))
    log({"bench": "sp", **device_info(), "attention": rows, "gather": gather}, cfg)


def _gather_worker(rank, world, mb, chunks, result):
    import resource
    import torch.distributed as dist
    import sp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.full((mb * 2**20 // 4,), float(rank))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if chunks:   # output allocated once, filled chunk by chunk
        got = sp.chunked_all_gather(x, chunks, dist.group.WORLD)
    else:        # world receive buffers, then the concatenated output
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        got = torch.cat(parts)
    assert torch.equal(got[x.numel():2 * x.numel()], torch.ones_like(x))
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if rank == 0:
        result.put(extra)
    dist.destroy_process_group()


def print_table(rows, keys):
    keys = [k for k in keys if any(k in r for r in rows)]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(fmt(r.get(k, "")) for k in keys))


# ----------------------------------------------------------------------------------------------------------
# memory plan: per-GPU memory for Qwen2.5-VL-7B on 8 GPUs, with and without SP

def bench_memory(cfg: BenchConfig):
    """Estimate = sharded training state + one sequence's activations on this GPU:
        state  = params x (4 fp32 master + 4 grad + 8 Adam) bytes / world  (FSDP2 shards everything)
        acts   = checkpointed layer inputs: layers x (S / sp) x hidden x 2 bytes (bf16), plus one layer's
                 recompute working set ~ c x (S / sp) x (hidden + ffn) x 2 bytes, plus the vision tower's
                 output (S_video / sp x hidden) and logits of one lm_head chunk
    c is fitted to the single-GPU measurement of `bench.py train` (see README)."""
    s = SHAPES[cfg.shape if cfg.shape != "3b" else "7b"]
    params = 8.3e9
    world, tokens_per_frame = 8, 64  # Long-RL: 448x448 frames, 2x2 merge, 2 frames per temporal patch -> 64/frame
    rows = []
    for frames in (256, 1024, 3600):
        S = frames * tokens_per_frame + 1024
        for sp_size in (1, 4, 8):
            state = params * 16 / world
            acts = (s["layers"] * S / sp_size * s["hidden"] * 2 + 6 * S / sp_size * (s["hidden"] + s["ffn"]) * 2)
            rows.append({"frames": frames, "tokens": S, "sp": sp_size, "state_GiB": state / 2**30,
                         "activations_GiB": acts / 2**30, "total_GiB": (state + acts) / 2**30})
    print_table(rows, list(rows[0]))
    log({"bench": "memory_plan", "model": "Qwen2.5-VL-7B", "gpus": world, "rows": rows}, cfg)


def bench_cache(cfg: BenchConfig):
    """GRPO steps with the vision tower frozen, videos decoded + encoded live vs read from cache_embeddings.py's
    cache (cache_embeddings.bench_cache does the runs; this writes the random model and the synthetic task)."""
    import cache_embeddings
    import train_grpo as T
    from data.synthetic import SyntheticConfig, make_dataset
    out = os.path.join(cfg.out and os.path.dirname(os.path.abspath(cfg.out)) or "/tmp", "bench_cache")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    frames = (cfg.frames or [8 if cfg.tiny else 64])[0]
    make_model(cfg.shape, os.path.join(out, "model"), device=dev, dtype=torch.float32 if cfg.tiny else torch.bfloat16,
               save=True)
    make_dataset(SyntheticConfig(out=os.path.join(out, "data"), num_train=16, num_eval=4, frames=frames,
                                 size=56 if cfg.tiny else 224, seed=cfg.seed))
    tcfg = T.Config(model=os.path.join(out, "model"), data=os.path.join(out, "data", "train.jsonl"),
                    out_dir=os.path.join(out, "runs"), num_frames=frames, max_pixels=(56 if cfg.tiny else 224) ** 2,
                    rollout_batch_size=2, n=4, micro_batch_size=4, max_new_tokens=8 if cfg.tiny else cfg.new_tokens,
                    think=False, progress=False, device=dev, engine="hf")
    res = cache_embeddings.bench_cache(tcfg, steps=3 if cfg.tiny else 5)
    rows = [{"run": k, "step_s": res[f"step_s_{k}"], **{p[5:-len(k) - 1]: v for p, v in res.items()
             if p.startswith("time_") and p.endswith("_" + k)}} for k in ("live", "cached")]
    print_table(rows, list(rows[0]))
    print(f"cache built in {res['cache_build_s']:.1f} s; speed-up {res['speedup']:.2f}x per step", flush=True)
    log({"bench": "cache", **device_info(), "shape": cfg.shape, "frames": frames, **res}, cfg)


def grpo_setup(cfg: BenchConfig):
    """Write a random model of the chosen shape (+ processor) and a 64-frame synthetic task to --out, for the
    single-GPU vLLM run of config/qwen2_5_vl_3b_vllm_1gpu.py."""
    from data.synthetic import SyntheticConfig, make_dataset
    out = cfg.out or "/tmp/grpo3b"
    make_model(cfg.shape, os.path.join(out, "model"), device="cuda" if torch.cuda.is_available() else "cpu",
               save=True)
    make_dataset(SyntheticConfig(out=os.path.join(out, "synthetic"), num_train=64, num_eval=16,
                                 frames=8 if cfg.tiny else 64, size=56 if cfg.tiny else 224, seed=cfg.seed))
    print(f"wrote {out}/model and {out}/synthetic; now: torchrun --nproc_per_node=1 train_grpo.py "
          f"config/qwen2_5_vl_3b_vllm_1gpu.py --model={out}/model --data={out}/synthetic/train.jsonl --out_dir={out}/run")


if __name__ == "__main__":
    from configurator import parse_config
    benches = {"video": None, "rollout": bench_rollout, "train": bench_train, "longest": bench_longest,
               "sp": bench_sp, "memory": bench_memory, "cache": bench_cache, "grpo_setup": grpo_setup}
    which = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in benches else None
    if which is None and "--help" not in sys.argv and "-h" not in sys.argv:
        raise SystemExit(f"usage: python bench.py {{{'|'.join(benches)}}} [--key=value ...]  (--help for fields)")
    if which == "video":
        sys.argv = [sys.argv[0], "--bench"] + sys.argv[2:]
        import runpy
        runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "video.py"), run_name="__main__")
        raise SystemExit(0)
    cfg = parse_config(BenchConfig, sys.argv[2:] if which else sys.argv[1:])
    if cfg.tiny:
        cfg.shape = "tiny"
    if which == "grpo_setup":
        grpo_setup(cfg)
        raise SystemExit(0)
    torch.manual_seed(cfg.seed)
    benches[which](cfg)
