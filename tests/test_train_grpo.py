"""
train_grpo.py: advantages, KL, losses against hand-computed values; loss normalisation across ranks and
micro-batches (FSDP2 on 2 gloo processes); resume; bad samples; DAPO; a two-"node" torchrun launch.
    python -m pytest tests/test_train_grpo.py -q
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import common as C
import train_grpo as T
from conftest import ROOT, eval_with_missing_videos, torchrun, write_preset


# ---- algorithms, by hand ---------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of (1, 0, 0, 1)
    grpo = T.compute_advantages(r, "grpo")
    assert torch.allclose(grpo[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(grpo[1], torch.zeros(4))  # an all-equal group carries no signal
    assert torch.allclose(T.compute_advantages(r, "drgrpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # RLOO: r_i minus the mean of the other three
    assert torch.allclose(T.compute_advantages(r, "rloo")[0], torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]))
    with pytest.raises(ValueError, match="grpo, drgrpo"):
        T.compute_advantages(r, "ppo")
    for estimator in T.GROUP_ESTIMATORS:  # n = 1: no baseline to compare with, refused (never a silent 0)
        with pytest.raises(ValueError, match="n=1"):
            T.compute_advantages(torch.tensor([[1.0], [0.0]]), estimator)


@pytest.mark.parametrize("estimator", T.GROUP_ESTIMATORS)
@pytest.mark.parametrize("level", [0.9, 0.1, 1.0, 0.0, 0.3])
def test_all_equal_group_gets_exactly_zero(estimator, level):
    """float32: the mean of eight 0.9s is not 0.9, and (r - mean) / (std + 1e-6) gave -0.056 for every member."""
    rewards = torch.tensor([[level] * 8, [0.9, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1, 0.1]])
    adv = T.compute_advantages(rewards, estimator)
    assert torch.equal(adv[0], torch.zeros(8))
    assert adv[1].abs().min() > 0.3  # the mixed group still has its signal


def test_reinforce_pp_by_hand():
    outcomes, no_kl = torch.tensor([1.0, 2.0]), [torch.zeros(3), torch.zeros(2)]
    returns = [1.0, 1.0, 1.0, 2.0, 2.0]  # gamma = 1: every token gets the reward that follows it
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 5)
    adv = T.reinforce_pp_advantages(outcomes, no_kl)
    assert torch.allclose(torch.cat(adv), torch.tensor([(x - mean) / std for x in returns]), atol=1e-6)
    # baseline: subtract the group mean of the outcome (1.5) first
    base = [-0.5, -0.5, -0.5, 0.5, 0.5]
    mb = sum(base) / 5
    sb = math.sqrt(sum((x - mb) ** 2 for x in base) / 5)
    adv_b = T.reinforce_pp_advantages(outcomes, no_kl, torch.tensor([0, 0]))
    assert torch.allclose(torch.cat(adv_b), torch.tensor([(x - mb) / sb for x in base]), atol=1e-6)


def test_reinforce_pp_baseline_with_kl_in_the_reward_as_openrlhf():
    """Two groups of two 2-token responses, rewards (1, 0) in each; group B's responses both have k1 KL = 2 on
    their last token, beta = 0.5. The group baseline is over the outcome r, not r - beta * KL (which would cancel
    B's shared KL): outcomes minus baseline (0.5, -0.5, 0.5, -0.5), B's last tokens -1 more, returns
    (0.5, 0.5 | -0.5, -0.5 | -0.5, -0.5 | -1.5, -1.5), whitened (mean -0.5, population std 1/sqrt 2):
    OpenRLHF gives [1.414, 1.414, 0, 0, 0, 0, -1.414, -1.414]; the old code gave [1, 1, -1, -1, 1, 1, -1, -1]."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(n=2, kl_beta=0.5, kl_in_reward=True, kl_estimator="k1",
                          adv_estimator="reinforce_pp_baseline", sp_size=1)
    kl = [[0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 2.0]]
    seqs = [T.Seq(prompt=None, response_ids=[5, 6], advantages=None, reward=r, logp_old=torch.tensor(k),
                  logp_ref=torch.zeros(2)) for r, k in zip([1.0, 0.0, 1.0, 0.0], kl)]
    T.assign_advantages(seqs, 2, cfg, spi=None)
    s = math.sqrt(2)
    expect = torch.tensor([s, s, 0, 0, 0, 0, -s, -s])
    assert torch.allclose(torch.cat([q.advantages for q in seqs]), expect, atol=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert T.kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert T.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert T.kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert T.kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        T.kl_penalty(logp, ref, "k4")


def test_k3_gradient_is_finite_far_from_the_reference():
    """exp(100) overflows: without the log-ratio clamp the k3 gradient is NaN (verl clamps to [-20, 20] too)."""
    for far in (-100.0, 100.0):
        lp = torch.tensor([far], requires_grad=True)
        T.kl_penalty(lp, torch.zeros(1), "k3").sum().backward()
        assert torch.isfinite(lp.grad).all() and lp.grad.item() == 0.0
    lp = torch.tensor([-1.0], requires_grad=True)  # inside the clamp: d/dlogp (e^(-d) + d - 1) = 1 - e^(-d)
    T.kl_penalty(lp, torch.zeros(1), "k3").sum().backward()
    assert lp.grad.item() == pytest.approx(1 - math.e)


def test_k3_value_is_capped_at_10_as_verl():
    """k3 = e^-d + d - 1 is capped at 10 (verl's low_var_kl): 10 is reached at d = -2.61 and d = 11.0, and beyond
    the cap the token's KL gradient is 0 (written in kl_penalty's comment and the README's table)."""
    for d, value, grad in ((-2.6, math.exp(2.6) - 3.6, 1 - math.exp(2.6)), (-3.0, 10.0, 0.0), (10.9, 9.9, 1.0),
                           (11.1, 10.0, 0.0)):
        lp = torch.tensor([d], dtype=torch.float64, requires_grad=True)
        k3 = T.kl_penalty(lp, torch.zeros(1, dtype=torch.float64), "k3")
        k3.sum().backward()
        assert k3.item() == pytest.approx(value, abs=1e-3) and lp.grad.item() == pytest.approx(grad, abs=1e-3)


def test_assign_advantages_with_kl_in_the_reward_by_hand():
    """One group of two responses, equal outcome reward 1: only the KL penalty (k1 = logp_old - logp_ref per
    token, beta = 0.5) separates them, so the response that moved further from the reference is pushed down."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(n=2, kl_beta=0.5, kl_in_reward=True, kl_estimator="k1", adv_estimator="drgrpo", sp_size=1)
    seqs = [T.Seq(prompt=None, response_ids=[5, 6], advantages=None, reward=1.0,
                  logp_old=torch.tensor([-1.0, -1.0]), logp_ref=torch.tensor([-1.0, -1.0])),      # KL sum 0
            T.Seq(prompt=None, response_ids=[7, 8], advantages=None, reward=1.0,
                  logp_old=torch.tensor([-1.0, -1.0]), logp_ref=torch.tensor([-2.0, -3.0]))]      # KL sum 3
    T.assign_advantages(seqs, 1, cfg, spi=None)
    # rewards - beta * KL = (1, -0.5), mean 0.25: Dr.GRPO advantages (0.75, -0.75) on every token
    assert torch.allclose(seqs[0].advantages, torch.tensor([0.75, 0.75]))
    assert torch.allclose(seqs[1].advantages, torch.tensor([-0.75, -0.75]))
    cfg.adv_estimator = "reinforce_pp"  # token rewards (0, 1) and (0 - 0.5, 1 - 1.0); whitened over the 4 tokens
    T.assign_advantages(seqs, 1, cfg, spi=None)
    returns = torch.tensor([1.0, 1.0, -0.5, 0.0])  # gamma 1: each token's return is the sum of what follows
    expect = (returns - returns.mean()) / returns.std(unbiased=False)
    assert torch.allclose(torch.cat([s.advantages for s in seqs]), expect, atol=1e-5)


def test_policy_loss_clip_and_dual_clip_by_hand():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 5.0, 0.5]))
    adv = torch.tensor([1.0, -1.0, -1.0])
    loss, clipped = T.policy_loss(logp, old, adv, 0.2, 0.2, 3.0)
    # A=+1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped); A=-1, ratio 5: max(5, 1.2) = 5 -> dual clip min(5, 3) = 3;
    # A=-1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert torch.allclose(loss, torch.tensor([-1.2, 3.0, 0.8]))
    assert clipped.tolist() == [True, False, True]
    loss_hi, _ = T.policy_loss(logp, old, adv, 0.2, 0.28, 0.0)  # clip-higher, no dual clip
    assert torch.allclose(loss_hi, torch.tensor([-1.28, 5.0, 0.8]))
    for c in (0.5, 1.0):  # c <= 1 would make the loss constant (zero gradient) for every negative advantage
        with pytest.raises(ValueError, match="c > 1"):
            T.policy_loss(logp, old, adv, 0.2, 0.2, c)
    # ratio 1: the gradient is REINFORCE's, -A * grad logp
    lp = torch.tensor([-0.3, -1.1], requires_grad=True)
    T.policy_loss(lp, lp.detach(), torch.tensor([2.0, -1.0]))[0].sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([-2.0, 1.0]))


def test_gspo_by_hand():
    """Two responses (2 and 1 tokens), sequence ratio s_i = exp(mean_t (logp - logp_old)):
    s_1 = exp((0.1 + 0.3) / 2) = exp(0.2) = 1.2214, s_2 = exp(-0.5) = 0.6065."""
    old = torch.tensor([-1.0, -2.0, -1.0])
    lp = (old + torch.tensor([0.1, 0.3, -0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -2.0])
    seq_log_ratio = T.sequence_mean(lp.detach() - old, [2, 1])
    assert torch.allclose(seq_log_ratio, torch.tensor([0.2, 0.2, -0.5]))
    loss, clipped = T.gspo_loss(lp, seq_log_ratio, adv, clip_low=0.5, clip_high=0.1)
    s1, s2 = math.exp(0.2), math.exp(-0.5)
    # A=+1: max(-s1, -clip(s1, 0.5, 1.1)) = -1.1 (clipped, no gradient); A=-2: max(2 s2, 2 clip(s2)) = 2 s2 (inside)
    assert torch.allclose(loss, torch.tensor([-1.1, -1.1, 2 * s2]), atol=1e-6)
    assert clipped.tolist() == [True, True, False]
    loss.sum().backward()  # unclipped token: d/dlogp (-A s_i,t) = -A * s_i
    assert torch.allclose(lp.grad, torch.tensor([0.0, 0.0, 2 * s2]), atol=1e-6)
    lp2 = old.clone().requires_grad_()  # ratio 1: -A * grad logp, as PPO
    T.gspo_loss(lp2, torch.zeros(3), adv)[0].sum().backward()
    assert torch.allclose(lp2.grad, -adv)


def test_cispo_by_hand():
    """w = sg[clip(ratio, 1 - 1.0, 1 + 0.28)], l = -w A logp: the clipped token keeps its gradient (-1.28 A)."""
    old = torch.zeros(3)
    lp = torch.log(torch.tensor([2.0, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 3.0])
    loss, clipped = T.cispo_loss(lp, old, adv, clip_low=1.0, clip_high=0.28)
    w = torch.tensor([1.28, 0.5, 1.1])
    assert torch.allclose(loss, -w * adv * lp.detach(), atol=1e-6)
    assert clipped.tolist() == [True, False, False]
    loss.sum().backward()
    assert torch.allclose(lp.grad, -w * adv, atol=1e-6)


def test_rollout_weights_by_hand():
    """rho = exp(logp_old - logp_rollout); token: min(rho, C); sequence: 1 while 1/C <= geo-mean rho <= C."""
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0])
    rollout_lp = old - torch.log(torch.tensor([3.0, 1.0, 0.25, 0.5, 1.0]))  # rho = 3, 1, 0.25 | 0.5, 1
    w, rho, corrected = T.rollout_weights(old, rollout_lp, [3, 2], "token", cap=2.0)
    assert torch.allclose(rho, torch.tensor([3.0, 1.0, 0.25, 0.5, 1.0]))
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 0.25, 0.5, 1.0]))
    assert corrected.tolist() == [True, False, False, False, False]
    # geo-means: (3 * 1 * 0.25)^(1/3) = 0.909 (kept), (0.5 * 1)^(1/2) = 0.707 (kept with C=2, masked with C=1.2)
    w, _, masked = T.rollout_weights(old, rollout_lp, [3, 2], "sequence", cap=2.0)
    assert w.tolist() == [1.0] * 5 and not masked.any()
    w, _, masked = T.rollout_weights(old, rollout_lp, [3, 2], "sequence", cap=1.2)
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0] and masked.tolist() == [False] * 3 + [True] * 2
    w, _, _ = T.rollout_weights(old, old.clone(), [3, 2], "token")  # engine and trainer agree: weight exactly 1
    assert torch.equal(w, torch.ones(5))
    assert torch.equal(T.rollout_weights(old, rollout_lp, [3, 2], "off")[0], torch.ones(5))


def test_rollout_metrics_count_each_groups_prompt_once_in_useful_tokens():
    """Two groups of n = 2, prompts of 10 and 20 tokens, responses of 1, 2, 3, 4 tokens: the sequences hold
    (10+1) + (10+2) + (20+3) + (20+4) = 70 tokens (one row per response computes them all); the useful tokens count
    each prompt once, 10 + 20 + 1 + 2 + 3 + 4 = 40 (what group packing computes)."""
    from types import SimpleNamespace
    prompts = [SimpleNamespace(input_ids=torch.zeros(10)), SimpleNamespace(input_ids=torch.zeros(20))]
    seqs = [T.Seq(prompt=prompts[k // 2], response_ids=[7] * (k + 1), advantages=None) for k in range(4)]
    stats = {"reward": [1.0, 0.0, 1.0, 0.0], "accuracy": [1, 0, 1, 0], "format": [1] * 4, "length": [1, 2, 3, 4],
             "truncated": 0}
    m = T.rollout_metrics(stats, 2, seqs, spi=None)
    assert m["tokens"] == 70 and m["useful_tokens"] == 40


def test_training_metrics_cover_every_update():
    """Two updates: token means over both updates' tokens, loss averaged over updates, skipped counted."""
    a = {**dict.fromkeys(T.UPDATE_SUMS, 0.0), "loss": 1.0, "clipped": 2.0, "entropy": 10.0, "tokens": 10.0,
         "is_ratio_max": 1.5, "grad_norm": 2.0, "skipped": 0}
    b = {**dict.fromkeys(T.UPDATE_SUMS, 0.0), "loss": 3.0, "clipped": 8.0, "entropy": 20.0, "tokens": 30.0,
         "is_ratio_max": 1.0, "grad_norm": float("nan"), "skipped": 1}
    m = T.training_metrics([a, b])
    assert m["loss"] == 2.0 and m["clip_frac"] == 10 / 40 and m["entropy"] == 30 / 40
    assert m["grad_norm"] == 2.0 and m["updates"] == 2 and m["skipped_updates"] == 1
    assert "rollout_is_ratio" not in m  # no engine log-probs: nothing to report


@pytest.mark.parametrize("bad, message", [
    (dict(n=1), "n=1"), (dict(n=1, adv_estimator="rloo"), "n=1"), (dict(n=1, adv_estimator="drgrpo"), "n=1"),
    (dict(dual_clip=1.0), "c > 1"), (dict(dual_clip=0.5), "c > 1"),
    (dict(rollout_batch_size=16, update_batch_size=6), "update_batch_size 6 must divide"),
    (dict(loss_type="ppo2"), "loss_type"), (dict(rollout_correction="always"), "rollout_correction"),
    (dict(rollout_is_cap=1.0), "rollout_is_cap"), (dict(loss_agg="sum"), "loss_agg"),
    (dict(n=1, adv_estimator="reinforce_pp", dynamic_sampling=True), "dynamic_sampling"),
    (dict(adv_estimator="reinforce_pp", dynamic_sampling=True), "dynamic_sampling"),
    (dict(kl_beta=0.01, kl_estimator="k1"), "k1 in the loss"),
])
def test_config_refused_at_start_up(bad, message):
    with pytest.raises(ValueError, match=message):
        T.check_config(T.Config(**bad))
    T.check_config(T.Config(n=1, adv_estimator="reinforce_pp"))  # Reinforce++ has no group: n = 1 is fine
    T.check_config(T.Config(rollout_batch_size=16, update_batch_size=8, dual_clip=0.0))
    T.check_config(T.Config(adv_estimator="reinforce_pp_baseline", dynamic_sampling=True))  # a group baseline
    T.check_config(T.Config(kl_beta=0.01, kl_estimator="k1", kl_in_reward=True))  # k1 belongs in the reward


def test_k1_in_the_loss_has_zero_expected_gradient_k2_and_k3_do_not():
    """Why check_config refuses k1 in the loss: over a categorical enumerated exactly, E_{y~pi}[grad k1(y)] = 0,
    while k2's expected gradient is grad KL(pi || ref) and k3's is grad KL(ref || pi) (verl's low_var_kl)."""
    theta, ref = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64, requires_grad=True), \
        torch.tensor([0.1, 0.4, -0.3, 0.2], dtype=torch.float64).log_softmax(0)
    def expected_grad(estimator):  # sum_y pi(y) grad_theta k(logpi(y)), pi(y) held as the sampling weight
        logp = theta.log_softmax(0)
        value = (logp.exp().detach() * T.kl_penalty(logp, ref, estimator)).sum()
        return torch.autograd.grad(value, theta)[0]
    def true_grad(kl):
        return torch.autograd.grad(kl(theta.log_softmax(0)), theta)[0]
    assert torch.allclose(expected_grad("k1"), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(expected_grad("k2"), true_grad(lambda lp: (lp.exp() * (lp - ref)).sum()))
    assert torch.allclose(expected_grad("k3"), true_grad(lambda lp: (ref.exp() * (ref - lp)).sum()))


def test_token_weights_and_overlong_by_hand():
    w = lambda mode: T.token_weights([2, 3], mode, num_tokens=5, num_seqs=2, max_len=4).tolist()
    assert w("token-mean") == pytest.approx([1 / 5] * 5)
    assert w("seq-mean-token-sum") == pytest.approx([1 / 2] * 5)
    assert w("seq-mean-token-mean") == pytest.approx([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6])
    assert w("seq-mean-token-sum-norm") == pytest.approx([1 / 8] * 5)
    shaped = T.overlong_shaping(torch.tensor([6, 8, 10]), max_len=10, buffer=4, factor=1.0)
    assert shaped.tolist() == pytest.approx([0.0, -0.5, -1.0])


# ---- the update across ranks and micro-batches -------------------------------------------------------------

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _deltas(rank, world, run_dir, micro, seqs_per_rank):
    """Parameter change of one SGD(lr=1) update on this rank's sequences, for every aggregation mode, and the
    number of micro-batches each update ran (out["micro_batches"][mode])."""
    import rollout
    import vlm
    from data.datasets import load_jsonl
    # n=2: group packing rounds micro_batch_size up to whole groups of n, so micro=2 stays 2 (with n=8 it became 8
    # and every update ran one micro-batch, leaving accumulation untested)
    cfg = T.Config(micro_batch_size=micro, n=2, max_new_tokens=12, grad_clip=1e9, num_frames=8, max_pixels=28 * 28,
                   min_pixels=28 * 28)
    d = C.Dist(rank=rank, world_size=world)
    samples = load_jsonl(os.path.join(run_dir, "data", "train.jsonl"))[:4]
    out = {"micro_batches": {}}
    for mode in MODES:
        cfg.loss_agg = mode
        model, processor = vlm.load_model(os.path.join(run_dir, "model"))
        prompts = rollout.prepare_prompts(model, processor, samples, cfg, True, [])
        g = torch.Generator().manual_seed(0)
        all_seqs = []  # 8 sequences of different lengths, advantages +-1, split over ranks in order
        for k in range(8):
            length = 3 + k % 5
            ids = torch.randint(20, 300, (length,), generator=g).tolist()
            all_seqs.append(T.Seq(prompt=prompts[k % 4], response_ids=ids,
                                  advantages=torch.full((length,), 1.0 if k % 3 else -1.0)))
        mine = all_seqs[rank * seqs_per_rank:(rank + 1) * seqs_per_rank]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        policy = C.wrap_fsdp(C.Root(model), vlm.fsdp_units(model), d, False)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        calls = []  # one forward of the root per micro-batch (sequences_logprobs runs policy(run) once)
        policy.register_forward_pre_hook(lambda *_: calls.append(1))
        T.update(policy, opt, mine, cfg, d, [], mine[0])
        out["micro_batches"][mode] = len(calls)
        after = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in model.state_dict().items()}
        out[mode] = {n: (after[n] - before[n]) for n in before}
    return out


