"""
The policy as a trainer holds it, shared by train_grpo.py and train_sft.py (nothing imports a training script):
the config fields both read (`PolicyConfig`), the policy built (loaded, frozen parts, activation checkpointing,
FSDP2, the frozen reference, the optimizer) and run over responses: `Seq` (one response and what the update needs
for it), `sequences_logprobs` (response log-probs of a batch, with or without sequence parallelism), the
micro-batches every rank steps through together, and supervised steps on target responses (`sft_step`: the SFT
stage, and the format warm-up before GRPO as its special case with random letters).
"""
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import rollout
import sp as sp_lib
import vlm
from common import Dist, Root, all_reduce, barrier, init_distributed, print0, refuse_old_run, wrap_fsdp
from data.synthetic import run_inputs
from data.video import FrameSampling
from sp import dp_all_reduce


# ----------------------------------------------------------------------------------------------------------
# the fields every training script shares (train_grpo.Config and train_sft.Config inherit them)

@dataclass
class PolicyConfig(FrameSampling):  # fps, num_frames, max_frames, max_pixels, min_pixels: data/video.py
    # the model and how it is held
    model: str = ""                     # checkpoint folder / hub id; empty with synthetic=True: a tiny model
    dtype: str = "auto"                 # parameters' dtype: auto = float32 (FSDP2 mixed precision computes bf16)
    bf16: bool = True                   # on GPU: bf16 compute with fp32 master weights and fp32 grad reduction
    attn_implementation: str = "sdpa"   # sdpa | flash_attention_2 (when installed) | eager
    vision_attention: str = "batched"   # Qwen vision towers: batched (a layer's windows in one call) | loop
    patch_embed: str = "linear"         # Qwen vision towers' Conv3d patch embedding: linear (one GEMM) | conv
    vision_mlp: str = "plain"           # Qwen vision towers' MLP (width 3,420): plain | padded (computed at 3,456)
    gradient_checkpointing: bool = True  # recompute decoder layers in backward (activation memory ~ 1 layer)
    checkpoint_mode: str = "full"       # full | attention (keep attention: faster) | offload (inputs to host memory)
    attention_layers: int = 0           # checkpoint_mode=attention: only the first this-many layers keep it (0: all)
    mlp_chunk: int = 0                  # > 0: MLPs over the sequence in chunks of this many tokens (longest sequences)
    compile_blocks: str = ""            # on GPU: block parts fused by torch.compile, e.g. norms,mlp,vision_attention
    freeze_vision: bool = False         # train the language model only
    sp_size: int = 1                    # Ulysses sequence-parallel group size (divides the world size)
    # prompts and log-probs
    think: bool = True                  # Long-RL's think/answer prompt; format reward needs <think> too
    embeddings_cache: str = ""          # cache_embeddings.py output (needs freeze_vision): no decoding, no tower
    temperature: float = 1.0            # log-probs are of log_softmax(logits / T): the sampling temperature (SFT: 1)
    micro_batch_size: int = 8           # sequences per forward/backward (group_packing: whole groups)
    group_packing: bool = True          # [prompt | response_1 | ...] a row: each prompt once in the decoder
                                        # (False: one prompt + response row per response, the older path)
    logprob_chunk: int = 1024           # response tokens per lm_head chunk
    # optimizer
    lr: float = 1e-6                    # AdamW learning rate (Long-RL: 1e-6)
    weight_decay: float = 1e-2          # AdamW weight decay
    beta2: float = 0.999                # AdamW beta2
    grad_clip: float = 1.0              # max global gradient norm
    # system
    device: str = "auto"                # auto | cpu | cuda
    seed: int = 0                       # data order, sampling, initialisation


# ----------------------------------------------------------------------------------------------------------
# sampled responses through the policy: vision tower once per video, decoder, log-probs at response tokens only

@dataclass
class Seq:
    """One sampled response and everything the update needs for it."""
    prompt: object                  # vlm.Prompt
    response_ids: list
    advantages: torch.Tensor        # [R] per token (GRPO: the sequence's advantage repeated)
    reward: float = 0.0
    engine_logprobs: list = None    # what the rollout engine reported
    logp_old: torch.Tensor = None   # [R] from the rollout policy (computed once, before the first update)
    logp_ref: torch.Tensor = None   # [R] from the frozen reference


