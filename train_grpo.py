"""
GRPO / DAPO / Reinforce++ for video VLMs, as one explicit loop (re-creates NVlabs' Long-RL, itself EasyR1/verl).

    python train_grpo.py config/tiny_cpu.py                        # CPU demo: synthetic task, tiny model, ~5 min
    torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_3b_grpo.py --data=train.jsonl
    torchrun --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_7b_grpo.py --sp_size=4  # long videos, Ulysses SP
    python train_grpo.py --help                                    # every config field

One step: rollout n answers per prompt (rollout.py: HF engine, or colocated vLLM) -> rewards (data/rewards.py)
-> advantages over each group -> old/ref log-probs -> clipped policy-gradient update(s) under FSDP2 -> push the
new weights into vLLM -> log + checkpoint. Deliberate choices (vs. verl): no Ray, no trainer class; log-probs
only at response positions (lm_head in chunks, never full-vocabulary logits over the prompt); training
sequences are right-padded so causal attention needs no mask; each token is counted once in the loss
normalisation, on the rank that holds it (see `token_weights`).
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

import rollout
import vlm
from common import (MetricsLog, Dist, all_reduce, exit_distributed, finite, gpu_used_gib, latest_checkpoint,
                    load_checkpoint, load_model_weights, plot_curve, print0, profiled, save_checkpoint)
from configurator import parse_config
from data.datasets import Loader, load_jsonl
from data.rewards import JudgeConfig, RewardStats, compute_rewards
from policy import (PolicyConfig, Seq, build_policy, clip_and_step, fill_logprobs, format_warmup, micro_batches,
                    micro_size, sequences_logprobs, start_run)
from sp import dp_all_reduce, sp_broadcast


# ----------------------------------------------------------------------------------------------------------
# config: every field overridable as --key=value or from a preset in config/ (python train_grpo.py --help)

@dataclass
class Config(PolicyConfig):  # the model and how it is held: policy.py; frames: data/video.py
    # I/O
    out_dir: str = "runs/grpo"          # checkpoints, metrics.jsonl, eval predictions, learning curve
    resume: bool = False                # continue from the newest complete checkpoint in out_dir
    save_every: int = 50                # steps between checkpoints (and one at the end); 0 = never (benchmarks)
    keep_last: int = 2                  # checkpoints kept on disk
    # data
    data: str = ""                      # training jsonl (data/datasets.py format)
    eval_data: str = ""                 # held-out jsonl, evaluated greedily every eval_every steps
    synthetic: bool = False             # make the synthetic flash-colour task (and a tiny model) if missing
    synthetic_frames: int = 64          # synthetic: frames per video
    synthetic_flash: int = 4            # synthetic: frames the colour flash lasts
    synthetic_train: int = 1024         # synthetic: training videos
    synthetic_eval: int = 256           # synthetic: held-out videos (balanced answers)
    synthetic_leak_control: bool = False  # synthetic: flash colour independent of the answer (must stay at chance)
    init_from: str = ""                 # start from this run's weights (train_sft.py's out_dir, or a step_* folder)
    # rollout (the sampling temperature: policy.PolicyConfig)
    engine: str = "hf"                  # hf (any machine) | vllm (colocated, GPU)
    rollout_batch_size: int = 16        # prompts per step, over all data-parallel ranks
    n: int = 8                          # responses per prompt (the group)
    top_p: float = 1.0                  # keep 1.0 for exact importance ratios
    max_new_tokens: int = 256           # response length cap
    gpu_memory_utilization: float = 0.4  # vLLM: fraction of the GPU for its weights + KV cache
    max_model_len: int = 32768          # vLLM: longest prompt + response
    vllm_sleep_level: int = 1           # 1: weights to CPU while training; 2 would drop them (every weight re-pushed)
    # reward
    w_acc: float = 0.9                  # total = w_acc * accuracy + w_fmt * format
    w_fmt: float = 0.1                  # weight of the think/answer format reward
    open_ended: str = "similarity"      # open-ended answers: similarity (offline embeddings) | judge (LLM)
    judge_url: str = ""                 # OpenAI-compatible base URL for the judge (key from $OPENAI_API_KEY)
    judge_model: str = ""               # judge model name
    # algorithm
    adv_estimator: str = "grpo"         # grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_baseline
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    clip_low: float = 0.2               # PPO clip: ratio >= 1 - clip_low
    clip_high: float = 0.2              # PPO clip: ratio <= 1 + clip_high (DAPO clip-higher: 0.28)
    dual_clip: float = 3.0              # dual clip c > 1 for negative advantages (0 = off)
    kl_beta: float = 0.0                # KL to a frozen reference (0: no reference model is loaded)
    kl_estimator: str = "k3"            # k1 | k2 | k3 (low_var_kl)
    kl_in_reward: bool = False          # subtract beta * KL from the reward instead of adding it to the loss
    loss_type: str = "ppo"              # ppo (token ratio, clipped) | gspo (sequence ratio) | cispo (clipped IS weight)
    gspo_clip_low: float = 3e-4         # GSPO: sequence ratio >= 1 - this (the paper's 3e-4)
    gspo_clip_high: float = 4e-4        # GSPO: sequence ratio <= 1 + this (the paper's 4e-4)
    cispo_clip_low: float = 1.0         # CISPO: IS weight >= 1 - this (1: no lower bound, as MiniMax-M1)
    cispo_clip_high: float = 0.28       # CISPO: IS weight <= 1 + this
    rollout_correction: str = "auto"    # auto (token with vLLM, off with HF) | token | sequence | off (rollout_weights)
    rollout_is_cap: float = 2.0         # C: token weights min(rho, C); sequences kept while 1/C <= geo-mean rho <= C
    dynamic_sampling: bool = False      # DAPO: drop groups whose rewards are all equal, refill from new prompts
    max_sampling_tries: int = 3         # DAPO: rollout rounds per step before training on what was kept
    overlong_buffer: int = 0            # DAPO overlong shaping: length buffer L_buf (0 = off)
    overlong_penalty: float = 1.0       # DAPO overlong shaping factor
    ppo_epochs: int = 1                 # passes over each rollout batch
    update_batch_size: int = 0          # prompts per optimizer update (0 = the whole rollout: one update)
    # optimizer (lr, weight decay, beta2, clipping: policy.PolicyConfig)
    warmup_steps: int = 0               # linear learning-rate warm-up (optimizer updates)
    max_steps: int = 100                # GRPO steps (one rollout batch each)
    # format warm-up (CPU demo): teach only the answer format with random letters, so accuracy starts at chance
    sft_steps: int = 0                  # supervised steps on "<think> </think> <answer> X </answer>", X random
    sft_lr: float = 1e-3                # learning rate of the format warm-up
    sft_batch_size: int = 32            # prompts per warm-up step
    # sequence parallelism (sp_size: policy.PolicyConfig)
    sp_split_rollout: bool = True       # SP peers sample n/sp responses each (False: rank 0's n, copied to peers)
    # system
    eval_every: int = 25                # steps between held-out evaluations (0 = only before and after)
    eval_batch_size: int = 64           # prompts per eval generation batch
    eval_max_samples: int = 0           # evaluate on at most this many held-out rows (0 = all)
    progress: bool = True               # tqdm bars
    profile_step: int = 0               # > 0: torch.profiler over this step's update: top ops printed, trace in out_dir
    tensorboard: bool = False           # also log to out_dir/tb
    wandb_project: str = ""             # also log to Weights & Biases


# ----------------------------------------------------------------------------------------------------------
# advantages, KL, losses, importance weights: plain functions on tensors, each with its formula

GROUP_ESTIMATORS = ("grpo", "drgrpo", "rloo")


def compute_advantages(rewards: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards [num_prompts, n] -> per-response advantages [num_prompts, n] (the group is a row). A group whose
    rewards are all equal gets exactly 0: in float32 the mean of eight 0.9s is not 0.9, and (r - mean) / (std +
    eps) would then push every member of an all-correct group down (-0.056 each). Computed in float64."""
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        raise ValueError("Reinforce++ advantages are token-level: use reinforce_pp_advantages")
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"adv_estimator {estimator!r}: choose grpo, drgrpo, rloo, reinforce_pp, "
                         "reinforce_pp_baseline")
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(f"adv_estimator {estimator!r} compares the n responses of a prompt: n={n} has no baseline")
    if rewards.numel() == 0:  # DAPO kept no group this step
        return torch.zeros_like(rewards)
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    if estimator == "grpo":      # A_i = (r_i - mean(r)) / (std(r) + eps), unbiased std as verl
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + eps)
    elif estimator == "drgrpo":  # Dr.GRPO: A_i = r_i - mean(r), no division by the std
        adv = r - mean
    else:                        # RLOO: A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean(r))
        adv = (r - mean) * n / (n - 1)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, 0.0, adv).to(rewards.dtype)