def test_update_skips_a_non_finite_gradient(tiny_run, capsys):
    """A NaN in the loss reaches every gradient: the step is skipped (weights unchanged), counted and warned."""
    import rollout
    import vlm
    from data.datasets import load_jsonl
    cfg = T.Config(micro_batch_size=4, max_new_tokens=12, num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28)
    model, processor = vlm.load_model(os.path.join(tiny_run, "model"))
    prompts = rollout.prepare_prompts(model, processor, load_jsonl(os.path.join(tiny_run, "data", "train.jsonl"))[:2],
                                      cfg, True, [])
    seqs = [T.Seq(prompt=p, response_ids=[30, 31, 32], advantages=torch.tensor([1.0, float("nan"), 1.0]))
            for p in prompts]
    policy = C.Root(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    out = T.update(policy, opt, seqs, cfg, C.Dist(), [], seqs[0])
    assert out["skipped"] == 1 and not math.isfinite(out["grad_norm"])
    assert "optimizer step skipped" in capsys.readouterr().out
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert C.params_finite(model)
    seqs[0].advantages = seqs[1].advantages = torch.ones(3)  # a finite loss steps as usual
    assert T.update(policy, opt, seqs, cfg, C.Dist(), [], seqs[0])["skipped"] == 0
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _worker(rank, world, port, run_dir, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    out = _deltas(rank, world, run_dir, micro=2, seqs_per_rank=4)
    if rank == 0:
        torch.save(out, result_file)
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_same_for_1x4_and_2x2_microbatches_every_mode(tiny_run, tmp_path):
    """1 process x 4 micro-batches == 2 gloo processes (FSDP2) x 2 micro-batches, for every aggregation (group
    packing on, the default): gradients accumulate over micro-batches exactly as over ranks."""
    single = _deltas(0, 1, str(tiny_run), micro=2, seqs_per_rank=8)
    result = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), str(tiny_run), result), nprocs=2, join=True)
    two = torch.load(result)
    # the micro-batches really ran (rank 1 runs as many as rank 0: micro_batches equalises them)
    assert single.pop("micro_batches") == {mode: 4 for mode in MODES}
    assert two.pop("micro_batches") == {mode: 2 for mode in MODES}
    for mode in MODES:
        biggest = max(v.abs().max().item() for v in single[mode].values())
        assert biggest > 0
        for name, delta in single[mode].items():
            assert torch.allclose(delta, two[mode][name], atol=1e-6 + 1e-4 * biggest), (mode, name)
    # the modes really differ (so the test would notice a mode being ignored)
    assert not torch.allclose(single["token-mean"]["lm_head.weight"], single["seq-mean-token-sum"]["lm_head.weight"])