def sequences_logprobs(policy, seqs: list, cfg, suppress_ids, with_entropy=False, spi=None):
    """Response log-probs (and entropies) of `seqs` through the FSDP root `policy`, each video encoded once per
    distinct prompt (the n responses of a group share it; with group_packing the decoder sees it once too).
    Returns (logp, entropy, split): logp is flat over the response tokens in sequence order, or with SP (sp.py)
    over the ones this rank holds; split.align / .gather move other per-token values between the two
    (identities without SP)."""
    prompts, index, where = [], {}, []
    for s in seqs:
        if id(s.prompt) not in index:
            index[id(s.prompt)] = len(prompts)
            prompts.append(s.prompt)
        where.append(index[id(s.prompt)])
    if cfg.group_packing:  # one row per prompt (vlm.PackedGroups), else one prompt+response row per sequence
        groups, packed = vlm.pack_groups([s.response_ids for s in seqs], where,
                                         [(p.input_ids, p.positions) for p in prompts], pad_id=0), None
    else:
        groups, packed = None, vlm.pack([(s.prompt.input_ids, s.prompt.positions, s.response_ids) for s in seqs], 0)
    vision_grad = torch.is_grad_enabled() and not cfg.freeze_vision
    if spi is not None and spi.sp_size > 1 and groups is not None:
        return policy(sp_lib.sp_group_logprobs, prompts, groups, spi, suppress_ids, cfg.temperature,
                      cfg.logprob_chunk, with_entropy, vision_grad)
    if spi is not None and spi.sp_size > 1:
        return policy(sp_lib.sp_response_logprobs, prompts, where, packed, spi, suppress_ids, cfg.temperature,
                      cfg.logprob_chunk, with_entropy, vision_grad)

    def run(model):
        with torch.set_grad_enabled(vision_grad):
            feats = vlm.encode_videos(model, prompts)
        if groups is not None:  # one row per prompt: the decoder sees each prompt once (vlm.PackedGroups)
            return vlm.group_logprobs(model, groups, feats, suppress_ids, cfg.temperature, cfg.logprob_chunk,
                                      with_entropy)
        return vlm.response_logprobs(model, packed, vlm.select_videos(feats, where), suppress_ids, cfg.temperature,
                                     cfg.logprob_chunk, with_entropy)
    logp, ent = policy(run)
    return logp, ent, sp_lib.TokenSplit()


def micro_batches(seqs: list, size: int, group=None):
    """Split into micro-batches; every rank gets the same number (FSDP runs collectives in each forward), the
    extra ones re-use a sequence with zero loss weight (`None` marks them)."""
    chunks = [seqs[i:i + size] for i in range(0, len(seqs), size)]
    count = all_reduce(torch.tensor([len(chunks)]), group, dist.ReduceOp.MAX if dist.is_initialized() else None)
    return chunks + [None] * (int(count) - len(chunks))