def reinforce_pp_advantages(outcomes: torch.Tensor, token_penalties: list, baseline_groups: torch.Tensor = None,
                            gamma: float = 1.0, group=None, eps: float = 1e-8) -> list:
    """Reinforce++ (OpenRLHF): token rewards r_t = -penalty_t (beta * KL_t when KL is in the reward, else 0) with
    the outcome reward added on the last token; returns G_t = sum_{k>=t} gamma^(k-t) r_k, whitened over every
    token of the batch (all data-parallel ranks: `group`; population std).
    Reinforce++-baseline (baseline_groups: [num_seqs] group ids): each outcome minus its group's mean OUTCOME,
    taken before the KL penalties join, so a KL shared by the members of a group is not cancelled by it."""
    outcomes = outcomes.double()
    if baseline_groups is not None:
        means = torch.zeros(int(baseline_groups.max()) + 1 if len(baseline_groups) else 0, dtype=torch.float64)
        means.index_add_(0, baseline_groups, outcomes)
        means /= torch.bincount(baseline_groups, minlength=len(means)).clamp(min=1)
        outcomes = outcomes - means[baseline_groups]          # exactly 0 for a group of equal outcomes
    returns = []
    for outcome, penalty in zip(outcomes, token_penalties):
        r = -penalty.double()
        r[-1] += outcome
        g, out = 0.0, torch.empty_like(r)
        for t in range(len(r) - 1, -1, -1):
            g = r[t] + gamma * g
            out[t] = g
        returns.append(out)
    flat = torch.cat(returns) if returns else torch.zeros(0, dtype=torch.float64)
    stats = torch.stack([flat.sum(), (flat ** 2).sum(), torch.tensor(float(flat.numel()), dtype=torch.float64)])
    all_reduce(stats, group)
    mean = stats[0] / stats[2].clamp(min=1)
    std = (stats[1] / stats[2].clamp(min=1) - mean ** 2).clamp(min=0).sqrt()
    return [((x - mean) / (std + eps)).float() for x in returns]


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimates from samples of pi (Schulman's k1/k2/k3). As values (kl_in_reward)
    all three estimate KL(pi || pi_ref); as losses their expected gradients differ: k2's is grad KL(pi || pi_ref),
    k3's grad KL(pi_ref || pi) (verl's low_var_kl), k1's zero (so check_config keeps k1 in the reward)."""
    delta = logp - logp_ref
    if estimator == "k1":        # k1 = logp - logp_ref
        return delta
    if estimator == "k2":        # k2 = 0.5 (logp - logp_ref)^2
        return 0.5 * delta ** 2
    if estimator == "k3":        # k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1
        delta = delta.clamp(-20, 20)  # exp(100) overflows to inf and its gradient to NaN; clamped: gradient 0
        # the value capped at 10, as verl's low_var_kl: a token beyond it (d < -2.61 or d > 11.0) gets no KL gradient
        return (torch.exp(-delta) + delta - 1).clamp(max=10)
    raise ValueError(f"kl_estimator {estimator!r}: choose k1, k2 or k3")