def _rollouts(rank, world, port, run_dir, result_file):
    """HF-engine rollouts of the same prompts on the plain model and under FSDP2 with the fused decode step."""
    import rollout
    import vlm
    from data.datasets import load_jsonl
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = T.Config(num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28)
    model, processor = vlm.load_model(os.path.join(run_dir, "model"))
    prompts = rollout.prepare_prompts(model, processor, load_jsonl(os.path.join(run_dir, "data", "train.jsonl"))[:2],
                                      cfg, True, [])
    kw = dict(n=2, temperature=1.0, max_new_tokens=10, seed=5)
    plain = rollout.hf_generate(model, processor, prompts, **kw)
    policy = C.wrap_fsdp(C.Root(model), vlm.fsdp_units(model), C.Dist(rank=rank, world_size=world), False)
    fused = policy(rollout.hf_generate, processor, prompts, static_cache=True, fused=True, **kw)
    layer = vlm.text_model(model).layers[0]
    sharded_after = type(layer.mlp.down_proj.weight).__name__ == "DTensor"
    if rank == 0:
        torch.save({"plain": [(o.response_ids, o.logprobs) for o in plain], "sharded_after": sharded_after,
                    "fused": [(o.response_ids, o.logprobs) for o in fused]}, result_file)
    torch.distributed.destroy_process_group()


