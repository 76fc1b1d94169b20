"""
The policy as a trainer holds it: built (loaded, frozen parts, activation checkpointing, FSDP2, the frozen
reference, the optimizer) and run over sampled responses: `Seq` (one response and what the update needs for it),
`sequences_logprobs` (response log-probs of a batch, with or without sequence parallelism), the micro-batches every
rank steps through together, and the format warm-up (supervised steps on fixed target texts).

train_grpo.py reads its `cfg` fields (model, dtype, attention, checkpointing, SP, micro-batch size, learning rates);
they live here, not in train_grpo.py, because nothing imports a training script and the SFT stage will share them.
"""
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

import rollout
import sp as sp_lib
import vlm
from common import Dist, Root, all_reduce, print0, wrap_fsdp
from sp import dp_all_reduce


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
# building the policy, and the format warm-up (CPU demo): a tiny supervised stage before GRPO

def build_policy(cfg, model_path: str, d: Dist, spi):
    """The policy as an FSDP2 root (policy(fn, ...) runs fn(model, ...)), the frozen reference when kl_beta > 0,
    the optimizer, and the attention function of each phase (Ulysses in training under SP)."""
    model, processor = vlm.load_model(model_path, "float32" if cfg.dtype == "auto" else cfg.dtype,
                                      cfg.attn_implementation, d.device)
    if cfg.freeze_vision:
        for encoder in vlm.media_encoders(model):
            encoder.requires_grad_(False)
    if cfg.gradient_checkpointing:  # what the decoder keeps for backward: vlm.set_checkpointing
        vlm.set_checkpointing(model, cfg.checkpoint_mode, cfg.mlp_chunk, cfg.attention_layers)
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
    if cfg.kl_beta > 0:  # a frozen copy of the initial policy; not loaded at all when beta = 0
        ref, _ = vlm.load_model(model_path, "float32", cfg.attn_implementation, d.device)
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


def format_warmup(policy, processor, loader, cfg, d: Dist, suppress_ids, spi=None):
    """Teach the answer format only: SFT on '<think> </think> <answer> X </answer>' with X a RANDOM letter,
    independent of the video, so the model starts GRPO at chance accuracy with a parsable format."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, betas=(0.9, cfg.beta2))
    tok, eos = processor.tokenizer, processor.tokenizer.eos_token_id
    rng = random.Random(cfg.seed + 7 * (spi.dp_rank if spi else d.rank))  # SP peers: the same letters
    policy.train()
    for step in range(cfg.sft_steps):
        samples = loader.next_batch()
        prompts = rollout.prepare_prompts(policy.model, processor, samples, cfg, cfg.think, [],
                                          cfg.embeddings_cache)
        seqs = []
        for p in prompts:
            letter = rng.choice("ABCD")
            text = (f"<think> </think> <answer> {letter} </answer>" if cfg.think else f"<answer> {letter} </answer>")
            ids = tok.encode(text, add_special_tokens=False) + [eos]
            seqs.append(Seq(prompt=p, response_ids=ids, advantages=torch.zeros(len(ids))))
        lengths = [len(s.response_ids) for s in seqs]
        n_tokens = dp_all_reduce(torch.tensor([float(sum(lengths))]), spi)[0].item()
        total = 0.0
        for chunk in micro_batches(seqs, cfg.micro_batch_size * 4):
            logp, _, _ = sequences_logprobs(policy, chunk or seqs[:1], cfg, suppress_ids, spi=spi)
            loss = -logp.sum() * d.world_size / n_tokens * (0.0 if chunk is None else 1.0)  # token-mean NLL
            loss.backward()
            total += loss.item() / d.world_size
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == cfg.sft_steps - 1:
            print0(f"format warm-up {step + 1}/{cfg.sft_steps}: nll {all_reduce(torch.tensor([total]))[0]:.3f}")
    del optimizer