def policy_loss(logp, logp_old, advantages, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    """PPO-clip (loss_type=ppo) per token, with dual clip; returns (loss [N], clipped [N] bool).
        ratio = exp(logp - logp_old)
        l = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
        for A < 0: l = min(l, -A * c)        (dual clip, c > 1: bounds the loss of a very large ratio)"""
    if dual_clip and dual_clip <= 1:
        raise ValueError(f"dual_clip {dual_clip}: use c > 1 (c <= 1 makes the loss constant for A < 0), 0 = off")
    ratio = torch.exp((logp - logp_old).clamp(-20, 20))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss, clipped > unclipped


def sequence_mean(values: torch.Tensor, lengths: list) -> torch.Tensor:
    """Flat per-token values -> each sequence's mean, repeated over its tokens (same shape)."""
    return torch.cat([v.mean().expand(len(v)) for v in values.split(lengths)]) if lengths else values


def gspo_loss(logp, seq_log_ratio, advantages, clip_low=3e-4, clip_high=4e-4):
    """GSPO (arXiv 2507.18071), sequence-level ratio; returns (loss [N], clipped [N] bool).
        log s_i = mean_t (logp_t - logp_old_t)                 (seq_log_ratio: detached, repeated over the tokens)
        s_i,t = exp(sg[log s_i] + logp_t - sg[logp_t])          (value s_i; gradient s_i * grad logp_t)
        l = max(-A * s_i,t, -A * clip(s_i,t, 1 - eps_low, 1 + eps_high))
    With loss_agg=seq-mean-token-mean (the paper's) the gradient is A_i * grad s_i."""
    ratio = torch.exp((seq_log_ratio.detach() + logp - logp.detach()).clamp(max=10))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def cispo_loss(logp, logp_old, advantages, clip_low=1.0, clip_high=0.28):
    """CISPO (MiniMax-M1, arXiv 2506.13585): a clipped, stop-gradient importance weight on every token's log-prob,
    so no token's gradient is dropped (PPO's clip zeroes it); returns (loss [N], clipped [N] bool).
        w = sg[clip(exp(logp - logp_old), 1 - eps_low, 1 + eps_high)]       (eps_low = 1: no lower bound)
        l = -w * A * logp                                         (gradient -w * A * grad logp)"""
    ratio = torch.exp((logp - logp_old).clamp(-20, 20)).detach()
    weight = ratio.clamp(1 - clip_low, 1 + clip_high)
    return -weight * advantages * logp, weight != ratio


def rollout_weights(logp_old, logp_rollout, lengths: list, mode: str = "token", cap: float = 2.0):
    """Rollout / training mismatch correction: the engine sampled from pi_rollout (its kernels, bf16), the update
    assumes pi_old. Weight of each token's policy loss (verl algorithm.rollout_correction, TRL
    vllm_importance_sampling_correction); returns (weights [N], ratio [N], corrected [N] bool).
        rho_t = pi_old(y_t) / pi_rollout(y_t) = exp(logp_old_t - logp_rollout_t)
        token:    w_t = min(rho_t, C)                                     (truncated IS; corrected: rho_t > C)
        sequence: w_t = 1 if 1/C <= exp(mean_t log rho_t) <= C else 0     (geometric-mean mask of the sequence)
        off:      w_t = 1"""
    ratio = torch.exp((logp_old - logp_rollout).clamp(-20, 20))
    if mode == "token":
        return ratio.clamp(max=cap), ratio, ratio > cap
    if mode == "sequence":
        geo = torch.exp(sequence_mean(logp_old - logp_rollout, lengths))
        keep = (geo >= 1 / cap) & (geo <= cap)
        return keep.to(ratio.dtype), ratio, ~keep
    if mode == "off":
        return torch.ones_like(ratio), ratio, torch.zeros_like(ratio, dtype=torch.bool)
    raise ValueError(f"rollout_correction {mode!r}: choose auto, token, sequence or off")


def token_weights(lengths: list, mode: str, num_tokens: float, num_seqs: float, max_len: int) -> torch.Tensor:
    """Weight of each response token in the loss, so that sum(w * l) over ALL ranks and micro-batches is:
        token-mean               sum_tokens l / N_tokens
        seq-mean-token-sum       sum_seqs (sum_t l) / N_seqs
        seq-mean-token-mean      sum_seqs (mean_t l) / N_seqs
        seq-mean-token-sum-norm  sum_seqs (sum_t l) / (N_seqs * max_len)       (Dr.GRPO)
    N_tokens / N_seqs are global counts (all-reduced before the micro-batch loop)."""
    if mode == "token-mean":
        per_seq = [torch.full((L,), 1.0 / num_tokens) for L in lengths]
    elif mode == "seq-mean-token-sum":
        per_seq = [torch.full((L,), 1.0 / num_seqs) for L in lengths]
    elif mode == "seq-mean-token-mean":
        per_seq = [torch.full((L,), 1.0 / (num_seqs * max(L, 1))) for L in lengths]
    elif mode == "seq-mean-token-sum-norm":
        per_seq = [torch.full((L,), 1.0 / (num_seqs * max_len)) for L in lengths]
    else:
        raise ValueError(f"loss_agg {mode!r}: choose token-mean, seq-mean-token-sum, seq-mean-token-mean, "
                         "seq-mean-token-sum-norm")
    return torch.cat(per_seq) if per_seq else torch.zeros(0)


def overlong_shaping(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO: r += min(-(len - (max_len - L_buf)) / L_buf * factor, 0) for responses past max_len - L_buf."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    return torch.clamp(-(lengths.float() - (max_len - buffer)) / buffer * factor, max=0.0)


# ----------------------------------------------------------------------------------------------------------
# the update: one optimizer step on a batch of sampled responses (policy.py runs them through the model)

def correction_mode(cfg) -> str:
    """rollout_correction=auto: truncated IS (token) with vLLM, whose kernels and bf16 differ from the trainer's;
    off with the HF engine, which samples from the training forward itself (the ratio is ~1)."""
    if cfg.rollout_correction == "auto":
        return "token" if cfg.engine == "vllm" else "off"
    return cfg.rollout_correction


def token_losses(logp, logp_old, advantages, seq_log_ratio, cfg):
    """The per-token policy loss of cfg.loss_type: (loss [N], clipped [N] bool)."""
    if cfg.loss_type == "ppo":
        return policy_loss(logp, logp_old, advantages, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    if cfg.loss_type == "gspo":
        return gspo_loss(logp, seq_log_ratio, advantages, cfg.gspo_clip_low, cfg.gspo_clip_high)
    if cfg.loss_type == "cispo":
        return cispo_loss(logp, logp_old, advantages, cfg.cispo_clip_low, cfg.cispo_clip_high)
    raise ValueError(f"loss_type {cfg.loss_type!r}: choose ppo, gspo or cispo")


UPDATE_SUMS = ("loss", "clipped", "kl", "entropy", "tokens", "is_ratio", "is_corrected", "mismatch_kl", "is_tokens")


def update(policy, optimizer, seqs: list, cfg, d: Dist, suppress_ids, fallback, spi=None) -> dict:
    """One optimizer step on `seqs`; returns its sums over all ranks (UPDATE_SUMS, is_ratio_max, grad_norm,
    skipped) for training_metrics. The normaliser counts are global (all data-parallel ranks), taken before
    the micro-batch loop; each token is counted once, on the (SP) rank that holds it:
        loss_r = W * sum_local(weight_t * w_is_t * l_t),  sum over ranks / W = the aggregated loss (FSDP averages
        grads over all W = dp * sp ranks); w_is = rollout_weights (1 when the correction is off).
    A non-finite gradient norm skips the optimizer step: the weights stay as they were."""
    lengths = [len(s.response_ids) for s in seqs]
    counts = dp_all_reduce(torch.tensor([float(sum(lengths)), float(len(seqs))]), spi)
    weights = token_weights(lengths, cfg.loss_agg, counts[0].clamp(min=1).item(), counts[1].clamp(min=1).item(),
                            cfg.max_new_tokens).split(lengths)
    weight_of = {id(s): w for s, w in zip(seqs, weights)}
    sums, ratio_max = torch.zeros(len(UPDATE_SUMS), dtype=torch.float64), torch.zeros(1)
    for chunk in micro_batches(seqs, micro_size(cfg)):
        logp, entropy, split = sequences_logprobs(policy, chunk or [fallback], cfg, suppress_ids, True, spi)
        align, gather = (lambda v: split.align(v, logp.device)), split.gather
        if chunk is None:       # padding micro-batch: forward + backward with zero weight
            (logp.sum() * 0.0).backward()
            continue
        lens = [len(s.response_ids) for s in chunk]
        # old log-probs: recomputed before the first update, or (one on-policy update) the current ones detached;
        # `full` values cover every token of the chunk (SP: gathered from the peers), the rest this rank's only
        old_full = torch.cat([s.logp_old for s in chunk]) if chunk[0].logp_old is not None else gather(logp.detach())
        old, adv = align(old_full), align(torch.cat([s.advantages for s in chunk]))
        seq_log_ratio = align(sequence_mean(gather(logp.detach()).cpu() - old_full.cpu(), lens)) \
            if cfg.loss_type == "gspo" else None
        per_token, clipped = token_losses(logp, old, adv, seq_log_ratio, cfg)
        if chunk[0].engine_logprobs is not None:  # the rollout engine's own log-probs: mismatch and correction
            rollout_lp = torch.cat([torch.tensor(s.engine_logprobs, dtype=torch.float32) for s in chunk])
            w_is, ratio, corrected = rollout_weights(old_full.cpu().float(), rollout_lp, lens, correction_mode(cfg),
                                                     cfg.rollout_is_cap)
            w_is, ratio, corrected = align(w_is), align(ratio), align(corrected)
            per_token = per_token * w_is
            mismatch = kl_penalty(align(rollout_lp), old, "k3")  # KL(pi_rollout || pi_old), k3 on rollout samples
            sums[5:] += torch.tensor([ratio.sum().item(), corrected.sum().item(), mismatch.sum().item(),
                                      float(ratio.numel())], dtype=torch.float64)
            if ratio.numel():
                ratio_max = torch.maximum(ratio_max, ratio.max().cpu().float().reshape(1))
        if cfg.kl_beta > 0:
            kl = kl_penalty(logp, align(torch.cat([s.logp_ref for s in chunk])), cfg.kl_estimator)
            if not cfg.kl_in_reward:
                per_token = per_token + cfg.kl_beta * kl
            sums[2] += kl.detach().sum().item()
        loss = d.world_size * (align(torch.cat([weight_of[id(s)] for s in chunk])) * per_token).sum()
        with record_function("backward"):
            loss.backward()
        sums[[0, 1, 3, 4]] += torch.tensor([loss.item() / d.world_size, clipped.sum().item(),
                                            entropy.detach().sum().item(), float(logp.numel())], dtype=torch.float64)
    with record_function("clip + optimizer step"):
        grad_norm, skipped = clip_and_step(policy, optimizer, cfg.grad_clip)
    all_reduce(sums)
    all_reduce(ratio_max, op=dist.ReduceOp.MAX if dist.is_initialized() else None)
    return {**dict(zip(UPDATE_SUMS, sums.tolist())), "is_ratio_max": ratio_max.item(), "grad_norm": grad_norm,
            "skipped": int(skipped)}


def training_metrics(results: list) -> dict:
    """The step's update metrics over ALL its optimizer updates (not the last one's): per-token means over every
    update's tokens, the loss and the gradient norm averaged over the updates, skipped updates counted."""
    tot = {k: sum(r[k] for r in results) for k in UPDATE_SUMS}
    tokens, finite = max(tot["tokens"], 1.0), [r["grad_norm"] for r in results if not r["skipped"]]
    out = {"loss": sum(r["loss"] for r in results) / max(len(results), 1), "clip_frac": tot["clipped"] / tokens,
           "kl": tot["kl"] / tokens, "entropy": tot["entropy"] / tokens,
           "grad_norm": sum(finite) / len(finite) if finite else float("nan"), "updates": len(results),
           "skipped_updates": sum(r["skipped"] for r in results)}
    if tot["is_tokens"] > 0:  # rollout / training mismatch, measured whether or not it is corrected
        out.update(rollout_is_ratio=tot["is_ratio"] / tot["is_tokens"],
                   rollout_is_ratio_max=max(r["is_ratio_max"] for r in results),
                   rollout_is_corrected_frac=tot["is_corrected"] / tot["is_tokens"],
                   rollout_mismatch_kl=tot["mismatch_kl"] / tot["is_tokens"])
    return out


# ----------------------------------------------------------------------------------------------------------
# one step's phases that are more than a few lines: sampling, scoring, advantages, the step's metrics

def score_responses(outs: list, prompts: list, cfg: Config, judge, reward_stats, stats: dict,
                    spi=None) -> torch.Tensor:
    """Reward of each response (data/rewards.py: w_acc * accuracy + w_fmt * format, + DAPO's overlong shaping);
    appends each response's reward, accuracy, format and length to `stats` for the step's metrics. Under SP the
    peers hold the same responses and take the scores of the group's first rank (a judge call that fails on one
    peer only would otherwise give the peers different rewards, groups and micro-batches)."""
    t0 = time.time()
    scores = compute_rewards([o.text for o in outs], [prompts[o.prompt_index].sample.to_dict() for o in outs],
                             cfg.w_acc, cfg.w_fmt, cfg.think, cfg.open_ended, judge, reward_stats)
    lengths = torch.tensor([len(o.response_ids) for o in outs])
    reward = torch.as_tensor(scores["reward"], dtype=torch.float32)
    reward += overlong_shaping(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    reward, accuracy, fmt = sp_broadcast(torch.stack([reward, torch.as_tensor(scores["accuracy"]).float(),
                                                      torch.as_tensor(scores["format"]).float()]), spi)
    stats["reward"] += reward.tolist()
    stats["accuracy"] += accuracy.tolist()
    stats["format"] += fmt.tolist()
    stats["length"] += lengths.tolist()
    stats["truncated"] += sum(not o.finished for o in outs)
    stats["reward_time"] += time.time() - t0
    return reward


def assign_advantages(seqs: list, num_groups: int, cfg: Config, spi):
    """Set s.advantages ([R] per token) for the kept groups' responses (cfg.n consecutive seqs a group).
    GRPO-style estimators give each response one value, repeated over its tokens; Reinforce++ gives per-token
    returns. With KL in the reward (kl_in_reward), r - beta * KL is what they see."""
    kl_seq = [kl_penalty(s.logp_old, s.logp_ref, cfg.kl_estimator) for s in seqs] \
        if (cfg.kl_beta > 0 and cfg.kl_in_reward) else None
    if cfg.adv_estimator.startswith("reinforce_pp"):  # outcome on the last token, -beta * KL_t on every token
        penalties = [cfg.kl_beta * kl_seq[k] if kl_seq else torch.zeros(len(s.response_ids))
                     for k, s in enumerate(seqs)]
        group_ids = torch.arange(num_groups).repeat_interleave(cfg.n)
        adv = reinforce_pp_advantages(torch.tensor([s.reward for s in seqs]), penalties,
                                      group_ids if cfg.adv_estimator.endswith("baseline") else None,
                                      group=spi.dp_group if cfg.sp_size > 1 else None)
    else:
        rewards = torch.tensor([s.reward for s in seqs]).view(num_groups, cfg.n) if seqs else torch.zeros(0, cfg.n)
        if kl_seq:  # KL in the reward: r - beta * sum_t KL_t
            rewards = rewards - cfg.kl_beta * torch.tensor([k.sum() for k in kl_seq]).view_as(rewards)
        a = compute_advantages(rewards, cfg.adv_estimator).flatten()
        adv = [torch.full((len(s.response_ids),), float(a[k])) for k, s in enumerate(seqs)]
    for s, a in zip(seqs, adv):
        s.advantages = a


def rollout_metrics(stats: dict, num_groups: int, seqs: list, spi) -> dict:
    """The step's rollout statistics over all data-parallel ranks (sums all-reduced, then divided)."""
    r, n = stats["reward"], len(seqs) // max(num_groups, 1)   # seqs come group by group, n per group
    local = torch.tensor([sum(r), sum(x * x for x in r), sum(stats["accuracy"]), sum(stats["format"]),
                          sum(stats["length"]), float(len(r)), float(stats["truncated"]), float(num_groups),
                          float(sum(len(s.prompt.input_ids) + len(s.response_ids) for s in seqs)),
                          float(sum(len(s.prompt.input_ids) * (k % n == 0) + len(s.response_ids)  # prompt once a group
                                    for k, s in enumerate(seqs)))], dtype=torch.float64)
    tot = dp_all_reduce(local, spi)
    count = tot[5].clamp(min=1)
    mean = tot[0] / count
    return {"reward": mean.item(), "reward_std": (tot[1] / count - mean ** 2).clamp(min=0).sqrt().item(),
            "accuracy": (tot[2] / count).item(), "format": (tot[3] / count).item(),
            "response_len": (tot[4] / count).item(), "response_len_max": max(stats["length"] or [0]),
            "truncated_frac": (tot[6] / count).item(), "groups_kept": int(tot[7]), "tokens": tot[8].item(),
            "useful_tokens": tot[9].item()}


def check_config(cfg: Config, dp_size: int = 1):
    """Start-up checks: a setting that would run but train wrongly (or drop data) stops here, naming the field."""
    estimators = (*GROUP_ESTIMATORS, "reinforce_pp", "reinforce_pp_baseline")
    if cfg.adv_estimator not in estimators:
        raise ValueError(f"adv_estimator {cfg.adv_estimator!r}: choose {', '.join(estimators)}")
    if cfg.n < 2 and cfg.adv_estimator != "reinforce_pp":  # Long-RL refuses too
        raise ValueError(f"adv_estimator={cfg.adv_estimator} compares the n responses of each prompt: n={cfg.n} "
                         "gives every response advantage 0; use n >= 2, or adv_estimator=reinforce_pp")
    if cfg.dual_clip and cfg.dual_clip <= 1:
        raise ValueError(f"dual_clip={cfg.dual_clip}: use c > 1 (c <= 1 makes the loss constant for negative "
                         "advantages: zero gradient), or 0 = off")
    if cfg.dynamic_sampling and cfg.adv_estimator == "reinforce_pp":
        raise ValueError("dynamic_sampling drops groups whose rewards are all equal, which carry no signal only for a "
                         "group baseline; adv_estimator=reinforce_pp whitens over the whole batch (and with n=1 every "
                         "group would be dropped): use reinforce_pp_baseline or a group estimator, or "
                         "dynamic_sampling=false")
    if cfg.kl_beta > 0 and cfg.kl_estimator == "k1" and not cfg.kl_in_reward:
        raise ValueError("kl_estimator=k1 in the loss pulls nowhere: its gradient, grad logp, has expectation 0 under "
                         "the policy's own samples; use k1 with kl_in_reward=true, or k2 / k3 in the loss")
    for name, value, choices in (("loss_type", cfg.loss_type, ("ppo", "gspo", "cispo")),
                                 ("rollout_correction", cfg.rollout_correction, ("auto", "token", "sequence", "off")),
                                 ("kl_estimator", cfg.kl_estimator, ("k1", "k2", "k3")),
                                 ("engine", cfg.engine, ("hf", "vllm"))):
        if value not in choices:
            raise ValueError(f"{name} {value!r}: choose {', '.join(choices)}")
    if cfg.rollout_is_cap <= 1:
        raise ValueError(f"rollout_is_cap={cfg.rollout_is_cap}: the cap C must be > 1")
    token_weights([1], cfg.loss_agg, 1, 1, 1)  # raises on an unknown loss_agg
    if cfg.embeddings_cache and not cfg.freeze_vision:  # cf. cache_embeddings.py
        raise ValueError("--embeddings_cache holds outputs of a frozen vision tower: with freeze_vision=false the "
                         "tower would train and the cached features go stale after the first update; set "
                         "--freeze_vision=true (or drop --embeddings_cache)")
    if cfg.n % cfg.sp_size:
        raise ValueError(f"n={cfg.n} must divide by sp_size={cfg.sp_size}: each SP rank samples n/sp responses")
    if cfg.rollout_batch_size % dp_size:
        raise ValueError(f"rollout_batch_size {cfg.rollout_batch_size} must divide by the {dp_size} "
                         "data-parallel ranks")
    if cfg.update_batch_size and (cfg.rollout_batch_size % cfg.update_batch_size or cfg.update_batch_size % dp_size):
        raise ValueError(f"update_batch_size {cfg.update_batch_size} must divide rollout_batch_size "
                         f"{cfg.rollout_batch_size} (else the last groups are never trained on) and divide by the "
                         f"{dp_size} data-parallel ranks")




# ----------------------------------------------------------------------------------------------------------
# the step's batch arithmetic, its groups (rollout + reward + DAPO's filter), its update batches, its metrics

@dataclass
class Plan:
    """The batch arithmetic of one step, per data-parallel rank (printed once at start-up)."""
    prompts_per_rank: int           # rollout_batch_size / dp
    update_prompts: int             # prompts per optimizer update (update_batch_size / dp)
    updates_per_epoch: int          # optimizer updates per pass over the rollout batch
    need_old: bool                  # old log-probs recomputed before the first update (else = current, detached)


def batch_plan(cfg: Config, dp_size: int) -> Plan:
    prompts_per_rank = cfg.rollout_batch_size // dp_size
    update_prompts = (cfg.update_batch_size or cfg.rollout_batch_size) // dp_size
    updates_per_epoch = prompts_per_rank // update_prompts
    need_old = cfg.ppo_epochs > 1 or updates_per_epoch > 1 or (cfg.kl_beta > 0 and cfg.kl_in_reward)
    return Plan(prompts_per_rank, update_prompts, updates_per_epoch, need_old)


def collect_groups(policy, engine, processor, loader, data_file: str, cfg: Config, plan: Plan, step: int, suppress,
                   judge, reward_stats, spi):
    """The step's groups (prompt, its n rollouts, their rewards) and the rollout statistics. With DAPO's dynamic
    sampling a group whose rewards are all equal (no learning signal) is dropped and new prompts are sampled, up
    to max_sampling_tries rounds."""
    groups, tries = [], 0
    stats = {"reward": [], "accuracy": [], "format": [], "length": [], "truncated": 0, "reward_time": 0.0,
             "skipped": [], "misses": []}  # misses: videos with no embeddings-cache entry (decoded live)
    while True:
        tries += 1
        prompts = rollout.next_prompts(loader, plan.prompts_per_rank, policy.model, processor, cfg, data_file,
                                       stats["skipped"], stats["misses"])
        seed = cfg.seed * 1_000_003 + step * 1009 + tries * 101 + spi.dp_rank * 7919
        outs = rollout.sample_responses(policy, engine, processor, prompts, cfg, seed, suppress, spi)
        reward = score_responses(outs, prompts, cfg, judge, reward_stats, stats, spi)
        for i, p in enumerate(prompts):
            members = [k for k, o in enumerate(outs) if o.prompt_index == i]
            r = reward[members]
            if cfg.dynamic_sampling and bool((r == r[0]).all()):  # no learning signal in this group
                continue
            groups.append((p, [outs[k] for k in members], r))
        short = torch.tensor([float(len(groups) < plan.prompts_per_rank)])
        if not cfg.dynamic_sampling or tries >= cfg.max_sampling_tries or \
                all_reduce(short, op=dist.ReduceOp.MAX if dist.is_initialized() else None).item() == 0:
            break
    stats["tries"] = tries
    fallback = Seq(prompt=prompts[0], response_ids=outs[0].response_ids, advantages=torch.zeros(1))
    return groups[:plan.prompts_per_rank], stats, fallback


def update_batches(seqs: list, num_groups: int, cfg: Config, plan: Plan, step: int):
    """ppo_epochs passes over the step's sequences, each split into updates of update_prompts whole groups."""
    for epoch in range(cfg.ppo_epochs):
        order = list(range(num_groups))
        if plan.updates_per_epoch > 1:  # a fresh split of the groups into update batches each epoch
            random.Random(cfg.seed + step * 31 + epoch).shuffle(order)
        for u in range(plan.updates_per_epoch):
            chosen = set(order[u * plan.update_prompts:(u + 1) * plan.update_prompts])
            yield [s for k, s in enumerate(seqs) if k // cfg.n in chosen]


def step_metrics(step: int, stats: dict, groups: list, seqs: list, results: list, timing: dict, lr: float,
                 engine, spi) -> dict:
    """One metrics.jsonl row: rollout statistics and training metrics over all ranks, timings, memory."""
    metrics = {**training_metrics(results), "step": step, **rollout_metrics(stats, len(groups), seqs, spi),
               "sampling_tries": stats["tries"], "lr": lr, **{f"time_{k}": round(v, 4) for k, v in timing.items()}}
    # the update's rate on prompt+response sequences (what one row per response computes), and on useful tokens:
    # each group's prompt counted once (what group packing computes)
    metrics["tokens_per_s"] = metrics.pop("tokens") / max(timing["update"], 1e-9)
    metrics["useful_tokens_per_s"] = metrics.pop("useful_tokens") / max(timing["update"], 1e-9)
    if torch.cuda.is_available():  # torch's allocator peaks, and the whole GPU in use (vLLM's memory too);
        # alloc_retries: how often this step the allocator found no cached block, freed its whole cache and called
        # cudaMalloc again (each time a device-wide synchronisation: a step near the memory cap slows down there)
        metrics.update(peak_alloc_GiB=torch.cuda.max_memory_allocated() / 2**30,
                       peak_reserved_GiB=torch.cuda.max_memory_reserved() / 2**30,
                       alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0),
                       gpu_used_GiB=gpu_used_gib(), gpu_used_rollout_GiB=stats["gpu_used_GiB"])
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()  # alloc_retries counts from here
    if engine:
        metrics["vllm_prompt_mismatches"] = engine.prompt_mismatches
    return metrics


# ----------------------------------------------------------------------------------------------------------
# the loop

def main(cfg: Config):
    # checks, torchrun, seeds, out_dir, the inputs (synthetic=True: the CPU demo's, made in out_dir), SP groups
    d, spi, data_file, eval_file, model_path = start_run(cfg, check_config)
    plan = batch_plan(cfg, spi.dp_size)
    print0(f"world {d.world_size} ({d.device}) = dp {spi.dp_size} x sp {cfg.sp_size}, {plan.prompts_per_rank} "
           f"prompts x {cfg.n} responses per data-parallel rank per step, {plan.updates_per_epoch * cfg.ppo_epochs} "
           f"optimizer update(s) per step, old log-probs "
           f"{'recomputed' if plan.need_old else '= current (detached): one on-policy update'}")
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump({**cfg.__dict__, "resolved": {"data": data_file, "eval_data": eval_file, "model": model_path}},
                  f, indent=1)

    model, processor, policy, ref, optimizer, attention = build_policy(cfg, model_path, d, spi, cfg.kl_beta > 0)
    suppress = vlm.suppress_ids(model, processor)
    judge = JudgeConfig(base_url=cfg.judge_url, model=cfg.judge_model) if cfg.open_ended == "judge" else None
    engine = rollout.make_engine(cfg, model, processor, model_path, os.path.join(cfg.out_dir, "vllm_lm"),
                                 seed=cfg.seed + spi.dp_rank, sleep_level=cfg.vllm_sleep_level)
    print0(f"rollout engine: {'vLLM (colocated, sleep level %d)' % cfg.vllm_sleep_level if engine else 'HF'}")

    # data, resume (or the format warm-up), the engine's first weights, the evaluation before training
    train = load_jsonl(data_file)
    held_out = load_jsonl(eval_file) if eval_file else []
    held_out = held_out[:cfg.eval_max_samples] if cfg.eval_max_samples else held_out
    loader = Loader(train, plan.prompts_per_rank, spi.dp_rank, spi.dp_size, cfg.seed,
                    what=f"{data_file} with --rollout_batch_size={cfg.rollout_batch_size}")
    start_step, curve, skipped_total, reward_stats = 0, [], 0, RewardStats()
    last = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if last:
        state = load_checkpoint(last, model, optimizer)
        loader.restore(state["loader"])
        start_step, curve, skipped_total = state["step"], state["curve"], state["skipped"]
        reward_stats = RewardStats(**state.get("reward_stats", {}))  # rank 0's counters (the ones logged)
        print0(f"resumed from {last} at step {start_step}")
    elif cfg.init_from:  # the SFT stage's weights
        print0(f"weights from {load_model_weights(cfg.init_from, model)}")
    if cfg.init_from and ref is not None:  # the reference is pi_init, resumed or not (checkpoints hold no reference)
        load_model_weights(cfg.init_from, ref.model)
    if not last and cfg.sft_steps:
        vlm.use_attention(model, attention["train"])
        warmup_rows = Loader(train, cfg.sft_batch_size // spi.dp_size, spi.dp_rank, spi.dp_size, cfg.seed + 1,
                             f"{data_file} with --sft_batch_size={cfg.sft_batch_size}")
        format_warmup(policy, processor, warmup_rows, cfg, d, suppress, spi)
        vlm.use_attention(model, attention["rollout"])
    def evaluate(tag: str) -> dict:  # greedy held-out accuracy over all ranks, through the engine if there is one
        if engine:
            engine.wake()
        return rollout.evaluate_all(policy, processor, held_out, cfg, engine, tag, cfg.out_dir)

    if engine:  # the engine starts from the warmed-up (or resumed) policy, before any evaluation
        engine.load_weights(rollout.full_tensors(finite(model, "pushed into vLLM")))
    if held_out and not last:
        ev = evaluate("step0")
        curve.append({"step": 0, **ev})
        print0(f"held-out before GRPO: accuracy {ev['accuracy']:.3f}, format {ev['format']:.3f} "
               f"({ev['num_scored']} videos, {ev['skipped']} skipped)")
    log = MetricsLog(cfg.out_dir, d.is_main, cfg.tensorboard, cfg.wandb_project, cfg.__dict__, start_step)
    bar = tqdm(range(start_step, cfg.max_steps), desc="grpo", disable=not (cfg.progress and d.is_main),
               initial=start_step, total=cfg.max_steps)
    for step in bar:
        t0, timing = time.time(), {}
        # ---- rollout: the engine wakes, n responses per prompt are sampled and rewarded, the engine sleeps ----
        policy.eval()
        if engine:
            engine.wake()
        groups, stats, fallback = collect_groups(policy, engine, processor, loader, data_file, cfg, plan, step,
                                                 suppress, judge, reward_stats, spi)
        stats["gpu_used_GiB"] = gpu_used_gib()  # policy + optimizer state + the awake vLLM engine
        if engine:
            engine.sleep()  # KV cache freed, weights to CPU: the GPU is the trainer's
        timing["rollout"], timing["reward"] = time.time() - t0 - stats["reward_time"], stats["reward_time"]
        seqs = [Seq(prompt=p, response_ids=o.response_ids, advantages=None, reward=float(r_i),
                    engine_logprobs=o.logprobs) for p, outs, r in groups for o, r_i in zip(outs, r)]
        # ---- old / reference log-probs (several updates per rollout, or KL to a reference) ---------------
        t1 = time.time()
        vlm.use_attention(model, attention["train"])
        if ref is not None:
            vlm.use_attention(ref.model, attention["train"])
            fill_logprobs(ref, seqs, cfg, suppress, "logp_ref", fallback, spi)
        if plan.need_old:
            fill_logprobs(policy, seqs, cfg, suppress, "logp_old", fallback, spi)
        timing["logprobs"] = time.time() - t1
        # ---- advantages ----------------------------------------------------------------------------------
        assign_advantages(seqs, len(groups), cfg, spi)
        # ---- update: ppo_epochs passes, each in updates of update_batch_size prompts ------------------------
        t2 = time.time()
        policy.train()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        with profiled(cfg.profile_step == step + 1, os.path.join(cfg.out_dir, f"profile_update_rank{d.rank}.json"),
                      d.is_main):
            results = [update(policy, optimizer, batch, cfg, d, suppress, fallback, spi)
                       for batch in update_batches(seqs, len(groups), cfg, plan, step)]
        timing["update"] = time.time() - t2
        vlm.use_attention(model, attention["rollout"])
        # ---- the new weights into the sleeping engine -----------------------------------------------------
        t3 = time.time()
        if engine:
            engine.load_weights(rollout.full_tensors(finite(model, "pushed into vLLM")))
        timing["weight_sync"] = time.time() - t3
        # ---- log, evaluate, checkpoint --------------------------------------------------------------------
        metrics = step_metrics(step + 1, stats, groups, seqs, results, timing, lr, engine, spi)
        skipped_total += int(dp_all_reduce(torch.tensor([len(stats["skipped"])]), spi)[0])
        metrics.update(skipped_samples=skipped_total, judge_failures=reward_stats.judge_failures)
        for line in stats["skipped"]:
            print(f"[rank {d.rank}] skipped sample: {line}")
        if cfg.embeddings_cache:
            metrics["cache_misses"] = int(dp_all_reduce(torch.tensor([len(stats["misses"])]), spi)[0])
        # the last step's evaluation too, before its checkpoint: a run extended with --resume keeps it in its curve
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps):
            ev = evaluate(f"step{step + 1}")
            curve.append({"step": step + 1, **ev})
            metrics.update(eval_accuracy=ev["accuracy"], eval_skipped=ev["skipped"])
        log.write(metrics, step + 1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                        fmt=f"{metrics['format']:.2f}", s=f"{time.time() - t0:.2f}")
        if cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(cfg.out_dir, step + 1, finite(model, "checkpointed"), optimizer,
                            {"loader": loader.state(), "curve": curve, "skipped": skipped_total,
                             "reward_stats": asdict(reward_stats)}, cfg.keep_last)
    # ---- the learning curve (the final evaluation ran in the loop; here only if no step ran and the resumed
    # checkpoint's curve lacks it) --------------------------------------------------------------------------
    result = {"steps": cfg.max_steps, "skipped_samples": skipped_total}
    if held_out and (not curve or curve[-1]["step"] != cfg.max_steps):
        ev = evaluate(f"step{cfg.max_steps}")
        curve.append({"step": cfg.max_steps, **ev})
    if curve:
        result.update(before=curve[0]["accuracy"], after=curve[-1]["accuracy"], curve=curve)
        print0(f"held-out accuracy: {curve[0]['accuracy']:.3f} (step {curve[0]['step']}) -> "
               f"{curve[-1]['accuracy']:.3f} (step {curve[-1]['step']}); skipped samples: {skipped_total}")
        if d.is_main:
            plot_curve(curve, os.path.join(cfg.out_dir, "learning_curve.png"))
    log.close()
    return result


if __name__ == "__main__":
    main(parse_config(Config))
    exit_distributed()