def test_fused_decode_under_fsdp_equals_plain_model(tiny_run, tmp_path):
    """Training samples through the FSDP2-wrapped policy: hf_generate gathers every decoder layer for the fused step
    (unshard_layers) and gives them back afterwards; the samples equal those of the unwrapped model."""
    result = str(tmp_path / "rollouts.pt")
    mp.spawn(_rollouts, args=(2, free_port(), str(tiny_run), result), nprocs=2, join=True)
    out = torch.load(result)
    assert out["sharded_after"]
    assert [ids for ids, _ in out["fused"]] == [ids for ids, _ in out["plain"]]
    diff = max(abs(a - b) for (_, f), (_, p) in zip(out["fused"], out["plain"]) for a, b in zip(f, p))
    assert diff < 1e-4


# ---- the loop: resume, bad samples, DAPO, two torchrun nodes ---------------------------------------------------

def tiny_cfg(run_dir, out, **kw):
    base = dict(out_dir=str(out), data=os.path.join(run_dir, "data", "train.jsonl"),
                eval_data=os.path.join(run_dir, "data", "eval.jsonl"), model=os.path.join(run_dir, "model"),
                num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28, rollout_batch_size=4, n=4,
                max_new_tokens=8, lr=1e-3, max_steps=4, eval_every=0, save_every=2, progress=False,
                gradient_checkpointing=False, micro_batch_size=8, eval_batch_size=8)
    base.update(kw)
    return T.Config(**base)


