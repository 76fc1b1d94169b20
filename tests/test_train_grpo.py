"""
train_grpo.py: advantages, KL, losses against hand-computed values; loss normalisation across ranks and
micro-batches (FSDP2 on 2 gloo processes); resume; bad samples; DAPO; a two-"node" torchrun launch.
    python -m pytest tests/test_train_grpo.py -q
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import train_grpo as T
from conftest import ROOT, torchrun, write_preset


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
    single = T.compute_advantages(torch.tensor([[1.0], [0.0]]), "grpo")  # n = 1: no signal, and never NaN
    assert torch.equal(single, torch.zeros(2, 1))


def test_reinforce_pp_by_hand():
    token_rewards = [torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 2.0])]
    returns = [1.0, 1.0, 1.0, 2.0, 2.0]  # gamma = 1: every token gets the reward that follows it
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 5)
    adv = T.reinforce_pp_advantages(token_rewards)
    assert torch.allclose(torch.cat(adv), torch.tensor([(x - mean) / std for x in returns]), atol=1e-6)
    # baseline: subtract the group mean of the outcome (1.5) first
    base = [-0.5, -0.5, -0.5, 0.5, 0.5]
    mb = sum(base) / 5
    sb = math.sqrt(sum((x - mb) ** 2 for x in base) / 5)
    adv_b = T.reinforce_pp_advantages(token_rewards, torch.tensor([0, 0]))
    assert torch.allclose(torch.cat(adv_b), torch.tensor([(x - mb) / sb for x in base]), atol=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert T.kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert T.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert T.kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert T.kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        T.kl_penalty(logp, ref, "k4")


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
    # ratio 1: the gradient is REINFORCE's, -A * grad logp
    lp = torch.tensor([-0.3, -1.1], requires_grad=True)
    T.policy_loss(lp, lp.detach(), torch.tensor([2.0, -1.0]))[0].sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([-2.0, 1.0]))


def test_token_weights_and_overlong_by_hand():
    w = lambda mode: T.token_weights([2, 3], mode, num_tokens=5, num_seqs=2, max_len=4).tolist()
    assert w("token-mean") == pytest.approx([1 / 5] * 5)
    assert w("seq-mean-token-sum") == pytest.approx([1 / 2] * 5)
    assert w("seq-mean-token-mean") == pytest.approx([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6])
    assert w("seq-mean-token-sum-norm") == pytest.approx([1 / 8] * 5)
    shaped = T.overlong_shaping(torch.tensor([6, 8, 10]), max_len=10, buffer=4, factor=1.0)
    assert shaped.tolist() == pytest.approx([0.0, -0.5, -1.0])


# ---- the update across ranks and micro-batches -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model and a small synthetic task, shared by the tests below."""
    from data.synthetic import SyntheticConfig, make_dataset
    from data.tiny import make_tiny_model
    d = tmp_path_factory.mktemp("grpo")
    make_dataset(SyntheticConfig(out=str(d / "data"), num_train=16, num_eval=8, frames=8, fps=4.0, seed=0))
    make_tiny_model(str(d / "model"), "qwen2_5_vl", seed=0)
    return d


MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _deltas(rank, world, run_dir, micro, seqs_per_rank):
    """Parameter change of one SGD(lr=1) update on this rank's sequences, for every aggregation mode."""
    import rollout
    import vlm
    from data.datasets import load_jsonl
    cfg = T.Config(micro_batch_size=micro, max_new_tokens=12, grad_clip=1e9, num_frames=8, max_pixels=28 * 28,
                   min_pixels=28 * 28)
    d = T.Dist(rank=rank, world_size=world)
    samples = load_jsonl(os.path.join(run_dir, "data", "train.jsonl"))[:4]
    out = {}
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
        policy = T.wrap_fsdp(T.Root(model), T.vlm_units(model), d, False)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        T.update(policy, opt, mine, cfg, d, [], mine[0])
        after = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in model.state_dict().items()}
        out[mode] = {n: (after[n] - before[n]) for n in before}
    return out


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
    """1 process x 4 micro-batches == 2 gloo processes (FSDP2) x 2 micro-batches, for every aggregation."""
    single = _deltas(0, 1, str(tiny_run), micro=2, seqs_per_rank=8)
    result = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), str(tiny_run), result), nprocs=2, join=True)
    two = torch.load(result)
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
    policy = T.wrap_fsdp(T.Root(model), T.vlm_units(model), T.Dist(rank=rank, world_size=world), False)
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
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "tokens_per_s"} for r in rows]


def final_params(out_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = T.latest_checkpoint(out_dir)
    dcp_to_torch_save(path, os.path.join(out_dir, "flat.pt"))
    return torch.load(os.path.join(out_dir, "flat.pt"), weights_only=False)["model"]


def test_resume_continues_exactly(tiny_run, tmp_path):
    straight = T.main(tiny_cfg(tiny_run, tmp_path / "a", max_steps=4))
    T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=2))
    resumed = T.main(tiny_cfg(tiny_run, tmp_path / "b", max_steps=4, resume=True))
    assert metrics_without_time(tmp_path / "a" / "metrics.jsonl") == \
        metrics_without_time(tmp_path / "b" / "metrics.jsonl")
    pa, pb = final_params(str(tmp_path / "a")), final_params(str(tmp_path / "b"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert straight["after"] == resumed["after"]
    assert not os.path.exists(tmp_path / "b" / "step_00000002.tmp")


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
def test_reference_kl_and_several_updates_per_rollout(tiny_run, tmp_path, algo):
    """A short format warm-up moves the policy away from the frozen reference, so the KL is non-zero; with
    several updates per rollout the old log-probs are recomputed once and the ratio moves off 1."""
    T.main(tiny_cfg(tiny_run, tmp_path / "run", max_steps=2, eval_data="", sft_steps=4, sft_lr=1e-2,
                    sft_batch_size=8, max_new_tokens=16, **algo))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[0]["kl"] > 0
    if algo.get("ppo_epochs", 1) > 1:
        assert rows[0]["time_logprobs"] > 0  # old log-probs were computed before the first update


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
    assert T.latest_checkpoint(str(tmp_path / "nodes"))


def test_sp2_first_step_loss_equals_sp1(tiny_run, tmp_path):
    """--sp_size=2 on 2 gloo processes (Ulysses + parallel vision encoding) gives the sp_size=1 loss."""
    # a short format warm-up (through the SP path too) so that rewards vary and the loss is not trivially 0; the
    # warm-ups differ by float rounding between SP=1 and SP=2, which a long warm-up can amplify into other samples
    common = dict(max_steps=1, eval_data="", save_every=100, sp_split_rollout=False, sft_steps=12, sft_lr=2e-2,
                  sft_batch_size=8, n=8, temperature=1.5, max_new_tokens=16)
    T.main(tiny_cfg(tiny_run, tmp_path / "sp1", **common))
    cfg = tiny_cfg(tiny_run, tmp_path / "sp2", sp_size=2, **common)
    assert "dp 1 x sp 2" in torchrun("train_grpo.py", [write_preset(cfg, tmp_path / "sp2.py")])
    one = json.loads(open(tmp_path / "sp1" / "metrics.jsonl").readline())
    two = json.loads(open(tmp_path / "sp2" / "metrics.jsonl").readline())
    assert one["reward"] == two["reward"] and one["response_len"] == two["response_len"]  # the same rollouts
    assert one["loss"] != 0.0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