def micro_size(cfg) -> int:
    """Sequences per micro-batch: micro_batch_size, with group packing rounded up to whole groups of n (the
    sequences come group by group), so that a group's prompt goes through the decoder once."""
    if not cfg.group_packing:
        return cfg.micro_batch_size
    return -(-cfg.micro_batch_size // cfg.n) * cfg.n


@torch.no_grad()
def fill_logprobs(policy, seqs, cfg, suppress_ids, attr: str, fallback, spi=None):
    """Store no-grad log-probs of `policy` on each Seq (attr = logp_old | logp_ref)."""
    for chunk in micro_batches(seqs, micro_size(cfg)):
        lp, _, split = sequences_logprobs(policy, chunk or [fallback], cfg, suppress_ids, spi=spi)
        lp = split.gather(lp)
        if chunk is None:
            continue
        for s, v in zip(chunk, lp.cpu().split([len(s.response_ids) for s in chunk])):
            setattr(s, attr, v.float())


# ----------------------------------------------------------------------------------------------------------
# building the policy: the model loaded and wrapped, the frozen reference, the optimizer

def start_run(cfg, check_config):
    """The opening both training scripts share: the script's start-up checks, torchrun set-up, seeds, out_dir, the
    run's inputs (with synthetic=True the CPU demo's task and tiny random model, made once by rank 0), the SP
    groups (world = dp x sp; the SP peers of a group share their prompts), then the checks that need the
    data-parallel size. Without --resume, an out_dir that holds another run is refused. Returns (Dist, SP info,
    train jsonl, eval jsonl, model path)."""
    check_config(cfg)
    if not cfg.resume:  # before anything is written: another run's log and checkpoints stay as they are
        refuse_old_run(cfg.out_dir)
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    data_file, eval_file, model_path = run_inputs(cfg, make=d.is_main)
    barrier()
    spi = sp_lib.init_sp(cfg.sp_size)
    check_config(cfg, spi.dp_size)
    return d, spi, data_file, eval_file, model_path


def build_policy(cfg: PolicyConfig, model_path: str, d: Dist, spi, reference: bool = False):
    """The policy as an FSDP2 root (policy(fn, ...) runs fn(model, ...)), a frozen copy of it as the reference
    (with reference=True; else None), the optimizer, and the attention function of each phase (Ulysses in
    training under SP)."""
    model, processor = vlm.load_model(model_path, "float32" if cfg.dtype == "auto" else cfg.dtype,
                                      cfg.attn_implementation, d.device, cfg.vision_attention, cfg.patch_embed,
                                      cfg.vision_mlp)
    if cfg.freeze_vision:
        for encoder in vlm.media_encoders(model):
            encoder.requires_grad_(False)
    if cfg.gradient_checkpointing:  # what the decoder keeps for backward: vlm.set_checkpointing
        vlm.set_checkpointing(model, cfg.checkpoint_mode, cfg.mlp_chunk, cfg.attention_layers)
    if vlm.block_part_names(cfg.compile_blocks) and d.device.startswith("cuda"):  # (inductor on the CPU: slow)
        vlm.compile_blocks(model, cfg.compile_blocks)                            # fused elementwise kernels
    bf16 = cfg.bf16 and d.device.startswith("cuda")
    attention = {"rollout": cfg.attn_implementation, "train": cfg.attn_implementation}
    if cfg.group_packing and d.device.startswith("cuda"):  # packed groups: FlexAttention over a block mask
        attention["train"] = "group_flex"
    if cfg.sp_size > 1:  # Ulysses for the language model in training; rollout/eval keep plain attention
        text = model.config.get_text_config()
        sp_lib.check_heads(text.num_attention_heads, text.num_key_value_heads, cfg.sp_size)
        attention["train"] = sp_lib.register_ulysses(spi.sp_group)
    # with an embeddings cache only the ranks with a cache miss run the frozen tower: keep it out of FSDP (whole on
    # every rank, no collectives), else a rank without a miss would leave the others waiting in a vision all-gather
    cached = bool(cfg.embeddings_cache)
    policy = wrap_fsdp(Root(model), vlm.fsdp_units(model, vision=not cached), d, bf16,
                       vlm.encoder_params(model) if cached else None)
    ref = None
    if reference:  # a frozen copy of the initial policy (GRPO with kl_beta > 0), else not loaded at all
        ref, _ = vlm.load_model(model_path, "float32", cfg.attn_implementation, d.device, cfg.vision_attention,
                                cfg.patch_embed, cfg.vision_mlp)
        ref.requires_grad_(False)
        ref = wrap_fsdp(Root(ref), vlm.fsdp_units(ref, vision=not cached), d, bf16,
                        vlm.encoder_params(ref) if cached else None).eval()
    # fused on the GPU: one kernel, and no full-size temporaries (foreach's sqrt(v) copy of every parameter is
    # 15 GB for a 3B model, the difference between fitting an 80 GB GPU or not)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=d.device.startswith("cuda"))
    print0(f"attention: {model.config.get_text_config()._attn_implementation}; FSDP2: {d.world_size > 1 or bf16}; "
           f"bf16: {bf16}")
    return model, processor, policy, ref, optimizer, attention


# ----------------------------------------------------------------------------------------------------------
# supervised steps (train_sft.py, and the format warm-up before GRPO): token-mean NLL of target responses

def target_text(sample, target: str, think: bool, rng: random.Random = None) -> str:
    """The response taught for one row (data/datasets.Sample):
        cot            <think> {reasoning} </think> <answer> {answer} </answer>     (CoT rows: the SFT stage)
        answer         <think> </think> <answer> {answer} </answer>   (think=False: no think block)
        random_letter  as `answer` with a random letter A-D: the format alone (the format warm-up)"""
    answer = rng.choice("ABCD") if target == "random_letter" else sample.answer
    if target == "cot":
        return f"<think> {sample.reasoning.strip()} </think> <answer> {answer} </answer>"
    return f"<think> </think> <answer> {answer} </answer>" if think else f"<answer> {answer} </answer>"


def target_seqs(prompts: list, texts: list, tokenizer) -> list:
    """One Seq per prompt whose response is its target text, tokenized as the model would write it, + eos."""
    seqs = []
    for p, text in zip(prompts, texts):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(Seq(prompt=p, response_ids=ids, advantages=torch.zeros(len(ids))))
    return seqs


def clip_and_step(policy, optimizer, grad_clip: float) -> tuple:
    """Clip the global gradient norm, then step, unless the norm is not finite: a NaN / inf anywhere would reach
    every weight through the step, so the step is skipped (with a warning) and the gradients dropped.
    Returns (grad_norm, skipped); the norm is the same on every rank."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    skipped = not math.isfinite(grad_norm)
    if skipped:
        print0(f"warning: non-finite gradient norm ({grad_norm}): optimizer step skipped, gradients dropped")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def placeholder_seq(model, processor, cfg) -> Seq:
    """A target sequence on rollout.placeholder_prompt, for a rank left with no sequences of its own: it runs the
    forward and backward its FSDP2 peers run, at weight 0."""
    prompt = rollout.placeholder_prompt(model, processor, cfg)
    return Seq(prompt=prompt, response_ids=[processor.tokenizer.eos_token_id], advantages=torch.zeros(1))


def padding_seq(seqs: list, fallback):
    """What a padding micro-batch (micro_batches' None) runs: `fallback`, else this rank's first sequence."""
    if fallback is None and not seqs:
        raise ValueError("no sequences on this rank while its peers have some: pass a fallback (placeholder_seq)")
    return fallback if fallback is not None else seqs[0]


def sft_step(policy, optimizer, seqs: list, cfg, d: Dist, suppress_ids, spi=None, micro: int = 0,
             fallback=None) -> dict:
    """One optimizer step of the token-mean negative log-likelihood of the target responses `seqs`:
        loss = -(1/N) sum_i sum_t log pi(y_i,t | prompt_i, y_i,<t),   N = target tokens on all data-parallel ranks
    Rank r backpropagates W * (its part of the sum) / N; FSDP averages gradients over the W = dp * sp ranks, so
    each token counts once, on the (SP) rank that holds it. Returns the loss (over all ranks), N, the gradient
    norm and whether the step was skipped (clip_and_step). fallback: what a rank with fewer (or no) sequences
    runs at weight 0 while its peers work (padding_seq)."""
    n_tokens = dp_all_reduce(torch.tensor([float(sum(len(s.response_ids) for s in seqs))]), spi)[0].item()
    total = 0.0
    for chunk in micro_batches(seqs, micro or cfg.micro_batch_size):
        logp, _, _ = sequences_logprobs(policy, chunk or [padding_seq(seqs, fallback)], cfg, suppress_ids, spi=spi)
        loss = -logp.sum() * d.world_size / max(n_tokens, 1.0) * (0.0 if chunk is None else 1.0)
        loss.backward()
        total += loss.item() / d.world_size
    grad_norm, skipped = clip_and_step(policy, optimizer, cfg.grad_clip)
    return {"loss": all_reduce(torch.tensor([total]))[0].item(), "tokens": n_tokens, "grad_norm": grad_norm,
            "skipped": int(skipped)}


@torch.no_grad()
def sft_nll(policy, seqs: list, cfg, suppress_ids, spi=None, micro: int = 0, fallback=None) -> float:
    """Token-mean negative log-likelihood of the targets `seqs` over all ranks (the held-out loss); fallback as in
    sft_step."""
    total = torch.zeros(2, dtype=torch.float64)
    for chunk in micro_batches(seqs, micro or cfg.micro_batch_size):
        logp, _, _ = sequences_logprobs(policy, chunk or [padding_seq(seqs, fallback)], cfg, suppress_ids, spi=spi)
        if chunk is not None:
            total += torch.tensor([-logp.sum().item(), float(logp.numel())], dtype=torch.float64)
    total = all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def format_warmup(policy, processor, loader, cfg, d: Dist, suppress_ids, spi=None):
    """Teach the answer format only: supervised steps (sft_step) on target_text(..., "random_letter"), a letter
    independent of the video, so that the model starts GRPO at chance accuracy with a parsable format."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, betas=(0.9, cfg.beta2))
    rng = random.Random(cfg.seed + 7 * (spi.dp_rank if spi else d.rank))  # SP peers: the same letters
    policy.train()
    skipped = []  # videos that did not load: skipped (a batch left empty trains at weight 0), counted, named
    for step in range(cfg.sft_steps):
        prompts = rollout.prepare_prompts(policy.model, processor, loader.next_batch(), cfg, cfg.think, skipped,
                                          cfg.embeddings_cache)
        texts = [target_text(p.sample, "random_letter", cfg.think, rng) for p in prompts]
        res = sft_step(policy, optimizer, target_seqs(prompts, texts, processor.tokenizer), cfg, d, suppress_ids,
                       spi, micro=cfg.micro_batch_size * 4,
                       fallback=None if prompts else placeholder_seq(policy.model, processor, cfg))
        if step % 20 == 0 or step == cfg.sft_steps - 1:
            print0(f"format warm-up {step + 1}/{cfg.sft_steps}: nll {res['loss']:.3f}")
    for line in skipped[:3]:
        print(f"[rank {d.rank}] format warm-up skipped sample: {line}")
    count = int(dp_all_reduce(torch.tensor([len(skipped)]), spi)[0])
    if count:
        print0(f"format warm-up: {count} samples skipped (videos that did not load)")
    del optimizer