def metrics_without_time(path):
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and not k.endswith("tokens_per_s")} for r in rows]


def final_params(out_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = C.latest_checkpoint(out_dir)
    dcp_to_torch_save(path, os.path.join(out_dir, "flat.pt"))
    return torch.load(os.path.join(out_dir, "flat.pt"), weights_only=False)["model"]


def test_resume_continues_exactly(tiny_run, tmp_path):
    """2 steps, then --resume --max_steps=4 == 4 steps straight: weights, metrics and the learning curve, whose
    step-2 evaluation (the first run's last) is saved in the step-2 checkpoint, not run after it and lost."""
    straight = T.main(tiny_cfg(tiny_run, tmp_path / "a", max_steps=4, eval_every=2))
    T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=2, eval_every=2))
    resumed = T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=4, eval_every=2, resume=True))
    assert metrics_without_time(tmp_path / "a" / "metrics.jsonl") == \
        metrics_without_time(tmp_path / "b" / "metrics.jsonl")
    pa, pb = final_params(str(tmp_path / "a")), final_params(str(tmp_path / "b"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [c["step"] for c in resumed["curve"]] == [0, 2, 4] and straight["curve"] == resumed["curve"]
    assert straight["after"] == resumed["after"]
    assert not os.path.exists(tmp_path / "b" / "step_00000002.tmp")


def test_a_stop_past_the_last_checkpoint_logs_each_step_once(tiny_run, tmp_path):
    """A run stopped after logging step 4 (the last row half-written) but before saving it resumes from step 2:
    metrics.jsonl is cut back to steps 1-2, so steps 3 and 4 are logged once, as in the run that never stopped."""
    T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=4, eval_data=""))   # checkpoints at steps 2 and 4
    straight = metrics_without_time(tmp_path / "run" / "metrics.jsonl")
    shutil.rmtree(tmp_path / "run" / "step_00000004")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')
    T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=4, eval_data="", resume=True))
    assert metrics_without_time(tmp_path / "run" / "metrics.jsonl") == straight


def test_judge_failures_survive_a_resume(tiny_run, tmp_path, monkeypatch):
    """The reward counters (RewardStats: judge_failures, logged every step) are in the checkpoint: after --resume
    they go on from the saved values instead of restarting at 0."""
    score = T.score_responses
    def one_judge_failure_per_batch(outs, prompts, cfg, judge, reward_stats, stats, spi=None):
        reward_stats.judge_failures += 1
        return score(outs, prompts, cfg, judge, reward_stats, stats, spi)
    monkeypatch.setattr(T, "score_responses", one_judge_failure_per_batch)
    common = dict(eval_data="", save_every=1)
    T.main(tiny_cfg(tiny_run, tmp_path / "a", max_steps=2, **common))
    T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=1, **common))
    T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=2, resume=True, **common))
    straight, resumed = (metrics_without_time(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert [r["judge_failures"] for r in straight] == [1, 2] and straight == resumed


def test_a_run_without_resume_in_an_old_runs_folder_is_refused(tiny_run, tmp_path):
    """Started without --resume where another run left checkpoints (or only its metrics.jsonl), a run would append
    to the old log and fail at its first save (the old step_* folder in the way): it stops at once, naming the
    folder and the ways out, and leaves the old run as it was."""
    (tmp_path / "ckpt" / "step_00000002").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_00000002" / "state.json").write_text("{}")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "metrics.jsonl").write_text('{"step": 1}\n')
    for old in ("ckpt", "log"):
        message = re.escape(f"{tmp_path / old} already holds a run") + ".*--resume=True.*--out_dir"
        with pytest.raises(ValueError, match=message):
            T.main(tiny_cfg(tiny_run, tmp_path / old, max_steps=1))
    assert (tmp_path / "log" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_00000002"]


def test_skipped_eval_videos_are_reported_and_logged(tiny_run, tmp_path, capsys):
    """Held-out rows whose video does not load are skipped: the count is printed with each evaluation and logged
    as eval_skipped (not only 'held-out ... (2 videos)')."""
    T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=1, eval_data=eval_with_missing_videos(tiny_run, tmp_path)))
    out = capsys.readouterr().out
    assert "(2 videos, 2 skipped)" in out and "eval step1: 2 of 4 held-out videos skipped" in out
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["eval_skipped"] == 2


def test_a_dataset_smaller_than_a_batch_names_the_file_and_the_setting(tiny_run, tmp_path):
    train = os.path.join(tiny_run, "data", "train.jsonl")   # 16 rows
    with pytest.raises(ValueError, match=re.escape(f"{train} with --rollout_batch_size=32: 16 rows, fewer than one")):
        T.main(tiny_cfg(tiny_run, tmp_path / "a", max_steps=1, rollout_batch_size=32))
    with pytest.raises(ValueError, match=re.escape(f"{train} with --sft_batch_size=32: 16 rows, fewer than one")):
        T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=1, sft_steps=1, sft_batch_size=32))


