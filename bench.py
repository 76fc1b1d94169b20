"""
The benchmarks behind every number in the README. Each prints a table and one JSON line (`BENCH {...}`).

    python bench.py video                 # data/video.py, 1-hour video: our sampler vs decode-all, torchcodec, decord
    python bench.py rollout               # HF engine tokens/s: generate() vs our loop (model's layers on
                                          # dynamic / static KV; our fused decode step; CUDA graph)
    python bench.py train                 # one GRPO step by phase, 64 and 256 frames; then `longest`
    python bench.py longest               # fwd+bwd time, MFU, peak per length and checkpoint mode; naive baseline
    python bench.py sp                    # Ulysses attention + all-to-all vs plain SDPA; chunked vs plain gather
    python bench.py rollout --vllm=True   # ... and the vLLM engine beside the HF one (GPU node with vllm)
    python bench.py rollout --profile=True '--cases=["text 8k"]'   # + GPU time per kernel of a decode step
    python bench.py cache                 # GRPO step time with cached vision embeddings vs live decode + encode
    python bench.py memory                # per-GPU memory plan for Qwen2.5-VL-7B at 256 / 1,024 / 3,600 frames
    python bench.py trl                   # GRPO step time + reward vs TRL's GRPOTrainer (needs: pip install trl)
    python bench.py patch                 # the vision tower's patch embedding: Conv3d vs the same as one GEMM
    python bench.py mlp                   # the vision tower's MLP at its width (3,420) and at padded widths
    python bench.py train --tiny=True     # every bench also runs on a tiny model (CPU smoke test)

Models are random-initialised at the shape of Qwen2.5-VL-3B (or 7B with --shape=7b): no download. MFU counts
forward + backward FLOPs (lm_flops, attention_flops, tower_flops): 6 x (non-embedding LM parameters) x tokens
+ 6 x (lm_head) x scored (response) tokens + 12 x layers x hidden x visible (query, key) pairs (S^2 / 2 for one
causal sequence) [+ the vision tower's], recompute not counted, against the bf16 matmul rate measured on the same
GPU in the same run.
"""
import contextlib
import ctypes
import functools
import gc
import importlib.metadata as md
import inspect
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers
from av.video.reformatter import VideoReformatter
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLConfig, TrainerCallback

import rollout
import sp
import vlm
from configurator import parse_config
from data.datasets import format_question, load_jsonl
from data.rewards import compute_rewards
from data.synthetic import SyntheticConfig, make_dataset
from data.tiny import make_processor, make_tiny_model, train_tokenizer
from data.video import FrameSampling, fit_size, probe, write_video

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
    variants: list = None  # longest: which memory variants to run (full | attention | offload | none; default all)
    batch: int = 8                  # rollout: sequences decoded together
    new_tokens: int = 256           # rollout: generated tokens per sequence
    vllm: bool = False              # rollout: also time the vLLM engine (needs vllm + CUDA)
    hf: bool = True                 # rollout: time the HF engines (False: only vLLM, with --vllm=True)
    cases: list = None              # rollout: run only the cases whose name starts with one of these (default all)
    engines: list = None            # rollout: run only the engines whose name contains one of these (default all)
    profile: bool = False           # rollout: after timing, GPU time per kernel of the default engine's decode steps;
                                    # train: torch.profiler over step 2's update (top ops printed, trace in the run;
                                    # the times are then the steps after it: --steps=3 or more)
    out: str = ""                   # also write the JSON result here
    seed: int = 0                   # random init / data seed
    steps: int = 0                  # GRPO steps per run (0: train 3, cache 5 (3 with --tiny), trl 100 (4 with --tiny))
    n: int = 4                      # train, cache: responses per prompt
    prompts: int = 2                # train: prompts per step (1 fits 1,024 frames x 8 responses unpacked)
    packing: list = None            # train: group_packing values side by side (default [True]; e.g. [True,False])
    vision: list = None             # train: vision_attention values side by side (default ["batched"]; or "loop")
    patch_embed: list = None        # train: patch_embed values side by side (default ["linear"]; or "conv")
    alloc_conf: list = None         # train: PYTORCH_CUDA_ALLOC_CONF values side by side (default: the environment's),
                                    # e.g. ["expandable_segments:False", "expandable_segments:True"]
    vision_mlp: list = None         # train: vision_mlp values side by side (default ["plain"]; or "padded")
    compile_blocks: list = None     # train: compile_blocks values side by side (default [""]: none; e.g.
                                    # ["", "norms,mlp", "norms,mlp,vision_attention"])
    widths: list = None             # mlp: MLP widths (default 3,420, the tower's, and padded: 3,424 and 3,456)
    patches: list = None            # patch: patch counts (default 32,768 and 131,072: 256 and 1,024 frames at 224 px)
    freeze_vision: bool = False     # train: the vision tower frozen (its activations then need no memory)
    checkpoint_mode: str = "full"   # train: the decoder's activation checkpointing (train_grpo.py's; offload: layer
                                    # inputs to host memory, for a step that does not fit)


def log(result: dict, cfg: BenchConfig):
    line = json.dumps(result, default=float)
    print("BENCH " + line, flush=True)
    if cfg.out:
        with open(cfg.out, "a") as f:
            f.write(line + "\n")


def device_info():
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


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
    lm = vlm.text_model(model)
    return sum(p.numel() for p in lm.parameters()) + (0 if model.config.get_text_config().tie_word_embeddings
                                                       else vlm.output_head(model).weight.numel())


# ----------------------------------------------------------------------------------------------------------
# FLOP counts behind every MFU (longest, train's update_MFU and useful MFU): matmul FLOPs of forward + backward,
# 6 per parameter per row it multiplies (2 forward, 4 backward), recompute not counted

@dataclass
class FlopParams:
    """The parameter counts that multiply each kind of row."""
    body: int        # language model on every token: decoder layers + final norm. The input embedding is a lookup
                     # (no FLOPs): left out, tied or not
    head: int        # lm_head (vocab x hidden; 3B: the tied embedding's matrix): only on scored tokens, as log-probs
                     # are taken for response tokens only (vlm.token_logprobs, chunked)
    layers: int
    hidden: int
    tower: int = 0   # vision tower per patch: patch embedding + blocks
    merger: int = 0  # vision merger: once per merged token, i.e. per `merge` patches
    merge: int = 4   # patches per merged token (spatial_merge_size^2)


def flop_params(model) -> FlopParams:
    text, lm = model.config.get_text_config(), vlm.text_model(model)
    visual = vlm.media_model(model).visual
    merger = sum(p.numel() for p in visual.merger.parameters())
    return FlopParams(body=sum(p.numel() for p in lm.parameters()) - vlm.input_embeddings(model).weight.numel(),
                      head=vlm.output_head(model).weight.numel(), layers=text.num_hidden_layers,
                      hidden=text.hidden_size, tower=sum(p.numel() for p in visual.parameters()) - merger,
                      merger=merger, merge=model.config.vision_config.spatial_merge_size ** 2)


def lm_flops(c: FlopParams, tokens: float, scored: float) -> float:
    """The language model's parameters over `tokens` tokens of which `scored` get a log-prob:
        6 x body x tokens + 6 x head x scored
    (attention's own products apart: attention_flops)."""
    return 6 * c.body * tokens + 6 * c.head * scored


def attention_flops(c: FlopParams, pairs: float) -> float:
    """Attention's products (q k^T, p v: 2 x hidden FLOPs each per visible (query, key) pair, forward; backward
    twice that), every layer: 12 x layers x hidden x pairs. One causal sequence of S tokens has S^2 / 2 pairs
    (6 L h S^2, bench_longest), a packed group attended_pairs."""
    return 12 * c.layers * c.hidden * pairs


def tower_flops(c: FlopParams, patches: float, trained: bool = True) -> float:
    """The vision tower over `patches` patches, 6 FLOPs a parameter a row trained, 2 frozen (forward only):
        (6 or 2) x (tower x patches + merger x patches / merge)
    its windowed attention left out."""
    return (6 if trained else 2) * (c.tower * patches + c.merger * patches / c.merge)


def update_flops(c: FlopParams, tokens: float, prompts: int, n: int, R: float, packing: bool, patches: int,
                 trained_tower: bool = True) -> float:
    """One GRPO update (bench_train's update_MFU): the decoder over the `tokens` it computes (packed: each prompt
    once; not: n times), lm_head over the prompts x n x R response tokens, attention over the layout's visible
    pairs, and the tower over each prompt's `patches` patches, once per prompt packed, once per sequence not."""
    return (lm_flops(c, tokens, prompts * n * R) + attention_flops(c, attended_pairs(tokens, prompts, n, R, packing))
            + tower_flops(c, patches, trained_tower) * prompts * (1 if packing else n))


@dataclass
class RandomVideo:
    """Random frames with the metadata data.video.SampledVideo carries (no decoding: PyAV is not needed)."""
    frames: np.ndarray

    def metadata(self):
        n = len(self.frames)
        return {"total_num_frames": n, "fps": 2.0, "duration": n / 2.0, "frames_indices": list(range(n))}