def test_bad_sample_is_skipped_and_counted(tiny_run, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(tiny_run, "data", "train.jsonl"))]
    rows[0]["video"] = "does_not_exist.mp4"
    rows[1]["video"] = os.path.join(tmp_path, "corrupt.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"garbage" * 50)
    for r in rows[2:]:
        r["video"] = os.path.join(tiny_run, "data", r["video"])
    bad = tmp_path / "train.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    T.main(tiny_cfg(tiny_run, tmp_path / "run", data=str(bad), eval_data="", max_steps=4, rollout_batch_size=8))
    last = json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])
    assert last["skipped_samples"] >= 2  # 4 steps x 8 prompts cover all 16 rows twice


def rows_with_videos(tiny_run, broken: int, root) -> str:
    """The tiny train set as a jsonl in `root`, absolute video paths, the first `broken` rows' videos missing."""
    rows = [json.loads(line) for line in open(os.path.join(tiny_run, "data", "train.jsonl"))]
    for k, r in enumerate(rows):
        r["video"] = f"moved/{k}.mp4" if k < broken else os.path.join(tiny_run, "data", r["video"])
    path = os.path.join(root, f"train_{broken}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_missing_videos_are_refilled_and_none_loading_stops_with_the_file(tiny_run, tmp_path):
    """Half the rows' videos missing: every step still trains on rollout_batch_size groups, refilled from the
    next rows. No video at all (a jsonl whose video folder moved): a clear error naming the file and the paths,
    not `max() arg is an empty sequence` deep in rollout."""
    half = rows_with_videos(tiny_run, 8, tmp_path)
    T.main(tiny_cfg(tiny_run, tmp_path / "half", data=half, eval_data="", max_steps=3, rollout_batch_size=4))
    rows = [json.loads(line) for line in open(tmp_path / "half" / "metrics.jsonl")]
    assert all(r["groups_kept"] == 4 for r in rows) and rows[-1]["skipped_samples"] >= 4
    none = rows_with_videos(tiny_run, 16, tmp_path)
    with pytest.raises(RuntimeError, match=r"train_16.jsonl: no video loaded.*moved/\d+.mp4"):
        T.main(tiny_cfg(tiny_run, tmp_path / "none", data=none, eval_data="", max_steps=1))


class PushedWeightsEngine:
    """A stand-in for VLLMEngine on CPU (same interface): it samples with hf_generate from its OWN copy of the
    model, which only ever holds the weights pushed into it, so it sees exactly what a colocated vLLM would."""
    prompt_embeds, prompt_mismatches, pushes = False, 0, 0

    def __init__(self, model_path, *args, **kwargs):
        import vlm
        self.model, self.processor = vlm.load_model(model_path)

    def load_weights(self, named_tensors):
        self.model.load_state_dict({k: v.float() for k, v in named_tensors})
        PushedWeightsEngine.pushes += 1
        self.awake = False  # as vLLM: the weights are back, the KV cache still asleep

    def wake(self):
        self.awake = True

    def sleep(self):
        self.awake = False

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0, suppress_ids=(),
                 embeds=None):
        import rollout
        assert self.awake, "generate() on a sleeping engine"
        return rollout.hf_generate(self.model, self.processor, prompts, n, temperature, top_p, max_new_tokens, seed)


def test_engine_gets_the_warmed_up_weights_before_the_first_eval(tiny_run, tmp_path, monkeypatch):
    """The step-0 evaluation runs through the engine: it must already hold the format-warmed-up weights (on the
    lent H200 vLLM printed format 0.000 where the HF engine gave 1.000). The rollout-mismatch metrics: with the
    HF engine (the training forward samples) the ratio is 1 to float precision; the stand-in engine holds the
    pushed bf16 weights, a small real mismatch, which rollout_correction=auto measures and corrects."""
    import rollout
    monkeypatch.setattr(rollout, "VLLMEngine", PushedWeightsEngine)
    PushedWeightsEngine.pushes = 0
    # 30 warm-up steps: at 20 the greedy format sat on a tipping point (float-level changes, e.g. the tower's patch
    # embedding as a GEMM instead of a Conv3d, flipped it to 0)
    common = dict(max_steps=1, sft_steps=30, sft_lr=2e-2, sft_batch_size=8, save_every=100, eval_max_samples=8,
                  think=False)
    hf = T.main(tiny_cfg(tiny_run, tmp_path / "hf", rollout_correction="token", **common))
    engine = T.main(tiny_cfg(tiny_run, tmp_path / "vllm", engine="vllm", **common))
    assert hf["curve"][0]["format"] > 0.5  # the warm-up taught the format
    assert engine["curve"][0]["format"] > 0.5 and engine["curve"][0]["num_scored"] == 8
    assert PushedWeightsEngine.pushes == 2  # after the warm-up, after the step
    m_hf = json.loads(open(tmp_path / "hf" / "metrics.jsonl").readline())
    m = json.loads(open(tmp_path / "vllm" / "metrics.jsonl").readline())
    print({k: (m_hf[k], m[k]) for k in m if k.startswith("rollout_")})
    assert abs(m_hf["rollout_is_ratio_max"] - 1) < 1e-4 and abs(m_hf["rollout_is_ratio"] - 1) < 1e-5
    assert abs(m_hf["rollout_mismatch_kl"]) < 1e-8
    assert 1e-5 < abs(m["rollout_is_ratio"] - 1) < 1e-2 and 0 < m["rollout_mismatch_kl"] < 1e-3


def test_dapo_dynamic_sampling_drops_equal_reward_groups(tiny_run, tmp_path):
    """The untrained tiny model never produces the format, so every group has equal (zero) rewards: DAPO must
    drop them all, keep sampling up to max_sampling_tries, and train on nothing."""
    T.main(tiny_cfg(tiny_run, tmp_path / "dapo", max_steps=1, dynamic_sampling=True, max_sampling_tries=3,
                    clip_high=0.28, eval_data=""))
    m = json.loads(open(tmp_path / "dapo" / "metrics.jsonl").readline())
    assert m["reward_std"] == 0.0 and m["sampling_tries"] == 3 and m["groups_kept"] == 0
    T.main(tiny_cfg(tiny_run, tmp_path / "grpo", max_steps=1, eval_data=""))
    m = json.loads(open(tmp_path / "grpo" / "metrics.jsonl").readline())
    assert m["sampling_tries"] == 1 and m["groups_kept"] == 4  # plain GRPO keeps every group


@pytest.mark.parametrize("algo", [
    dict(kl_beta=0.05, kl_estimator="k3", ppo_epochs=2, update_batch_size=2),          # KL in the loss, 4 updates
    dict(kl_beta=0.05, kl_estimator="k1", kl_in_reward=True, adv_estimator="reinforce_pp_baseline"),
])
def test_reference_kl_and_several_updates_per_rollout(tiny_run, tmp_path, algo, monkeypatch):
    """A short format warm-up moves the policy away from the frozen reference, so the KL is non-zero; with
    several updates per rollout (or KL in the reward) the old log-probs are recomputed once a step."""
    filled = []
    def spy(policy, seqs, cfg, suppress_ids, attr, *args, **kw):
        filled.append(attr)
        return T_fill(policy, seqs, cfg, suppress_ids, attr, *args, **kw)
    T_fill = T.fill_logprobs
    monkeypatch.setattr(T, "fill_logprobs", spy)
    T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=2, eval_data="", sft_steps=4, sft_lr=1e-2,
                    sft_batch_size=8, max_new_tokens=16, **algo))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[0]["kl"] > 0
    assert filled == ["logp_ref", "logp_old"] * 2  # each step: the reference's, then the old policy's
    if algo.get("ppo_epochs", 1) > 1:
        assert rows[0]["updates"] == 4  # the step's metrics cover all 2 epochs x 2 updates