def text_prompts(batch: int, length: int, seed=0):
    """`batch` different video-free prompts of `length` random allowed token ids (the same for every engine;
    different from each other, so that an engine with a prefix cache cannot compute one and reuse it for all)."""
    gen = torch.Generator().manual_seed(seed)
    return [vlm.Prompt(input_ids=ids, positions=torch.arange(length).expand(3, -1).clone(), pixel_values_videos=None,
                       video_grid_thw=None, num_video_tokens=0)
            for ids in torch.randint(20, 300, (batch, length), generator=gen)]


def random_video(frames: int, side: int, seed=0):
    return RandomVideo(np.random.default_rng(seed).integers(0, 255, (frames, side, side, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------
# rollout: generated tokens/s

def bench_rollout(cfg: BenchConfig):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = make_model(cfg.shape, "/tmp/bench-model", device=dev,
                                  dtype=torch.bfloat16 if dev == "cuda" else torch.float32, save=cfg.vllm)
    frames = cfg.frames or [64, 512]  # 64 frames at 448x448 (8k video tokens), 512 at 224x224 (16k)
    group = f"text 8k, 1 prompt x {cfg.batch} samples"  # a GRPO group: one prompt pass, its K/V copied per sample
    cases = [("text 1k", 0, 1024), ("text 8k", 0, 8192), (group, 0, 8192), (f"{frames[0]} frames", frames[0], 448),
             (f"{frames[-1]} frames", frames[-1], 224)]
    if cfg.tiny:
        cases = [("text", 0, 64), ("8 frames", 8, 56)]
    if cfg.cases:
        cases = [c for c in cases if any(c[0].startswith(prefix) for prefix in cfg.cases)]
    selected = lambda engine: not cfg.engines or any(part in engine for part in cfg.engines)
    rows = []
    for name, frames, side in (cases if cfg.hf else []):
        n = cfg.batch if name == group else 1  # samples per prompt
        if frames:
            prompts = [vlm.build_prompt(model, processor, "Describe the video.", random_video(frames, side, b))
                       for b in range(cfg.batch)]
        else:
            prompts = text_prompts(cfg.batch // n, side)  # text cases: `side` is the prompt length
        P = len(prompts[0].input_ids)
        try:
            with torch.no_grad():
                feats = vlm.encode_videos(model, prompts) if frames else None
        except torch.OutOfMemoryError as e:
            rows.append({"case": name, "prompt_tokens": P, "engine": "vision tower", "error": f"OOM: {e}"[:200]})
            continue
        engines = {"ours: model's layers, DynamicCache": dict(static_cache=False)}
        if dev == "cuda":
            engines.update({
                "ours: model's layers, static KV + CUDA graph": dict(fused=False),
                "ours: fused step + CUDA graph": dict(fused=True, compile_kernels=False),
                "ours: fused step, separate q/k/v and gate/up weights, compiled + CUDA graph": dict(fused=True),
                "ours: fused step, compiled + CUDA graph (default)": dict(fused=True, compile_kernels=True)})
            if n > 1:  # the group case: the default engine only (generate() expands the prompt before its pass)
                engines = {k: v for k, v in engines.items() if "default" in k}
        else:  # a CPU smoke test of the fused step (no CUDA graph, nothing compiled)
            engines["ours: fused step"] = dict(static_cache=True, fused=True)
        engines = {k: v for k, v in engines.items() if selected(k)}
        generate = functools.partial(rollout.hf_generate, model, processor, prompts, n, 1.0, 1.0, feats=feats)
        for engine, kw in engines.items():
            run = functools.partial(generate, **kw)
            try:
                with separate_weights("separate" in engine):
                    for warm in (cfg.new_tokens, 1):  # warm-up (and compilation, for both cache lengths)
                        run(max_new_tokens=warm)
                    prefill_s = timed(functools.partial(run, max_new_tokens=1))[0]  # prompt + first token
                    dt, outs = timed(functools.partial(run, max_new_tokens=cfg.new_tokens))
                new = sum(len(o.response_ids) for o in outs)
                rows.append({"case": name, "prompt_tokens": P, "engine": engine, "tokens_per_s": new / dt, "s": dt,
                             "decode_tokens_per_s": (new - len(outs)) / (dt - prefill_s), "prompt_s": prefill_s})
                print(rows[-1], flush=True)
            except Exception as e:  # report, keep measuring the others
                rows.append({"case": name, "prompt_tokens": P, "engine": engine,
                             "error": f"{type(e).__name__}: {e}"[:300]})
        if n == 1 and selected(PLAIN_GENERATE):
            rows.append(bench_plain_generate(model, prompts, feats, cfg, name, P))
            print(rows[-1], flush=True)
        if cfg.profile:
            profile_decode(generate, cfg.new_tokens, name)
        del prompts, feats
        torch.cuda.empty_cache() if dev == "cuda" else None
    if cfg.vllm:
        rows += bench_vllm_rollout(cfg, processor, model, cases)
    print_table(rows, ["case", "prompt_tokens", "engine", "tokens_per_s", "decode_tokens_per_s", "s", "prompt_s",
                      "error"])
    log({"bench": "rollout", **device_info(), "shape": cfg.shape, "batch": cfg.batch, "new_tokens": cfg.new_tokens,
         "rows": rows}, cfg)


def profile_decode(run, new_tokens: int, name: str, top: int = 14):
    """GPU time by kernel for decoding: a profile of run(max_new_tokens=new_tokens) minus one of a 1-token run
    (the prompt pass), per decode step. The fused step runs without its CUDA graph here (the same kernels; graph
    replays hide them from the profiler on some CUDA versions), so the sum is GPU time, not wall time. On a CPU
    the same table holds the operators' own CPU time."""
    gpu = torch.cuda.is_available()

    def kernel_us(tokens):
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            run(max_new_tokens=tokens, cuda_graph=False)
            sync()
        times = {e.key: e.device_time_total if gpu else e.self_cpu_time_total for e in prof.key_averages()}
        return {k: v for k, v in times.items() if v > 0}
    run(max_new_tokens=4, cuda_graph=False)  # warm-up without the graph
    prompt, full = kernel_us(1), kernel_us(new_tokens)
    per_step = {k: (v - prompt.get(k, 0.0)) / (new_tokens - 1) for k, v in full.items()}
    total = sum(per_step.values())
    print(f"decode step {'GPU' if gpu else 'CPU'} time, {name}: {total:.0f} us per token step (no CUDA graph)")
    for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v:8.1f} us  {100 * v / total:5.1f}%  {k[:110]}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, result) of fn(), with the GPU idle before and finished after."""
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


@contextlib.contextmanager
def separate_weights(on: bool):
    """fused_decode.fused_forward without concatenating q/k/v and gate/up (no extra weight copy, 3 more matmuls a
    layer), patched where hf_generate looks it up: the name in rollout's namespace."""
    real = rollout.fused_forward
    if on:
        rollout.fused_forward = lambda model, kv, compile_kernels: real(model, kv, compile_kernels,
                                                                        concat_weights=False)
    try:
        yield
    finally:
        rollout.fused_forward = real


PLAIN_GENERATE = "transformers generate()"


def bench_plain_generate(model, prompts, feats, cfg, name, P):
    """transformers' own model.generate on the same inputs (its own positions; timing only)."""
    try:
        dev = model.device
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
        dt, out = timed(gen)
        return {"case": name, "prompt_tokens": P, "engine": PLAIN_GENERATE,
                "tokens_per_s": (out.shape[1] - ids.shape[1]) * len(prompts) / dt, "s": dt}
    except Exception as e:
        return {"case": name, "prompt_tokens": P, "engine": PLAIN_GENERATE,
                "error": f"{type(e).__name__}: {e}"[:300]}


def bench_vllm_rollout(cfg, processor, model, cases):
    """The same prompts through the colocated vLLM engine (the model saved to /tmp/bench-model)."""
    rows = []
    try:
        engine = rollout.VLLMEngine("/tmp/bench-model", gpu_memory_utilization=0.35, max_model_len=32768)
    except Exception as e:
        return [{"case": "all", "engine": "vLLM", "error": f"{type(e).__name__}: {e}"[:300]}]
    def case_prompts(frames, side, seed, count):
        if frames:
            return [vlm.build_prompt(model, processor, "Describe the video.", random_video(frames, side, seed + b))
                    for b in range(count)]
        return text_prompts(count, side, seed)  # the same text prompts as the HF engines get (seed 0)

    for name, frames, side in cases:
        n = cfg.batch if "1 prompt x" in name else 1  # the group case: one prompt x batch samples, as the HF rows
        prompts = case_prompts(frames, side, 0, cfg.batch // n)
        try:
            # warm up twice on other prompts of the same shapes (kernels compiled, CUDA graphs captured for this
            # batch and length; the second call as the timed one runs, after a prefix-cache reset), then drop the
            # prefix cache: the timed call must compute its own prompts, as the HF engines do
            for seed in (1000, 2000):
                engine.generate(case_prompts(frames, side, seed, cfg.batch // n), n, 1.0, 1.0, cfg.new_tokens, 0)
                engine.llm.reset_prefix_cache()
            dt, outs = timed(lambda: engine.generate(prompts, n, 1.0, 1.0, cfg.new_tokens, 1))
            rows.append({"case": name, "prompt_tokens": len(prompts[0].input_ids), "engine": "vLLM",
                         "tokens_per_s": sum(len(o.response_ids) for o in outs) / dt, "s": dt})
        except Exception as e:
            rows.append({"case": name, "engine": "vLLM", "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


# ----------------------------------------------------------------------------------------------------------
# train: one GRPO step by phase; the longest forward+backward; the naive baseline

# the GRPO step as users run it: train_grpo.py itself, in a subprocess on a preset, timed by its metrics.jsonl

# "fits on an 80 GB GPU" whatever the card (an H200 has 141 GB): train_grpo.py run with its CUDA allocator capped at
# 78 GiB, what an H100 80GB gives a process
CAP_80GB = ("import runpy, sys, torch\n"
            "if torch.cuda.is_available():\n"
            "    torch.cuda.set_per_process_memory_fraction(min(1.0, 78 * 2**30 / "
            "torch.cuda.get_device_properties(0).total_memory))\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def die_with_parent():
    """preexec_fn of the benchmarks' subprocesses: the kernel kills the child when the bench dies (prctl
    PR_SET_PDEATHSIG = 1). A bench stopped by a time limit would otherwise leave its train_grpo.py running on the GPU,
    under the next measurement. Linux only; elsewhere nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def run_grpo(fields: dict, out_dir: str, env: dict = None) -> list:
    """Run `python train_grpo.py PRESET` (PRESET = these fields, written to out_dir/preset.py; CAP_80GB; `env` added
    to the environment) and return its metrics.jsonl rows. One process: on a GPU it acts as a one-rank torchrun
    (common.single_process_env)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    os.makedirs(out_dir)
    preset = os.path.join(out_dir, "preset.py")
    with open(preset, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in {**fields, "out_dir": out_dir}.items())
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", CAP_80GB, os.path.join(here, "train_grpo.py"), preset], check=True,
                   cwd=here, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=die_with_parent)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def phase_medians(rows: list, skip: int = 1) -> dict:
    """Median over the steps after the first `skip` (the first compiles kernels and warms the allocator; a
    profiled step is slowed by the profiler) of every time_* phase, their sum (step_s), the update's tokens/s and
    the peak memory."""
    timed = rows[skip:] or rows
    out = {k[5:] + "_s": float(np.median([r[k] for r in timed])) for k in rows[0] if k.startswith("time_")}
    out["step_s"] = float(np.median([sum(v for k, v in r.items() if k.startswith("time_")) for r in timed]))
    out["update_tokens_per_s"] = float(np.median([r["tokens_per_s"] for r in timed]))
    out["update_useful_tokens_per_s"] = float(np.median([r["useful_tokens_per_s"] for r in timed]))
    out["peak_GiB"] = max(r.get("peak_alloc_GiB", float("nan")) for r in timed)
    if "alloc_retries" in rows[0]:  # GPU runs: the allocator's cache flushes in the timed steps (train_grpo.py)
        out["alloc_retries"] = sum(r["alloc_retries"] for r in timed)
        out["peak_reserved_GiB"] = max(r["peak_reserved_GiB"] for r in timed)
    return out


def attended_pairs(tokens: float, prompts: int, n: int, R: float, packing: bool) -> float:
    """Visible (query, key) pairs of one update's decoder pass over `tokens` tokens: `prompts` prompts with n
    responses of R tokens each. Packed, a row [prompt P | response_1 .. response_n] (vlm.group_visible): the
    prompt's P (P + 1) / 2 causal pairs, and per response R P (the whole prompt) + R (R + 1) / 2 (itself, causal).
    Not packed, n rows [prompt | response] of L = P + R tokens, L (L + 1) / 2 each."""
    if packing:
        P = tokens / prompts - n * R
        return prompts * (P * (P + 1) / 2 + n * (R * P + R * (R + 1) / 2))
    L = tokens / (prompts * n)
    return prompts * n * L * (L + 1) / 2


def bench_train(cfg: BenchConfig):
    """GRPO steps of train_grpo.py on a random model of the chosen shape and synthetic 224x224 videos (random
    model: every reward is equal, the update still computes every token), per frame count; then `longest`."""
    root = os.path.join(tempfile.gettempdir(), "bench_train")  # model, videos, runs (never under $OUT)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    side = 56 if cfg.tiny else 224
    model, _ = make_model(cfg.shape, os.path.join(root, "model"), device=dev,
                          dtype=torch.float32 if cfg.tiny else torch.bfloat16, save=True)
    counts, vision_config = flop_params(model), model.config.vision_config
    del model
    peak = matmul_tflops()
    gc.collect()
    if dev == "cuda":  # the runs are subprocesses: this process's cached copy of the model would sit on their GPU
        torch.cuda.empty_cache()
    rows = []
    for frames in (cfg.frames or ([8] if cfg.tiny else [64, 256])):
        data = os.path.join(root, f"data{frames}")
        make_dataset(SyntheticConfig(out=data, num_train=8, num_eval=4, frames=frames, size=side, seed=cfg.seed))
        for packing, vision, patch, mlp, alloc, compiled in itertools.product(
                cfg.packing or [True], cfg.vision or ["batched"], cfg.patch_embed or ["linear"],
                cfg.vision_mlp or ["plain"], cfg.alloc_conf or [None], cfg.compile_blocks or [""]):
            metrics = run_grpo(dict(model=os.path.join(root, "model"), data=os.path.join(data, "train.jsonl"),
                                    num_frames=frames, max_pixels=side * side, min_pixels=side * side, think=False,
                                    rollout_batch_size=cfg.prompts, n=cfg.n,
                                    max_new_tokens=8 if cfg.tiny else cfg.new_tokens,
                                    micro_batch_size=1, group_packing=packing, vision_attention=vision,
                                    patch_embed=patch, vision_mlp=mlp, compile_blocks=compiled,
                                    freeze_vision=cfg.freeze_vision, checkpoint_mode=cfg.checkpoint_mode,
                                    max_steps=cfg.steps or 3, lr=1e-6,
                                    save_every=0, eval_every=0, progress=False, device=dev, engine="hf",
                                    seed=cfg.seed, profile_step=2 if cfg.profile else 0),
                               os.path.join(root, f"run{frames}"),
                               None if alloc is None else {"PYTORCH_CUDA_ALLOC_CONF": alloc})
            # micro-batches: one sequence, or with group_packing one packed group (one row)
            skip = 2 if cfg.profile else 1  # steps left out of the medians: the first (compiles), a profiled one
            row = {"frames": frames, "sequences": cfg.prompts * cfg.n, "group_packing": packing, "vision": vision,
                   "patch_embed": patch, "vision_mlp": mlp, "compile_blocks": compiled,
                   **({} if alloc is None else {"alloc_conf": alloc}),
                   **phase_medians(metrics, skip)}
            # FLOPs counted as bench.py longest counts them (lm_flops, attention_flops), so the two compare
            R = float(np.median([r["response_len"] for r in metrics[skip:] or metrics]))   # responses' mean length
            useful = row["update_useful_tokens_per_s"] * row["update_s"]  # each prompt once
            computed = useful if packing else row["update_tokens_per_s"] * row["update_s"]  # packed: the same
            patches = -(-frames // vision_config.temporal_patch_size) * (side // vision_config.patch_size) ** 2
            # useful MFU: the language model's parameters over the useful tokens; attention and tower left out
            useful_flops = lm_flops(counts, useful, cfg.prompts * cfg.n * R)
            row["update_useful_MFU"] = useful_flops / row["update_s"] / 1e12 / peak
            # update_MFU: everything the update computes
            row["update_flops"] = update_flops(counts, computed, cfg.prompts, cfg.n, R, packing, patches,
                                               trained_tower=not cfg.freeze_vision)
            row["update_MFU"] = row["update_flops"] / row["update_s"] / 1e12 / peak
            row.update(response_len=R, patches=patches)
            rows.append(row)
            print_table(rows[-1:], list(rows[-1]))
    print_table(rows, list(rows[0]))
    log({"bench": "train_step", **device_info(), "shape": cfg.shape, "n": cfg.n, "freeze_vision": cfg.freeze_vision,
         "checkpoint_mode": cfg.checkpoint_mode, "rows": rows}, cfg)
    bench_longest(cfg)


def fwd_bwd(model, S: int, response: int, naive: bool, chunk=1024):
    """Forward + backward of response-only log-probs on one sequence of S text tokens (the policy-gradient
    forward without the vision tower); naive = full-vocabulary logits over the whole sequence."""
    dev = vlm.output_head(model).weight.device
    ids = torch.randint(20, 300, (1, S), device=dev)
    pos = torch.arange(S, device=dev).view(1, 1, S).expand(3, 1, S)
    hidden, _ = vlm.decoder_hidden(model, ids, pos)
    if naive:
        logits = vlm.output_head(model)(hidden).float()
        logp = torch.log_softmax(logits[0, S - response - 1:-1], -1).gather(-1, ids[0, S - response:, None])
    else:
        logp, _ = vlm.token_logprobs(model, hidden[0, S - response - 1:-1], ids[0, S - response:], [], chunk=chunk)
    logp.sum().backward()


def bench_longest(cfg: BenchConfig):
    """Time and MFU of forward+backward at growing lengths until out of memory, for each activation-memory variant
    (vlm.set_checkpointing) and the naive baseline."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = make_model(cfg.shape, "", dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev)
    vlm.media_model(model).visual.to("cpu")  # the LM alone here
    n_params, counts = lm_params(model), flop_params(model)
    peak = matmul_tflops()
    lens = cfg.seq_lens or ([256, 512] if cfg.tiny else [16384, 32768, 65536, 131072, 196608, 262144])
    if dev == "cuda":  # "fits on an 80 GB GPU": cap this process at an H100's memory whatever the card
        torch.cuda.set_per_process_memory_fraction(min(1.0,
                                                       78 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    big = [S for S in lens if S >= 131072] or lens[-1:]
    # (name, vlm.set_checkpointing mode, mlp_chunk, attention_layers to try in turn, lengths)
    variants = [("full checkpointing", "full", 0, [0], lens),
                ("keep attention outputs", "attention", 0, [0, 28, 20], [S for S in lens if S <= 131072]),
                ("offload layer inputs + MLP chunks", "offload", 16384 if not cfg.tiny else 64, [0], big),
                ("naive: full logits, no checkpointing", "none", 0, [0], lens)]
    variants = [v for v in variants if any(v[1] == m or v[0] == m for m in cfg.variants)] if cfg.variants else variants
    model.train()
    vlm.set_checkpointing(model, "full")
    fwd_bwd(model, lens[0] // 2, lens[0] // 8, False)  # warm-up (kernels, allocator) once

    def measure(name, S, mode):
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            t = time.perf_counter()
            response = min(1024, S // 4)
            fwd_bwd(model, S, response, mode == "none")
            sync()
            dt = time.perf_counter() - t
            # lm_head over the response only, also in the naive mode (its full-vocabulary logits elsewhere are
            # waste, not useful FLOPs); causal attention: S^2 / 2 pairs
            flops = lm_flops(counts, S, response) + attention_flops(counts, S * S / 2)
            row = {"variant": name, "tokens": S, "s": dt, "MFU": flops / dt / 1e12 / peak, "peak_GiB": peak_gib()}
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            row = {"variant": name, "tokens": S, "s": "OOM"}
        print(row, flush=True)
        return row

    rows = []
    for variant, mode, mlp_chunk, keep_layers, var_lens in variants:
        for S in var_lens:
            for layers_kept in keep_layers:  # "attention": fewer layers keep theirs when all of them do not fit
                vlm.set_checkpointing(model, mode, mlp_chunk, layers_kept)
                rows.append(measure(variant + (f" ({layers_kept} layers)" if layers_kept else ""), S, mode))
                if rows[-1]["s"] != "OOM":
                    break
            if rows[-1]["s"] == "OOM":
                break  # longer sequences will not fit either
    vlm.set_checkpointing(model, "full")
    print_table(rows, ["variant", "tokens", "s", "MFU", "peak_GiB"])
    log({"bench": "longest_fwd_bwd", **device_info(), "shape": cfg.shape, "lm_params": n_params,
         "flop_params": vars(counts), "bf16_matmul_TFLOPs": peak, "rows": rows}, cfg)


# ----------------------------------------------------------------------------------------------------------
# sp: Ulysses attention (+ its all-to-alls) vs plain SDPA on one GPU; chunked vs plain all-gather memory

def bench_sp(cfg: BenchConfig):
    """(1) Ulysses attention through nccl at world size 1 (the all-to-alls run as self-exchanges, so this is
    their fixed overhead, not multi-GPU communication) vs plain SDPA; (2) peak host memory of a chunked vs a
    plain all-gather over 4 gloo processes."""
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
    """Per-GPU peak of one policy forward + backward (one sequence of S tokens, response-only log-probs, every
    decoder layer checkpointed, bf16 compute), in bytes; h hidden, f ffn, L layers, V vocab, N parameters:
        state  = (4 N + 8 T) / world                       fp32 master of all N, AdamW state of the T trained
                                                           params (a frozen tower has none), sharded by FSDP2
                                                           (the check rows: their own state)
        grads  = 4 T / world                               complete only at the end of backward
        gather = 4 x (non-unit params + one layer)         bf16 copy + bf16 grad of the FSDP2 root (embeddings,
                                                           lm_head, vision merger) and of the unit in flight (a
                                                           frozen tower's root parts: the copy only)
        ckpt   = (L + 1) x 2h per token                    each layer's bf16 input, + the gradient flowing back
        layer  = (14 f + 10 h) per token                   one layer recomputed + its backward: gate, up, silu,
                                                           product (4 x 2f) + backward temporaries (3 x 2f); 10h
                                                           (attention, norms) fitted: 3B measured 174.1 KB/token
        logits = chunk x V x 12                            one lm_head chunk (bf16 logits, fp32 log-softmax, grad)
        vision = 4 x (2 v_depth + 13) x v_hidden per video token, if the vision tower is trained: 4 patches per
                                                           merged token, checkpointed block inputs + the rest (13
                                                           fitted: measured 98.9 KB/patch); held until the LM
                                                           backward is done, for at most 8,192 tokens (past 32,768
                                                           patches vlm.encode_videos checkpoints the tower per call
                                                           of that many); 0 when frozen or cached
    peak = state + gather + vision/sp + max(S/sp x ckpt + max(S/sp x layer, logits),   (start of backward)
                                            grads + S/sp x (4h + layer))               (end of backward)
    Ulysses SP divides every per-token term by sp; its all-to-all buffers are left out. Checked first against
    single-GPU peaks of the 3B shape (lent H200, torch 2.11, transformers 5.17, 2026-11-25). Verdicts leave the
    CUDA context, NCCL and allocator fragmentation ~10% of an 80 GB card: fits < 72 GiB, tight < 78, else OOM."""
    GiB, tokens_per_frame, world, chunk = 2**30, 64, 8, 1024

    # (LM params, vision params, params outside decoder layers/vision blocks, one decoder layer, the vision tower's
    # part of those outside)
    def count(s):
        h, f, v, vf, kv = s["hidden"], s["ffn"], s["v_hidden"], s["v_ffn"], s["kv_heads"] * s["hidden"] // s["heads"]
        layer = 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * f + 2 * h
        emb = s["vocab"] * h * (1 if s["tie"] else 2) + h
        v_root = 3 * 2 * 14 * 14 * v + v + 16 * v * v + 4 * v + 4 * v * h + h  # patch embed + merger
        v_block = 4 * v * v + 4 * v + 3 * v * vf + 2 * vf + 3 * v
        return s["layers"] * layer + emb, s["v_depth"] * v_block + v_root, emb + v_root, layer, v_root

    def peak(s, S, sp, state, grads, gather, video=0, vision=False):
        h, L = s["hidden"], s["layers"]
        layer, logits = 14 * s["ffn"] + 10 * h, chunk * s["vocab"] * 12
        vis = min(video, 32768 // 4) * 4 * (2 * s["v_depth"] + 13) * s["v_hidden"] if vision else 0
        start = S / sp * 2 * h * (L + 1) + max(S / sp * layer, logits)
        return (state + gather + vis / sp + max(start, grads + S / sp * (4 * h + layer))) / GiB

    # measured peaks (torch.cuda.max_memory_allocated, GiB; "OOM" under the 78 GiB cap), 3B shape, one GPU, one
    # sequence with 1,024 response tokens. Rows 1-2: bench_longest at commit 282b6ed in a process of its own and,
    # as in the README, after bench_train in the same process, which left 16.42 GiB allocated (14.0 of them the
    # deleted FSDP2 model, freed only by gc.collect()). Row 3: the same forward+backward under FSDP2 as train_grpo
    # wraps it, AdamW state present (a one-off probe script, same machine and day).
    s3 = SHAPES["3b"]
    lm, vis, root, layer, _ = count(s3)
    plain = (2 * lm, 2 * lm, 2 * s3["vocab"] * s3["hidden"])  # state (bf16 params), grads, the embedding's grad
    # Rows 4-5: bench.py train at 1,024 frames x 8 responses of 256 tokens, the vision tower trained (lent H100,
    # commit cbf182e, 2026-12-07): a packed group (32,837 prompt tokens: 32,768 video + 69 text, + 2,048 response
    # tokens) and, unpacked, the largest sequence (one prompt + one response).
    fsdp = (12 * (lm + vis), 4 * (lm + vis), 4 * (root + layer))
    setups = {  # name: (state, grads, gather, {tokens: measured}, video tokens)
        "bf16 params + grads, no optimizer (bench.py longest)":
            (*plain, {16384: 14.42, 65536: 26.70, 131072: 46.86, 196608: 67.03, 262144: "OOM"}, 0),
        "the same after bench.py train, +16.42 GiB left (README)":
            (plain[0] + 16.42 * GiB, *plain[1:], {16384: 30.79, 131072: 63.22, 196608: "OOM"}, 0),
        "FSDP2 fp32 master + AdamW, bf16 compute (vision idle)":
            (12 * lm + 4 * vis, 4 * lm, 4 * (root + layer), {16384: 51.59, 32768: 54.38, 65536: 59.96, 98304: 68.53},
             0),
        "GRPO step, 1,024 frames, tower trained, packed group": (*fsdp, {32837 + 8 * 256: 65.46}, 32768),
        "GRPO step, 1,024 frames, tower trained, one row per response": (*fsdp, {32837 + 256: 68.88}, 32768),
    }
    check = []
    for name, (state, grads, gather, measured, video) in setups.items():
        for S, m in measured.items():
            p = peak(s3, S, 1, state, grads, gather, video, vision=video > 0)
            check.append({"setup": name, "tokens": S, "predicted_GiB": p, "measured_GiB": m,
                          "pred/meas": p / m if m != "OOM" else "agrees (> 78)" if p > 78 else "DISAGREES"})
    print_table(check, list(check[0]))
    # the plan: Qwen2.5-VL-7B, FSDP2 over 8 GPUs, per SP group one sequence of video + 1,024 response tokens, or
    # one packed group (--group_packing: the prompt once + 8 responses of 256 tokens; same formula, S = P + n R).
    # 64 tokens per frame (e.g. 448x224 px: 128 merged tokens per 2-frame patch): 3,600 frames = 231k tokens.
    s7 = SHAPES["7b"]
    lm, vis, root, layer, v_root = count(s7)
    # (state, grads, gather) with the tower frozen (no AdamW state or gradients for it: freeze_vision sets its
    # requires_grad False; its fp32 master stays sharded) and trained
    frozen = ((12 * lm + 4 * vis) / world, 4 * lm / world, 4 * (root + layer) - 2 * v_root)
    trained = (12 * (lm + vis) / world, 4 * (lm + vis) / world, 4 * (root + layer))
    verdict = lambda gib: "fits" if gib < 72 else "tight" if gib < 78 else "OOM"
    rows = []
    for (layout, response_tokens), frames in itertools.product((("one sequence", 1024), ("packed group", 8 * 256)),
                                                               (256, 1024, 3600)):
        S = frames * tokens_per_frame + response_tokens
        for sp_size in (1, 2, 4, 8):
            est = [peak(s7, S, sp_size, *setup, frames * tokens_per_frame, v) for v, setup in ((False, frozen),
                                                                                               (True, trained))]
            rows.append({"layout": layout, "frames": frames, "tokens": S, "sp": sp_size,
                         "state+grads_frozen_GiB": sum(frozen[:2]) / GiB,
                         "state+grads_trained_GiB": sum(trained[:2]) / GiB,
                         "vision_frozen_GiB": est[0], "vision_trained_GiB": est[1],
                         "80GB (frozen / trained)": f"SP invalid: {s7['heads']} heads % {sp_size}"
                         if s7["heads"] % sp_size else f"{verdict(est[0])} / {verdict(est[1])}"})
    print_table(rows, list(rows[0]))
    log({"bench": "memory_plan", "model": "Qwen2.5-VL-7B", "gpus": world, "params": lm + vis, "check_3b": check,
         "rows": rows}, cfg)


def call_ms(fn, grad: bool, reps: int = 10) -> float:
    """Milliseconds a call of fn() (with grad: and a backward of its output's sum), after 3 untimed calls."""
    with torch.set_grad_enabled(grad):
        for k in range(3 + reps):
            if k == 3:
                sync()
                t = time.perf_counter()
            out = fn()
            if grad:
                out.float().sum().backward()
        sync()
    return (time.perf_counter() - t) / reps * 1e3


def bench_patch(cfg: BenchConfig):
    """The Qwen vision tower's patch embedding (3B shape: 3 x 2 x 14 x 14 pixels -> 1,280) over N patches, bf16 on
    the GPU: transformers' Conv3d against vlm.PatchProjection (the same weights as one GEMM), forward alone and
    forward + backward (the update runs the forward, its recompute and the backward), milliseconds a call."""
    dev, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    v = SHAPES[cfg.shape]["v_hidden"]
    conv = torch.nn.Conv3d(3, v, (2, 14, 14), stride=(2, 14, 14), bias=False).to(dev, dtype)
    linear = vlm.PatchProjection(conv)

    rows = []
    for n in cfg.patches or ([512] if cfg.tiny else [32768, 131072]):
        x = torch.randn(n, 3, 2, 14, 14, device=dev, dtype=dtype, requires_grad=True)
        for name, module in (("Conv3d", conv), ("PatchProjection (GEMM)", linear)):
            rows.append({"patches": n, "kernel": name, "forward_ms": call_ms(lambda: module(x), False),
                         "forward_backward_ms": call_ms(lambda: module(x), True)})
            print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    log({"bench": "patch_embed", **device_info(), "cudnn": torch.backends.cudnn.version(), "rows": rows}, cfg)


def bench_mlp(cfg: BenchConfig):
    """The Qwen vision tower's gated MLP (gate and up 1,280 -> w, SiLU(gate) x up, down w -> 1,280) over N patches,
    bf16 on the GPU, at its real width w = 3,420 and at widths padded to multiples of 16 and 128: 3,420 x 2 bytes
    is not a multiple of 16 bytes, the alignment tensor-core GEMM kernels want (nanoGPT pads its vocabulary for the
    same reason). Zero rows in gate / up and zero columns in down would give the same output and gradients, so if
    a padded width is much faster the tower could compute padded. Milliseconds a call and TFLOP/s (6 N w x 3)."""
    dev, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    v = SHAPES[cfg.shape]["v_hidden"]
    rows = []
    for n in cfg.patches or ([512] if cfg.tiny else [32768]):
        x = torch.randn(n, v, device=dev, dtype=dtype, requires_grad=True)
        for w in cfg.widths or ([SHAPES["tiny"]["v_ffn"], 136] if cfg.tiny else [3420, 3424, 3456]):
            gate, up, down = (torch.nn.Linear(a, c, bias=True, device=dev, dtype=dtype) for a, c in ((v, w), (v, w),
                                                                                                 (w, v)))

            def mlp():
                return down(torch.nn.functional.silu(gate(x)) * up(x))

            forward, both = call_ms(mlp, False), call_ms(mlp, True)
            flops = 2 * n * v * w * 3
            rows.append({"patches": n, "width": w, "forward_ms": forward, "forward_backward_ms": both,
                         "forward_TFLOPs": flops / forward / 1e9, "forward_backward_TFLOPs": 3 * flops / both / 1e9})
            print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    log({"bench": "vision_mlp", **device_info(), "rows": rows}, cfg)


def bench_cache(cfg: BenchConfig):
    """GRPO steps of train_grpo.py with the vision tower frozen: videos decoded + encoded live vs read from the
    cache that cache_embeddings.py builds first (timed once). Median seconds per step over steps 2.., per phase."""
    root = os.path.join(tempfile.gettempdir(), "bench_cache")  # model, videos, cache, runs (never under $OUT)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    frames, side = (cfg.frames or [8 if cfg.tiny else 64])[0], 56 if cfg.tiny else 224
    model = os.path.join(root, "model")
    make_model(cfg.shape, model, device=dev, dtype=torch.float32 if cfg.tiny else torch.bfloat16, save=True)
    data = os.path.join(root, "data", "train.jsonl")
    make_dataset(SyntheticConfig(out=os.path.dirname(data), num_train=16, num_eval=4, frames=frames, size=side,
                                 seed=cfg.seed))
    sampling = dict(num_frames=frames, max_pixels=side * side, min_pixels=side * side)
    cache_dir = os.path.join(root, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "cache_embeddings.py"), f"--model={model}", f"--data={data}",
                    f"--out={cache_dir}", f"--device={dev}", "--progress=False",
                    *[f"--{k}={v}" for k, v in sampling.items()]], check=True, cwd=here, preexec_fn=die_with_parent)
    build_s = time.time() - t0
    base = dict(model=model, data=data, **sampling, rollout_batch_size=2, n=cfg.n, micro_batch_size=4,
                max_new_tokens=8 if cfg.tiny else cfg.new_tokens, think=False, freeze_vision=True,
                max_steps=cfg.steps or (3 if cfg.tiny else 5), save_every=0, eval_every=0, progress=False,
                device=dev, engine="hf", seed=cfg.seed)
    rows = [{"run": name, **phase_medians(run_grpo({**base, "embeddings_cache": cache}, os.path.join(root, name)))}
            for name, cache in (("live", ""), ("cached", cache_dir))]
    print_table(rows, list(rows[0]))
    speedup = rows[0]["step_s"] / max(rows[1]["step_s"], 1e-9)
    print(f"cache built in {build_s:.1f} s; speed-up {speedup:.2f}x per step", flush=True)
    log({"bench": "cache", **device_info(), "shape": cfg.shape, "frames": frames, "cache_build_s": build_s,
         "speedup": speedup, "rows": rows}, cfg)


def bench_trl(cfg: BenchConfig):
    """GRPO side by side: train_grpo.py vs TRL's GRPOTrainer (TRL is a benchmark-only dependency: pip install trl).
    Same tiny Qwen2.5-VL weights (data/tiny.py, then one format warm-up by train_grpo.py, merged by merge.py and
    loaded by both), same synthetic flash-colour data, same reward (data/rewards.compute_rewards, answer-only
    format), group size n, prompts per step, max_new_tokens, steps, temperature 1, top_p 1, beta 0, clip 0.2,
    token-mean loss (TRL's "dapo" = sum over tokens / tokens in the batch), one optimizer update per rollout batch
    on the whole batch (no micro-batching, no gradient accumulation, no activation checkpointing), the same AdamW
    (handed to TRL: lr, betas, weight decay on every tensor), constant lr, grad clip 1, the same suppressed tokens
    when sampling; TRL samples with transformers' generate() (use_vllm=False).
    What differs, because TRL 1.16's GRPOTrainer cannot feed videos (it collects only "image" parts of the
    messages, and its training forward takes no pixel_values_videos): TRL gets each video as ONE IMAGE, every
    second frame (the first of each temporal-patch pair) side by side in a 28 x (28 * frames / 2) strip. That is
    the same number of vision patches (frames / 2 x 4) and visual tokens (frames / 2) and the same prompt length,
    so the same compute, and the flash is still visible (4 frames cover 2 even ones); but rope positions are
    spatial (image) instead of temporal (video), and the tokens are <|image_pad|>. Smaller differences: TRL's
    advantage eps is 1e-4 (ours 1e-6); ours adds a dual clip (inactive: with one on-policy update the ratio is 1);
    TRL's log-probs are over the full vocabulary, ours over the allowed one (the suppressed tokens have ~0
    probability after the warm-up); ours decodes the mp4 files every step (inside its rollout time), TRL reads
    pre-decoded images; prompt order differs (each trainer's own shuffling).
    Time per step: ours = the sum of metrics.jsonl's time_* (video decode + rollout, reward, log-probs, update);
    TRL = wall time from on_step_begin to on_step_end of a TrainerCallback (generation, reward, loss, backward,
    optimizer step). Median over steps 2.. (step 1 warms up). On a GPU both compute in bf16 with fp32 weights
    (ours: FSDP2 mixed precision; TRL: autocast)."""
    try:  # late: trl is a benchmark-only dependency
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("bench.py trl compares against TRL's GRPOTrainer, a benchmark-only dependency that is not "
                         "installed: pip install trl")
    from datasets import Dataset  # late: HF datasets comes with trl (bench-only)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # default: the CPU demo's shape (config/tiny_cpu.py: 64 frames, 16 prompts x 8, 8 new tokens, lr 1e-3) for
    # 100 steps, so everything takes about 4 minutes on 2 idle cores; --tiny: a smoke test
    frames, prompts, n, steps, sft_steps, sft_batch, num_train = (16, 4, 4, 4, 10, 8, 16) if cfg.tiny else \
        (64, 16, 8, 100, 100, 16, 512)
    steps = cfg.steps or steps
    root = os.path.join(tempfile.gettempdir(), "bench_trl")  # model, videos, both runs (never under $OUT)
    shutil.rmtree(root, ignore_errors=True)
    make_dataset(SyntheticConfig(out=os.path.join(root, "data"), num_train=num_train, num_eval=4, frames=frames,
                                 seed=cfg.seed))
    make_tiny_model(os.path.join(root, "init"), seed=cfg.seed)
    sampling = FrameSampling(num_frames=frames, max_pixels=28 * 28, min_pixels=28 * 28)
    ours_cfg = dict(data=os.path.join(root, "data", "train.jsonl"), **vars(sampling), think=False,
                    rollout_batch_size=prompts, n=n, max_new_tokens=8, temperature=1.0, top_p=1.0, lr=1e-3,
                    beta2=0.99, weight_decay=1e-2, grad_clip=1.0, max_steps=steps, kl_beta=0.0,
                    micro_batch_size=prompts * n, gradient_checkpointing=False, sft_lr=1e-3, sft_batch_size=sft_batch,
                    save_every=0, eval_every=0, progress=False, device=dev, engine="hf", seed=cfg.seed)

    # one format warm-up (random letters, so accuracy starts at chance), merged into a Hugging Face folder that
    # both trainers start from (from random weights neither would ever emit "<answer> X </answer>"): train_grpo.py
    # with sft_steps and one GRPO step at lr 0 (AdamW then changes nothing), then merge.py
    t = time.perf_counter()
    run_grpo({**ours_cfg, "model": os.path.join(root, "init"), "sft_steps": sft_steps, "max_steps": 1, "lr": 0.0,
              "save_every": 1}, os.path.join(root, "warm_run"))
    warm = os.path.join(root, "warm")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge.py"),
                    f"--checkpoint={os.path.join(root, 'warm_run')}", f"--out={warm}"], check=True,
                   preexec_fn=die_with_parent)
    model, processor = vlm.load_model(warm, "float32", "sdpa", dev)
    train = load_jsonl(ours_cfg["data"])
    suppress = vlm.suppress_ids(model, processor)
    ours_prompt = vlm.build_prompt(model, processor, format_question(train[0]),
                                   vlm.load_video(train[0].video, sampling, "qwen2_5_vl"), think=False)
    del model
    print(f"format warm-up: {sft_steps} steps of {sft_batch} prompts, merged, in {time.perf_counter() - t:.1f} s",
          flush=True)

    # ours: train_grpo.py as the demo runs it, minus evaluation and warm-up (done above); its wall time includes
    # starting the interpreter and importing torch (a few seconds), TRL's does not
    t = time.perf_counter()
    ours = run_grpo({**ours_cfg, "model": warm, "sft_steps": 0}, os.path.join(root, "ours"))
    ours_wall = time.perf_counter() - t
    ours_s = [sum(v for k, v in m.items() if k.startswith("time_")) for m in ours]

    # TRL: the same videos as image strips, a conversational prompt with the same text
    rows = []
    for s in train:
        strip = np.concatenate(list(vlm.load_video(s.video, sampling, "qwen2_5_vl").frames[::2]), axis=1)
        rows.append({"prompt": [{"role": "user", "content": vlm.PLAIN_PROMPT.format(question=format_question(s))}],
                     "image": Image.fromarray(strip), "answer": s.answer, "problem_type": s.problem_type,
                     "options": s.options})
    processor = AutoProcessor.from_pretrained(warm, padding_side="left")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": rows[0]["prompt"][0]["content"]}]}], add_generation_prompt=True,
                                         tokenize=False)
    trl_ids = processor(text=[text], images=[rows[0]["image"]], return_tensors="pt")["input_ids"][0]
    trl_log = []  # per step: reward, format, accuracy (the reward function runs once per step)

    def reward_fn(prompts, completions, answer, problem_type, options, **kwargs):
        scores = compute_rewards([c[0]["content"] for c in completions],
                                 [dict(answer=a, problem_type=p, options=o)
                                  for a, p, o in zip(answer, problem_type, options)], think=False)
        trl_log.append({k: float(np.mean(scores[k])) for k in ("reward", "format", "accuracy")})
        return scores["reward"].tolist()

    trl_s = []

    class StepTimer(TrainerCallback):  # TRL's own step_time metric leaves out the optimizer step
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            trl_s.append(time.perf_counter() - self.t)

    t = time.perf_counter()  # like ours' wall time: model load + set-up + steps
    model = AutoModelForImageTextToText.from_pretrained(warm, dtype=torch.float32, attn_implementation="sdpa")
    # our optimizer, handed over: Trainer's own AdamW would skip weight decay on biases and norms
    optimizer = torch.optim.AdamW(model.parameters(), lr=ours_cfg["lr"], betas=(0.9, ours_cfg["beta2"]),
                                  weight_decay=ours_cfg["weight_decay"])
    args = GRPOConfig(output_dir=os.path.join(root, "trl"), max_steps=steps, per_device_train_batch_size=prompts * n,
                      gradient_accumulation_steps=1, num_generations=n,
                      max_completion_length=ours_cfg["max_new_tokens"],
                      temperature=1.0, top_p=1.0, learning_rate=ours_cfg["lr"], lr_scheduler_type="constant", beta=0.0,
                      num_iterations=1, loss_type="dapo", epsilon=0.2, scale_rewards="group", max_grad_norm=1.0,
                      use_vllm=False, gradient_checkpointing=False, bf16=dev == "cuda", use_cpu=dev == "cpu",
                      generation_kwargs={"suppress_tokens": suppress}, logging_steps=steps, report_to="none",
                      save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[StepTimer()], optimizers=(optimizer, None))
    trainer.train()
    trl_wall = time.perf_counter() - t

    last = max(1, steps // 5)  # reward over the last fifth of the run
    table = []
    for name, visual, step_s, log_, wall, P, V in [
            ("ours (train_grpo.py)", "video", ours_s, ours, ours_wall, len(ours_prompt.input_ids),
             ours_prompt.num_video_tokens),
            (f"TRL {trl.__version__} GRPOTrainer", "image strip", trl_s, trl_log, trl_wall, len(trl_ids),
             int((trl_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()))]:
        timed = step_s[1:] or step_s
        table.append({"trainer": name, "visual input": visual, "prompt_tokens": P, "visual_tokens": V,
                      "steps": len(step_s), "median_step_s": float(np.median(timed)), "min_step_s": min(timed),
                      "max_step_s": max(timed), "reward_first": log_[0]["reward"],
                      f"reward_last{last}": float(np.mean([m["reward"] for m in log_[-last:]])),
                      f"format_last{last}": float(np.mean([m["format"] for m in log_[-last:]])),
                      f"accuracy_last{last}": float(np.mean([m["accuracy"] for m in log_[-last:]])), "wall_s": wall})
    print_table(table, list(table[0]))
    ratio = table[0]["median_step_s"] / table[1]["median_step_s"]
    phases = {k[5:]: float(np.median([m[k] for m in ours[1:] or ours])) for k in ours[0] if k.startswith("time_")}
    print(f"ours / TRL median step time: {ratio:.2f}; ours phases (median): " +
          ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()), flush=True)
    log({"bench": "trl", **device_info(), "trl": trl.__version__, "frames": frames, "prompts": prompts, "n": n,
         "max_new_tokens": 8, "lr": ours_cfg["lr"], "format_warmup_steps": sft_steps, "ours_over_trl_step_time": ratio,
         "rows": table, "ours_phases_median_s": phases,
         "ours_reward": [round(m["reward"], 4) for m in ours], "trl_reward": [round(m["reward"], 4) for m in trl_log]},
        cfg)


def grpo_setup(cfg: BenchConfig):
    """Write a random model of the chosen shape (+ processor) and a 64-frame synthetic task to --out, for the
    single-GPU vLLM run of config/qwen2_5_vl_3b_vllm_1gpu.py."""
    out = cfg.out or "/tmp/grpo3b"
    make_model(cfg.shape, os.path.join(out, "model"), device="cuda" if torch.cuda.is_available() else "cpu",
               save=True)
    make_dataset(SyntheticConfig(out=os.path.join(out, "synthetic"), num_train=64, num_eval=16,
                                 frames=8 if cfg.tiny else 64, size=56 if cfg.tiny else 224, seed=cfg.seed))
    print(f"wrote {out}/model and {out}/synthetic; now: torchrun --nproc_per_node=1 train_grpo.py "
          f"config/qwen2_5_vl_3b_vllm_1gpu.py --model={out}/model --data={out}/synthetic/train.jsonl "
          f"--out_dir={out}/run")


# ----------------------------------------------------------------------------------------------------------
# video: data/video.py's seek-based sample_frames on a long synthetic video vs decoding every frame, torchcodec and
# decord, each measurement in a fresh interpreter that imports data/video.py (not this file: torch would be in
# every peak RSS)

@dataclass
class VideoBenchConfig:
    minutes: float = 60.0  # length of the synthetic video
    frames: list = field(default_factory=lambda: [64, 512, 2048])  # num_frames values to measure
    size: int = 64  # the synthetic video is size x size pixels
    video_fps: int = 25  # frame rate of the synthetic video
    gop: int = 250  # keyframe interval of the synthetic video, in frames
    cache_dir: str = ""  # where the synthetic video is kept between runs ('' = <tmp>/longrl_video_bench)
    repeats: int = 3  # runs per measurement; the table shows the fastest (the least disturbed by other load)
    naive_minutes: float = 0.0  # decode-everything only over the first this many minutes and extrapolate (0 = all)
    others: list = field(default_factory=lambda: ["torchcodec", "torchcodec_approx", "decord"])  # [] = PyAV only


# _video_naive and _video_other run only in the worker, which gets their source (inspect.getsource): so they
# import what they use themselves, and nothing of this file.
def _video_naive(path, num_frames, limit=0):
    """The baseline: decode every frame in order (only the first `limit` if > 0), convert the wanted ones. Same
    indices and resize as sample_frames, so the two must return identical arrays."""
    import av
    import numpy as np
    from av.video.reformatter import VideoReformatter
    from data.video import fit_size, probe, target_indices
    info = probe(path)
    want = set(target_indices(path, info.num_frames, info.fps, None, num_frames, 0).tolist())
    h, w = fit_size(info.height, info.width)
    out = np.empty((len(want), h, w, 3), np.uint8)
    resize = VideoReformatter()  # the same conversion as sample_frames, so only the decoding differs
    j = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if limit and i >= limit:
                break
            if i in want:
                out[j] = resize.reformat(frame, width=w, height=h, format="rgb24", threads=1).to_ndarray()
                j += 1
    return out[:j]


def _video_other(lib, path, num_frames):
    """The same indices and output (uint8 [T, H, W, 3] at fit_size) through torchcodec or decord, each resizing
    inside its own decoder with FFmpeg's automatic thread count, like sample_frames. Neither library is a
    dependency."""
    from data.video import fit_size, probe, target_indices
    info = probe(path)
    idx = target_indices(path, info.num_frames, info.fps, None, num_frames, 0).tolist()
    h, w = fit_size(info.height, info.width)
    if lib.startswith("torchcodec"):
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize  # bilinear, antialiased
        dec = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=0, transforms=[Resize((h, w))],
                           seek_mode="approximate" if lib.endswith("approx") else "exact")
        return dec.get_frames_at(idx).data.numpy()
    import decord
    return decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=0).get_batch(idx).asnumpy()


# Run in a fresh interpreter per measurement (after the source of the two functions above) so the peak RSS is this
# one's alone. The peak is VmHWM, this process's own high-water mark: ru_maxrss would also count the parent's RSS,
# which Linux carries over the exec of a vforked child (600 MB under `python bench.py video`, which has torch
# loaded). n = 0 only imports: the memory floor of that row's libraries. Imports are not timed.
_VIDEO_WORKER = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from data.video import sample_frames
mode, path, n, limit, save = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
if mode.startswith("torchcodec"):
    from torchcodec.decoders import VideoDecoder
elif mode == "decord":
    import decord
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system, all threads
def peak_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:  # not Linux: ru_maxrss (KB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
t0, c0 = time.perf_counter(), cpu()
frames = np.zeros((0, 1, 1, 3), np.uint8)
if n and mode == "seek":
    frames = sample_frames(path, num_frames=n).frames
elif n and mode == "naive":
    frames = _video_naive(path, n, limit)
elif n:
    frames = _video_other(mode, path, n)
dt, dc, peak = time.perf_counter() - t0, cpu() - c0, peak_mb()
if save != "-":
    np.save(save, frames)
print(json.dumps({"seconds": dt, "cpu_s": dc, "max_rss_mb": peak, "frames": len(frames)}))
"""


def _video_file(cfg: VideoBenchConfig):
    """The long synthetic video, generated once: a noise texture sliding sideways (so the encoder has real work,
    and a frame off by one differs from the right one everywhere)."""
    folder = cfg.cache_dir or os.path.join(tempfile.gettempdir(), "longrl_video_bench")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"bench_{cfg.minutes:g}min_{cfg.size}px_{cfg.video_fps}fps_gop{cfg.gop}.mp4")
    if not os.path.exists(path):
        n = int(cfg.minutes * 60 * cfg.video_fps)
        texture = np.random.default_rng(0).integers(0, 256, (cfg.size, cfg.size * 4, 3), dtype=np.uint8)
        frames = (np.roll(texture, -i, axis=1)[:, :cfg.size] for i in range(n))
        print(f"writing {n} frames to {path} (once) ...", flush=True)
        write_video(path + ".part.mp4", frames, cfg.video_fps, gop=cfg.gop, threads=0)  # speed over repeatable bytes
        os.replace(path + ".part.mp4", path)
    return folder, path


def _video_lib_env(lib, folder, path):
    """(environment for its children, "name version", how it loads) if `lib` decodes `path` in a child process,
    else (None, name, why not). torchcodec's wheel carries no FFmpeg: it loads the system's libavutil.so.N and
    friends on first use. Where there are none, PyAV's wheel carries an FFmpeg under renamed files; symlinks with
    the plain names on the child's LD_LIBRARY_PATH let torchcodec load those if their major versions are ones it
    was built for (bench only: nothing is installed or changed outside the cache folder)."""
    module = lib.split("_")[0]
    dist = next((d for d in [module, "eva-" + module] if _dist_version(d)), None)
    if dist is None:
        return None, lib, "not installed"
    name = f"{dist} {_dist_version(dist)}"
    check = (f"from torchcodec.decoders import VideoDecoder; VideoDecoder({path!r}, seek_mode='approximate')"
             if module == "torchcodec" else f"import decord; decord.VideoReader({path!r})")
    run = lambda env: subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    r = run(None)
    if r.returncode == 0:
        return dict(os.environ), name, "loads as installed"
    why = f"installed but fails: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}"
    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    if module != "torchcodec" or not os.path.isdir(libs):
        return None, name, why
    shim = os.path.join(folder, f"pyav{av.__version__}_ffmpeg")
    os.makedirs(shim, exist_ok=True)
    for f in os.listdir(libs):
        m = re.match(r"(lib(?:av|sw)\w+)-[0-9a-f]+\.so\.(\d+)", f)
        if m and not os.path.lexists(os.path.join(shim, f"{m[1]}.so.{m[2]}")):
            os.symlink(os.path.join(libs, f), os.path.join(shim, f"{m[1]}.so.{m[2]}"))
    paths = [shim, libs] + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else [])
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}
    if run(env).returncode == 0:
        return env, name, (f"no FFmpeg libraries on this system; runs on the FFmpeg bundled in PyAV's wheel "
                           f"(libavutil {'.'.join(map(str, av.library_versions['libavutil']))}) through {shim}")
    return None, name, why + " (PyAV's bundled FFmpeg did not help either)"


def _dist_version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def bench_video(cfg: VideoBenchConfig):
    root = os.path.dirname(os.path.abspath(__file__))  # the repo root, where the worker imports data/video.py from
    worker = "\n\n".join([inspect.getsource(_video_naive), inspect.getsource(_video_other), _VIDEO_WORKER])
    t = time.perf_counter()
    folder, path = _video_file(cfg)
    info = probe(path)
    limit = round(cfg.naive_minutes * 60 * info.fps) if 0 < cfg.naive_minutes < info.duration / 60 else 0
    scale = info.num_frames / limit if limit else 1.0  # decode-everything time x this = the whole video's
    h, w = fit_size(info.height, info.width)
    print(f"{path}: {info.num_frames} frames, {info.duration / 60:.1f} min, {info.width}x{info.height}, "
          f"{info.fps:g} fps, gop {cfg.gop}; every method returns uint8 [T, {h}, {w}, 3]")
    envs = {"seek": (dict(os.environ), "ours", ""), "naive": (dict(os.environ), f"PyAV {av.__version__}", "")}
    envs.update({lib: _video_lib_env(lib, folder, path) for lib in cfg.others})
    for lib in cfg.others:
        print(f"{lib}: {envs[lib][1]}: {envs[lib][2]}")

    def measure(mode, n, save="-"):
        r = subprocess.run([sys.executable, "-c", worker, root, mode, path, str(n),
                            str(limit if mode == "naive" else 0), save], env=envs[mode][0], capture_output=True,
                           text=True)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    label = {"seek": "ours: seek-based sample_frames",
             "naive": "decode every frame (PyAV)" + f", first {cfg.naive_minutes:g} min, extrapolated" * bool(limit)}
    for lib in cfg.others:  # "name version" (or the name asked for, when not installed) and the seek mode
        label[lib] = envs[lib][1] + {"torchcodec": ", seek_mode=exact",
                                     "torchcodec_approx": ", seek_mode=approximate"}.get(lib, "")
    floors = {mode: measure(mode, 0, "-").get("max_rss_mb") for mode in envs if envs[mode][0] is not None}
    with av.open(path) as container:  # how far apart two adjacent frames are (what a frame off by one would score)
        pair = [VideoReformatter().reformat(f, width=w, height=h, format="rgb24").to_ndarray().astype(np.int16)
                for _, f in zip(range(2), container.decode(video=0))]
    adjacent = float(np.abs(pair[0] - pair[1]).mean())
    rows, load = [], [os.getloadavg()[0]]
    for n in cfg.frames:
        got, block, runs = {}, [], {mode: [] for mode in envs if envs[mode][0] is not None}
        for k in range(cfg.repeats):  # round robin, so that a slow spell of this machine hits every method alike
            for mode in runs:
                save = os.path.join(folder, f"frames_{mode}.npy") if k == 0 else "-"
                runs[mode].append(measure(mode, n, save))
                if save != "-" and "error" not in runs[mode][-1]:
                    got[mode] = np.load(save)
                    os.remove(save)
        for mode in envs:
            row = {"num_frames": n, "method": mode, "library": envs[mode][1]}
            block.append(row)
            if envs[mode][0] is None or "error" in runs[mode][0]:
                row["error"] = envs[mode][2] if envs[mode][0] is None else runs[mode][0]["error"]
                continue
            m = {**min(runs[mode], key=lambda run: run.get("seconds", 1e9)),  # the fastest run; peak: the worst
                 "max_rss_mb": max(run.get("max_rss_mb", 0) for run in runs[mode])}
            x = scale if mode == "naive" else 1.0
            row.update(frames=m["frames"], wall_s=m["seconds"] * x, cpu_s=m["cpu_s"] * x,
                       frames_per_s=n / (m["seconds"] * x), peak_rss_mb=m["max_rss_mb"],
                       over_floor_mb=m["max_rss_mb"] - floors[mode], extrapolated=x != 1.0)
            ours = got.get("seek")
            if ours is not None and mode != "seek":  # same frames? identical, or how far each frame is from ours
                a, b = ours[:len(got[mode])].astype(np.int16), got[mode].astype(np.int16)
                row["identical"] = a.shape == b.shape and bool((a == b).all())
                if a.shape == b.shape:
                    row["max_frame_mad"] = float(np.abs(a - b).mean(axis=(1, 2, 3)).max())
        naive = block[1].get("wall_s")
        for row in block:
            if naive and "wall_s" in row:
                row["vs_decode_all"] = naive / row["wall_s"]
        rows += block
    load.append(os.getloadavg()[0])
    print(f"wall/cpu: best of {cfg.repeats} fresh processes, methods taken in turn (cpu = user+system, all threads; "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after); peak RSS: the worst of them; floor = RSS after "
          f"imports only: " + ", ".join(f"{k} {v:.0f} MB" for k, v in floors.items()))
    print(f"{'frames':>6}  {'method':<58} {'wall s':>7} {'cpu s':>7} {'frames/s':>8} {'x':>5} {'peak MB':>7} "
          f"{'+floor':>6}  same frames as ours?")
    for r in rows:
        if "wall_s" not in r:
            print(f"{r['num_frames']:>6}  {label[r['method']]:<58} {r['error']}")
            continue
        same = ("identical" if r.get("identical") else f"max frame MAD {r['max_frame_mad']:.1f}/255"
                if "max_frame_mad" in r else "-") + f" ({r['frames']} frames in the prefix)" * r["extrapolated"]
        print(f"{r['num_frames']:>6}  {label[r['method']]:<58} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} "
              f"{r['frames_per_s']:>8.0f} {r.get('vs_decode_all', float('nan')):>4.1f}x {r['peak_rss_mb']:>7.0f} "
              f"{r['over_floor_mb']:>6.0f}  {same if r['method'] != 'seek' else '(reference)'}")
    print("every row: open + probe + decode + resize to the same size, frames returned as numpy, in its own process; "
          "x = decode-everything time / this row's; MAD = mean |difference| of a frame vs ours (resizers differ: "
          "PyAV swscale bilinear, torchcodec bilinear antialiased, decord its own), against a frame off by one: "
          f"{adjacent:.0f}; whole run {time.perf_counter() - t:.0f} s")
    print("BENCH " + json.dumps({"bench": "video", "video": {"minutes": cfg.minutes, "frames": info.num_frames,
                                 "size": cfg.size, "fps": cfg.video_fps, "gop": cfg.gop}, "out_hw": [h, w],
                                 "naive_prefix_frames": limit, "floor_rss_mb": floors, "adjacent_frame_mad": adjacent,
                                 "cpus": os.cpu_count(), "load_avg": load,
                                 "libraries": {k: v[1:] for k, v in envs.items()}, "rows": rows}, default=float))


if __name__ == "__main__":
    benches = {"video": bench_video, "rollout": bench_rollout, "train": bench_train, "longest": bench_longest,
               "sp": bench_sp, "memory": bench_memory, "cache": bench_cache, "grpo_setup": grpo_setup,
               "trl": bench_trl, "patch": bench_patch, "mlp": bench_mlp}
    which = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in benches else None
    if which is None and "--help" not in sys.argv and "-h" not in sys.argv:
        raise SystemExit(f"usage: python bench.py {{{'|'.join(benches)}}} [--key=value ...]  (--help for fields)")
    if which == "video":  # its own fields (the synthetic video, the libraries), none of BenchConfig's
        bench_video(parse_config(VideoBenchConfig, sys.argv[2:]))
        raise SystemExit(0)
    cfg = parse_config(BenchConfig, sys.argv[2:] if which else sys.argv[1:])
    if cfg.tiny:
        cfg.shape = "tiny"
    if which == "grpo_setup":
        grpo_setup(cfg)
        raise SystemExit(0)
    torch.manual_seed(cfg.seed)
    benches[which](cfg)