def test_resume_keeps_the_init_from_reference(tiny_run, tmp_path):
    """A run started with --init_from keeps pi_init as its KL reference after --resume (checkpoints hold no
    reference: it is re-loaded from init_from), so 1 step + resume + 1 step equals 2 steps straight."""
    T.main(tiny_cfg(tiny_run, tmp_path / "init", max_steps=1, eval_data="", sft_steps=8, sft_lr=2e-2,
                    sft_batch_size=8, save_every=1))  # a run whose weights differ from the base model's
    algo = dict(init_from=str(tmp_path / "init"), kl_beta=0.1, eval_data="", save_every=1)
    T.main(tiny_cfg(tiny_run, tmp_path / "a", max_steps=2, **algo))
    T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=1, **algo))
    T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=2, resume=True, **algo))
    straight, resumed = (metrics_without_time(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert straight == resumed and straight[1]["kl"] < 1e-6  # the policy starts at its reference


def test_two_torchrun_nodes_one_step(tiny_run, tmp_path):
    """Multi-node is plain torchrun: two 'nodes' on localhost meet through the c10d rendezvous (gloo)."""
    port = free_port()
    cfg = tiny_cfg(tiny_run, tmp_path / "nodes", max_steps=1, eval_data="", save_every=1)
    preset = write_preset(cfg, tmp_path / "preset.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=test", os.path.join(ROOT, "train_grpo.py"), str(preset)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "world 2" in outs[0]
    m = json.loads(open(tmp_path / "nodes" / "metrics.jsonl").readline())
    assert m["step"] == 1 and m["groups_kept"] == 4  # 2 prompts on each node
    assert C.latest_checkpoint(str(tmp_path / "nodes"))



def test_group_packing_step_equals_separate_rows(tiny_run, tmp_path):
    """--group_packing=True (each prompt once, its responses after it: vlm.PackedGroups) gives today's step: the
    same rollouts, reference KL, old log-probs, loss and gradient norm, over two epochs (the second off-policy).
    micro_batch_size=12 is 1.5 groups of 8: the packed run rounds it up to 16, the other splits groups."""
    common = dict(max_steps=1, eval_data="", save_every=100, sft_steps=12, sft_lr=2e-2, sft_batch_size=8, n=8,
                  temperature=1.5, max_new_tokens=16, ppo_epochs=2, kl_beta=0.1, micro_batch_size=12)
    T.main(tiny_cfg(tiny_run, tmp_path / "rows", group_packing=False, **common))
    T.main(tiny_cfg(tiny_run, tmp_path / "groups", group_packing=True, **common))
    rows, groups = [json.loads(open(tmp_path / d / "metrics.jsonl").readline()) for d in ("rows", "groups")]
    assert rows["reward"] == groups["reward"] and rows["response_len"] == groups["response_len"]
    assert rows["loss"] != 0.0 and rows["kl"] > 0.0
    for key in ("loss", "kl", "entropy", "clip_frac"):
        assert groups[key] == pytest.approx(rows[key], rel=1e-4, abs=1e-7), key
    assert groups["grad_norm"] == pytest.approx(rows["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("algo", [dict(group_packing=False),
                                  dict(group_packing=False, loss_type="gspo", gspo_clip_low=0.2, gspo_clip_high=0.2,
                                       ppo_epochs=2, rollout_correction="sequence"),
                                  dict(group_packing=True, ppo_epochs=2, kl_beta=0.1)])
def test_sp2_first_step_loss_equals_sp1(tiny_run, tmp_path, algo):
    """--sp_size=2 on 2 gloo processes (Ulysses + parallel vision encoding) gives the sp_size=1 loss; also for
    GSPO's sequence ratio and the sequence-level rollout mask, which need every token of a sequence (gathered
    from the SP peers), over two epochs (the second one off-policy)."""
    # a short format warm-up (through the SP path too) so that rewards vary and the loss is not trivially 0; the
    # warm-ups differ by float rounding between SP=1 and SP=2, which a long warm-up can amplify into other samples
    common = dict(max_steps=1, eval_data="", save_every=100, sp_split_rollout=False, sft_steps=12, sft_lr=2e-2,
                  sft_batch_size=8, n=8, temperature=1.5, max_new_tokens=16, **algo)
    T.main(tiny_cfg(tiny_run, tmp_path / "sp1", **common))
    cfg = tiny_cfg(tiny_run, tmp_path / "sp2", sp_size=2, **common)
    assert "dp 1 x sp 2" in torchrun("train_grpo.py", [write_preset(cfg, tmp_path / "sp2.py")])
    one = json.loads(open(tmp_path / "sp1" / "metrics.jsonl").readline())
    two = json.loads(open(tmp_path / "sp2" / "metrics.jsonl").readline())
    assert one["reward"] == two["reward"] and one["response_len"] == two["response_len"]  # the same rollouts
    assert one["loss"] != 0.0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    assert two["entropy"] == pytest.approx(one["entropy"], rel=1e-3)  # the log-prob distributions themselves


def test_a_cpu_run_prints_no_warning(tiny_run, tmp_path):
    """A default CPU run (format warm-up, GRPO steps, an evaluation, a checkpoint and --resume from it) raises no
    Python warning: the console shows what the run says, not library noise the project could have prevented (e.g.
    DCP's "assuming the intent is to save in a single process", transformers' cap_pixels_per_frame)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # every warning, except those the project filters itself
        T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=2, save_every=2, eval_every=2, sft_steps=2,
                        sft_batch_size=8, gradient_checkpointing=True))   # the default (tiny_cfg turns it off)
        T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=3, save_every=2, eval_every=0, resume=True))
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]


def test_profile_step_writes_a_trace_and_prints_the_top_ops(tiny_run, tmp_path, capsys):
    """--profile_step=2: torch.profiler over step 2's update only: its table of ops is printed and a Chrome trace
    of it written (the ops of the update: the optimizer's step among them)."""
    T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=2, save_every=0, profile_step=2))
    out = capsys.readouterr().out
    assert "Self CPU time total" in out and out.count("Self CPU time total") == 1
    trace = json.load(open(tmp_path / "run" / "profile_update_rank0.json"))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("Optimizer.step" in n for n in names) and any("backward" in n.lower() for n in names)


def test_uneven_held_out_batches_over_two_ranks(tiny_run, tmp_path):
    """3 held-out rows, one per greedy batch, on 2 gloo ranks: rank 0 answers 2 batches, rank 1 one; the HF
    engine under FSDP2 makes rank 1 generate a placeholder batch beside rank 0's second (before: a hang)."""
    cfg = tiny_cfg(tiny_run, tmp_path / "run", max_steps=1, save_every=0, eval_max_samples=3, eval_batch_size=1)
    out = torchrun("train_grpo.py", [write_preset(cfg, tmp_path / "run.py")], timeout=240)
    assert "(3 videos" in out


def _score_on_sp_peers(rank, world, port, out):
    import datetime
    import torch.distributed as dist
    from types import SimpleNamespace
    import sp as sp_lib
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        spi = sp_lib.init_sp(2)
        # a judge that failed on rank 1 only: its rewards differ from rank 0's for the same responses
        T.compute_rewards = lambda texts, *a, **k: {"reward": [0.1 * (1 + rank)] * len(texts),
                                                    "accuracy": [float(rank == 0)] * len(texts),
                                                    "format": [1.0] * len(texts)}
        outs = [SimpleNamespace(text="x", prompt_index=0, response_ids=[1, 2], finished=True)] * 2
        prompts = [SimpleNamespace(sample=SimpleNamespace(to_dict=dict))]
        stats = {"reward": [], "accuracy": [], "format": [], "length": [], "truncated": 0, "reward_time": 0.0}
        reward = T.score_responses(outs, prompts, T.Config(), None, None, stats, spi)
        out[rank] = (reward.tolist(), stats["reward"], stats["accuracy"])
    finally:
        dist.destroy_process_group()


def test_sp_peers_share_the_first_ranks_rewards():
    """SP peers hold the same responses but score them each on its own; a judge call that fails on one peer only
    gave them different rewards, hence different DAPO groups and micro-batches (collectives of different sizes).
    score_responses takes the SP group's first rank's scores on every peer."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_score_on_sp_peers, args=(2, free_port(), out), nprocs=2, join=True)
        assert out[0] == out[1]
        assert out[1][0] == pytest.approx([0.1, 0.1]) and out[1][2] == [1.0, 1.0]


def test_dp2_x_sp2_first_step_equals_dp2_x_sp1(tiny_run, tmp_path):
    """4 gloo processes as 2 data-parallel groups of 2 SP peers give the first step of 2 data-parallel processes
    without SP: the same rollouts, loss and gradient norm (each token counted once, on the SP peer that holds it;
    the DP all-reduces over one peer of each group)."""
    common = dict(max_steps=1, eval_data="", save_every=100, sp_split_rollout=False, sft_steps=12, sft_lr=2e-2,
                  sft_batch_size=8, n=8, temperature=1.5, max_new_tokens=16)
    rows = {}
    for name, nproc, sp in (("dp2", 2, 1), ("dp2sp2", 4, 2)):
        cfg = tiny_cfg(tiny_run, tmp_path / name, sp_size=sp, **common)
        assert f"dp 2 x sp {sp}" in torchrun("train_grpo.py", [write_preset(cfg, tmp_path / f"{name}.py")], nproc)
        rows[name] = json.loads(open(tmp_path / name / "metrics.jsonl").readline())
    one, two = rows["dp2"], rows["dp2sp2"]
    assert one["reward"] == two["reward"] and one["response_len"] == two["response_len"] and one["loss"] != 0.0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
