"""
Flow-GRPO (train_diffusion_rl.py) on tiny diffusers pipelines built from configs; CPU, no downloads.

    pytest -q tests/test_diffusion_rl.py
"""
import glob
import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from configurator import parse_config
from conftest import torchrun, write_preset
from train_diffusion_rl import (TINY_SD3, TINY_WAN, Config, bench_step, check_config, compute_advantages, embedder,
                                evaluate, flow_grpo_loss, latent_shape, load_pipeline, main, make_reward_fn,
                                make_tiny_pipeline, read_prompts, sample, schedule, sde_std, sde_step, tiny_tokenizer)
from train_grpo import Dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(height=32, width=32, num_frames=5, max_sequence_length=8, num_steps=4, prompts_per_step=2, group_size=2,
            sample_batch_size=4, train_batch_size=2, eval_every=0, ckpt_every=1000, lr=1e-2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {k: make_tiny_pipeline(str(root / k), k) for k in ("sd3", "wan")}


def test_sde_step_matches_formula():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sigmas, _ = schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    torch.manual_seed(0)
    x, v, x_next = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    for i in (0, 4, 9):
        s, s2, eta = sigmas[i], sigmas[i + 1], 0.7
        std = eta * math.sqrt(s / (1 - (sigmas[1] if i == 0 else s)))  # guard: sigma == 1 uses sigmas[1]
        assert math.isfinite(sde_std(sigmas, i, eta, "sd3")) and sde_std(sigmas, i, eta, "sd3") == pytest.approx(std)
        dt = s2 - s
        mean = x + (v + std**2 / (2 * s) * (x + (1 - s) * v)) * dt  # the paper's form of the same mean
        sd = std * math.sqrt(-dt)
        logp = (-(x_next - mean) ** 2 / (2 * sd**2) - math.log(sd) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3))
        ref = torch.distributions.Normal(mean, sd).log_prob(x_next).mean((1, 2, 3))
        _, got_logp, got_mean = sde_step(x, v, s, s2, std, x_next)
        torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_logp, logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_logp, ref, rtol=1e-5, atol=1e-5)
        torch.manual_seed(1)
        drawn, _, _ = sde_step(x, v, s, s2, std)  # sampling: x_next = mean + std sqrt(-dt) eps
        torch.manual_seed(1)
        torch.testing.assert_close(drawn, mean + sd * torch.randn(x.shape), rtol=1e-5, atol=1e-5)
    assert sde_std(sigmas, 3, 0.7, "wan") == pytest.approx(sigmas[1] * sigmas[3])  # Wan: sigmas[1] * sigma
    assert sde_std(sigmas, 3, 0.0, "sd3") == 0
    ode, _, _ = sde_step(x, v, sigmas[2], sigmas[3], 0.0)  # eta = 0: Euler x + v dt
    torch.testing.assert_close(ode, x + v * (sigmas[3] - sigmas[2]))


@pytest.mark.parametrize("kind", ["sd3", "wan"])
def test_training_logprob_equals_sampling_logprob(tiny, kind):
    cfg = Config(kind=kind, lora_rank=4 if kind == "sd3" else 0, beta=0.01, **TINY)
    pipe, transformer, ref = load_pipeline(tiny[kind], cfg, Dist())
    embed, shape = embedder(pipe, cfg, "cpu"), latent_shape(pipe, cfg)
    sigmas, timesteps = schedule(pipe.scheduler, cfg.num_steps)
    cond, uncond = embed(["a photo of a cat in the snow", "a dog"] * 2), embed([""])
    xs, logps = sample(transformer, cond, uncond, torch.randn(4, *shape), sigmas, timesteps, cfg, range(4))
    assert xs.shape == (4, 5, *shape) and logps.shape == (4, 4) and len(shape) == (3 if kind == "sd3" else 4)
    for j in range(3):
        for mb in (slice(0, 2), slice(2, 4)):  # training micro-batches differ from the sampling batch
            _, st = flow_grpo_loss(transformer, ref, xs[mb, j], xs[mb, j + 1], logps[mb, j], torch.ones(2), j,
                                   {k: c[mb] for k, c in cond.items()}, uncond, sigmas, timesteps, cfg)
            assert abs(st["ratio_min"] - 1) < 1e-5 and abs(st["ratio_max"] - 1) < 1e-5
            assert st["kl"] == pytest.approx(0.0, abs=1e-10)  # policy == reference before any update


@pytest.mark.parametrize("kind", ["sd3", "wan"])
def test_update_changes_only_trained_params(tiny, kind, tmp_path):
    lora = 4 if kind == "sd3" else 0  # image: LoRA (+ KL under disable_adapter); video: full (+ KL to a frozen copy)
    cfg = Config(kind=kind, model=tiny[kind], out_dir=str(tmp_path), lora_rank=lora, beta=0.01, max_steps=1, **TINY)
    pipe, _ = main(cfg)
    from diffusers import DiffusionPipeline
    before = DiffusionPipeline.from_pretrained(tiny[kind])
    for name in ("transformer", "vae", "text_encoder"):
        old = dict(getattr(before, name).named_parameters())
        for n, p in getattr(pipe, name).named_parameters():
            trained = name == "transformer" and (not lora or "lora_" in n)
            assert p.requires_grad == trained, n
            if not trained:
                torch.testing.assert_close(p.detach(), old[n.replace(".base_layer", "")], rtol=0, atol=0, msg=n)
        changed = [n for n, p in getattr(pipe, name).named_parameters()
                   if "lora_" not in n and not torch.equal(p.detach(), old[n.replace(".base_layer", "")])]
        assert changed == [] if (lora or name != "transformer") else len(changed) > 0.5 * len(old)
    if lora:  # lora_B starts at 0 (gaussian init) and must have moved
        assert any(p.abs().sum() > 0 for n, p in pipe.transformer.named_parameters() if "lora_B" in n)


def test_advantages_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    std_all = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 3 * (4 - 3) ** 2) / 6)  # mean of all = 3, ddof 0
    a = 1 / (std_all + 1e-4)
    torch.testing.assert_close(compute_advantages(r, True, 5.0), torch.tensor([[-a, 0, a], [0, 0, 0]]))
    g = 1 / (math.sqrt(2 / 3) + 1e-4)  # row 0: std sqrt(2/3); row 1: std 0 -> 0 / 1e-4 = 0
    torch.testing.assert_close(compute_advantages(r, False, 5.0), torch.tensor([[-g, 0, g], [0, 0, 0]]))
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # mean 1/4, std sqrt(3)/4: A = -1/sqrt(3) x3, sqrt(3) -> clipped to 1
    s = math.sqrt(3) / 4 + 1e-4
    torch.testing.assert_close(compute_advantages(r, False, 1.0), torch.tensor([[-0.25 / s] * 3 + [1.0]]))


def test_advantages_leave_out_nonfinite_rewards():
    """A NaN / inf reward (a failed or broken score) gets advantage 0 and is left out of its group's mean and std
    (and of the global std): the other samples get what they would get without it."""
    r = torch.tensor([[1.0, float("nan"), 3.0, 2.0], [4.0, 5.0, float("inf"), 6.0]])
    for global_std in (True, False):
        a = compute_advantages(r, global_std, 5.0)
        ok = torch.isfinite(r)
        assert (a[~ok] == 0).all() and torch.isfinite(a).all()
        want = compute_advantages(r[ok].view(2, 3), global_std, 5.0)  # the same rows without the bad rewards
        torch.testing.assert_close(a[ok].view(2, 3), want)
    assert (compute_advantages(torch.full((2, 3), float("nan")), True, 5.0) == 0).all()


def test_resume_equals_uninterrupted(tiny, tmp_path):
    # 3 training prompts, 2 a step: every step after the stop repeats a prompt of the steps before it, so a prompt's
    # text embedding must not depend on the batch (or the history) it was first encoded in
    (tmp_path / "prompts.txt").write_text("a photo of a cat in the snow\na photo of a dog on a beach\n"
                                          "a photo of a fox in a city\n")
    common = dict(kind="sd3", model=tiny["sd3"], sde_window_size=2, sde_window_range=(0, 8), updates_per_step=2,
                  prompts=str(tmp_path / "prompts.txt"), **{**TINY, "num_steps": 8})
    _, t3 = main(Config(out_dir=str(tmp_path / "a"), max_steps=3, **common))
    _, t2 = main(Config(out_dir=str(tmp_path / "b"), max_steps=2, **common))
    p2 = {n: p.detach().clone() for n, p in t2.named_parameters()}
    assert len(glob.glob(str(tmp_path / "b" / "step_00000002"))) == 1
    _, t2r = main(Config(out_dir=str(tmp_path / "b"), max_steps=3, resume=True, **common))
    for n, p in t3.named_parameters():
        torch.testing.assert_close(p, dict(t2r.named_parameters())[n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(p.detach(), p2[n]) for n, p in t3.named_parameters())  # step 3 did change something
    logs = [[json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")] for r in "ab"]
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith("t_")}  # noqa: E731  (timings differ)
    assert [drop(m) for m in logs[0]] == [drop(m) for m in logs[1]]  # same prompts, noise, window, rewards, ratios


def test_resume_drops_rows_logged_after_the_checkpoint(tiny, tmp_path):
    """A run stopped after logging step 3 but before saving it resumes from step 2: step 3 is logged once."""
    cfg = Config(kind="sd3", model=tiny["sd3"], out_dir=str(tmp_path), max_steps=3, **{**TINY, "ckpt_every": 2})
    main(cfg)
    shutil.rmtree(tmp_path / "step_00000003")  # the stop: step 3's row is in metrics.jsonl, its checkpoint is not
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # and a row cut short by the stop
    main(replace(cfg, resume=True))
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_old_out_dir_refused(tiny, tmp_path):
    """Without --resume, a folder that holds a run's metrics.jsonl or checkpoints is refused before any work."""
    cfg = Config(kind="sd3", model=tiny["sd3"], out_dir=str(tmp_path / "a"), max_steps=1, **TINY)
    os.makedirs(cfg.out_dir)
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    with pytest.raises(ValueError, match="already holds a run"):
        main(cfg)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == '{"step": 1, "reward_mean": 0.5}\n'  # untouched
    os.makedirs(tmp_path / "b" / "step_00000001")
    with pytest.raises(ValueError, match="already holds a run"):
        main(replace(cfg, out_dir=str(tmp_path / "b")))
    assert os.listdir(tmp_path / "b") == ["step_00000001"]  # nothing written


def test_prompt_files_checked(tmp_path):
    """Prompt files are read as UTF-8; empty lists, too few prompts and undecodable files are errors naming the
    file and the setting; --eval_prompts works alone, and without it the eval uses the built-in held-out prompts."""
    builtin_train, builtin_held = read_prompts(Config())
    assert len(builtin_held) == 16 and not set(builtin_train) & set(builtin_held)
    f = {name: tmp_path / f"{name}.txt" for name in ("empty", "blank", "latin", "two", "eight", "held")}
    f["empty"].write_text("")
    f["blank"].write_text("\n  \n\n")
    f["latin"].write_bytes("a photo of a caf\xe9\n".encode("latin-1"))
    f["two"].write_text("a photo of a cat\na photo of a dog\n")
    f["eight"].write_text("".join(f"a photo of a {a} on a hill\n" for a in "cat dog fox owl horse rabbit bear deer"
                                  .split()))
    f["held"].write_text("a photo of a lion on a beach\n\na photo of a tiger by a lake\n")
    for field in ("prompts", "eval_prompts"):
        for name, match in (("empty", "no prompts"), ("blank", "no prompts"), ("latin", "not UTF-8")):
            with pytest.raises(ValueError, match=match) as e:
                read_prompts(Config(**{field: str(f[name])}))
            assert str(f[name]) in str(e.value) and f"--{field}" in str(e.value)
    with pytest.raises(ValueError, match="prompts_per_step=8") as e:
        read_prompts(Config(prompts=str(f["two"]), prompts_per_step=8))
    assert str(f["two"]) in str(e.value)
    train, held = read_prompts(Config(prompts=str(f["eight"])))  # --prompts alone: the built-in held-out prompts
    assert len(train) == 8 and held == builtin_held
    train, held = read_prompts(Config(eval_prompts=str(f["held"])))  # --eval_prompts alone is honoured
    assert train == builtin_train and held == ["a photo of a lion on a beach", "a photo of a tiger by a lake"]


def test_bad_rewards_and_gradients_skipped(tiny, tmp_path, monkeypatch, capsys):
    """Step 1: one reward is NaN; step 2: the reward function raises on one batch; step 3: the loss is NaN. The run
    goes on with finite weights: those samples get advantage 0 (counted in reward_skipped), the step with a
    non-finite gradient norm skips its update (updates_skipped)."""
    import train_diffusion_rl as T
    calls, make, loss = [], T.make_reward_fn, T.flow_grpo_loss

    def make_reward_fn(cfg, device):
        fn = make(cfg, device)

        def reward_fn(images, prompts):
            calls.append(len(prompts))
            if len(calls) == 3:  # step 2, its first batch of 2
                raise RuntimeError("reward server down")
            r = fn(images, prompts)
            return torch.cat([torch.tensor([float("nan")]), r[1:]]) if len(calls) == 1 else r
        return reward_fn

    def flow_grpo_loss(*args):
        out, st = loss(*args)
        return (out * float("nan"), st) if len(calls) >= 5 else (out, st)  # step 3: NaN loss -> NaN gradient
    monkeypatch.setattr(T, "make_reward_fn", make_reward_fn)
    monkeypatch.setattr(T, "flow_grpo_loss", flow_grpo_loss)
    cfg = Config(kind="sd3", model=tiny["sd3"], out_dir=str(tmp_path), max_steps=3,
                 **{**TINY, "sample_batch_size": 2, "ckpt_every": 1})
    _, transformer = main(cfg)
    assert all(torch.isfinite(p).all() for p in transformer.parameters())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["reward_skipped"] for r in rows] == [1, 2, 0] and [r["updates_skipped"] for r in rows] == [0, 0, 1]
    assert all(math.isfinite(r["reward_mean"]) for r in rows)
    out = capsys.readouterr().out
    assert "reward server down" in out and "2 samples" in out
    assert len(glob.glob(str(tmp_path / "step_0000000[23]"))) == 2  # checkpoints go on being written


def test_nonfinite_weights_never_checkpointed(tiny, tmp_path, monkeypatch):
    import train_diffusion_rl as T
    steps, train_round = [], T.train_round

    def corrupt_at_step_2(transformer, *args):
        out = train_round(transformer, *args)
        steps.append(1)
        if len(steps) == 2:
            next(p for p in transformer.parameters() if p.requires_grad).data.fill_(float("nan"))
        return out
    monkeypatch.setattr(T, "train_round", corrupt_at_step_2)
    cfg = Config(kind="sd3", model=tiny["sd3"], out_dir=str(tmp_path), max_steps=3, **{**TINY, "ckpt_every": 1})
    with pytest.raises(RuntimeError, match="non-finite weights"):
        main(cfg)
    assert sorted(os.listdir(tmp_path / "step_00000001")) and not os.path.exists(tmp_path / "step_00000002")


@pytest.mark.parametrize("bad, field", [
    (dict(kind="image"), "kind"),
    (dict(sde_window_size=2, sde_window_range=(-1, 3)), "sde_window_range"),
    (dict(sde_window_size=2, sde_window_range=(0, 6)), "sde_window_range"),  # hi > num_steps = 4
    (dict(sde_window_size=3, sde_window_range=(2, 4)), "sde_window_size"),  # the window does not fit
    (dict(num_steps=1), "timestep_fraction"),  # int(1 * 0.99) = 0 trained steps
    (dict(timestep_fraction=0.0), "timestep_fraction"),
    (dict(sample_batch_size=3), "sample_batch_size"),  # 4 samples per rank
    (dict(train_batch_size=3), "train_batch_size"),
    (dict(prompts_per_step=0), "prompts_per_step"),
    (dict(eta=0.0), "eta"),
    (dict(group_size=1, sample_batch_size=2, train_batch_size=2), "group_size"),
    (dict(ckpt_every=-1), "ckpt_every"),
    (dict(eval_every=1, num_eval_prompts=0), "num_eval_prompts"),
])
def test_bad_config_refused_at_start(tiny, tmp_path, bad, field):
    cfg = Config(model=tiny["sd3"], out_dir=str(tmp_path / "run"), max_steps=1, **{**TINY, "kind": "sd3", **bad})
    with pytest.raises(ValueError, match=f"--{field}="):
        main(cfg)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_ckpt_every_0_saves_only_at_the_end(tiny, tmp_path):
    main(Config(kind="sd3", model=tiny["sd3"], out_dir=str(tmp_path), max_steps=2, **{**TINY, "ckpt_every": 0}))
    assert sorted(glob.glob(str(tmp_path / "step_*"))) == [str(tmp_path / "step_00000002")]


def test_rewards_and_clip_loader(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    red, white, blue = (torch.zeros(1, 3, 8, 8) for _ in range(3))
    red[:, 0], white[:] = 1, 1
    blue[:, 2] = 1
    imgs = torch.cat([red, white, blue])
    fn = make_reward_fn(Config(reward="redness"), "cpu")
    torch.testing.assert_close(fn(imgs, [""] * 3), torch.tensor([1.0, 0.0, -0.5]))
    video = torch.rand(2, 3, 3, 8, 8)  # (B, F, 3, H, W): a video scores the mean of its frames
    torch.testing.assert_close(fn(video, ["a", "b"]), fn(video.flatten(0, 1), ["a"] * 6).view(2, 3).mean(1))
    jpeg = make_reward_fn(Config(reward="jpeg"), "cpu")
    assert jpeg(white, [""]) > jpeg(torch.rand(1, 3, 8, 8), [""])  # a flat image compresses better than noise
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=1000, max_position_embeddings=77,
                                          bos_token_id=0, pad_token_id=1, eos_token_id=2),
                         vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=16, patch_size=8),
                         projection_dim=16)).save_pretrained(tmp_path / "clip")
    tiny_tokenizer(77).save_pretrained(tmp_path / "clip")
    dims = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    torch.save({f"layers.{i}.{k}": (torch.randn(o, n) if k == "weight" else torch.randn(o))
                for i, (n, o) in zip((0, 2, 4, 6, 7), dims) for k in ("weight", "bias")}, tmp_path / "head.pth")
    prompts = ["a photo of a cat in the snow", "a dog", "a fox on a hill"]
    clip = make_reward_fn(Config(reward="clip", reward_model=str(tmp_path / "clip")), "cpu")(imgs, prompts)
    assert clip.shape == (3,) and clip.abs().max() <= 1 + 1e-5 and len(set(clip.tolist())) == 3
    aes = make_reward_fn(Config(reward="aesthetic", reward_model=str(tmp_path / "clip"),
                                aesthetic_head=str(tmp_path / "head.pth")), "cpu")(imgs, prompts)
    assert aes.shape == (3,) and torch.isfinite(aes).all()


@pytest.mark.parametrize("preset", ["tiny_image_cpu", "tiny_video_cpu", "sd3_5_medium_flow_grpo", "wan2_1_flow_grpo"])
def test_presets_parse(preset):
    cfg = parse_config(Config, [os.path.join(ROOT, "config", preset + ".py")])
    world = 1 if preset.endswith("cpu") else 8
    n = cfg.prompts_per_step // world * cfg.group_size  # samples per rank
    assert n % cfg.sample_batch_size == 0 and n % (cfg.updates_per_step * cfg.train_batch_size) == 0
    check_config(cfg, world)  # and the start-up checks pass


def test_bench_step_runs_on_tiny_shapes(capsys):  # the GPU benchmark's code path, with tiny shapes on CPU
    bench_step(Config(kind="sd3", height=32, width=32, max_sequence_length=8, sample_batch_size=2, train_batch_size=1,
                      num_steps=3, lora_rank=4), TINY_SD3)
    bench_step(Config(kind="wan", height=32, width=32, num_frames=5, max_sequence_length=8, sample_batch_size=2,
                      train_batch_size=1, num_steps=3), TINY_WAN)
    assert capsys.readouterr().out.count("AdamW") == 4  # warm-up + timed, for each kind


# ---- 2 gloo ranks (torchrun): the eval over an uneven prompt list, one Fast window per step, global loss stats ----

PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import train_diffusion_rl as T
from common import exit_distributed
from configurator import parse_config
seen, sample, loss = {{"windows": [], "stats": []}}, T.sample, T.flow_grpo_loss
def record_window(*args, **kwargs):
    sde_js = kwargs.get("sde_js", args[-1])
    if len(sde_js):  # training rounds (the eval samples with the ODE: no SDE steps)
        seen["windows"].append(list(sde_js))
    return sample(*args, **kwargs)
def record_stats(*args):
    out = loss(*args)
    seen["stats"].append(out[1])
    return out
T.sample, T.flow_grpo_loss = record_window, record_stats
cfg = parse_config(T.Config, sys.argv[1:])
T.main(cfg)
json.dump(seen, open(os.path.join(cfg.out_dir, "probe_rank" + os.environ["RANK"] + ".json"), "w"))
exit_distributed()
"""


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    """2 gloo ranks, Flow-GRPO-Fast (a 2-step window in 4 steps), 2 updates a step (the second off-policy, so the
    ratios differ by rank), 3 held-out prompts for 2 ranks (num_eval_prompts=4 > 3)."""
    d = tmp_path_factory.mktemp("two_ranks")
    (d / "eval.txt").write_text("a photo of a cat in the snow\na photo of a dog on a beach\n"
                                "a photo of a fox in a city\n")
    (d / "probe.py").write_text(PROBE.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    cfg = Config(kind="sd3", model=tiny["sd3"], out_dir=str(d / "run"), max_steps=2, sde_window_size=2,
                 sde_window_range=(0, 4), updates_per_step=2, eval_prompts=str(d / "eval.txt"), num_eval_prompts=4,
                 **{**TINY, "sample_batch_size": 2, "train_batch_size": 1, "eval_every": 2, "eval_num_steps": 4})
    torchrun(str(d / "probe.py"), [write_preset(cfg, d / "preset.py")])
    probes = [json.load(open(d / "run" / f"probe_rank{r}.json")) for r in (0, 1)]
    return cfg, [json.loads(line) for line in open(d / "run" / "metrics.jsonl")], probes


def test_eval_over_ranks_with_uneven_prompts(tiny, two_ranks, tmp_path):
    """3 held-out prompts on 2 ranks: every rank runs the same sampling batches, the reward is the mean over the 3
    prompts, and the grid holds all 3 images in prompt order: both as one process computes them."""
    cfg, rows, _ = two_ranks
    prompts = ["a photo of a cat in the snow", "a photo of a dog on a beach", "a photo of a fox in a city"]
    pipe, transformer, _ = load_pipeline(tiny["sd3"], cfg, Dist())  # the step-0 weights
    embed = embedder(pipe, cfg, "cpu")
    want = evaluate(pipe, transformer, prompts, embed, embed([""]), make_reward_fn(cfg, "cpu"),
                    latent_shape(pipe, cfg), cfg, Dist(), str(tmp_path / "one.png"))
    assert rows[0]["step"] == 0 and rows[0]["eval_reward"] == pytest.approx(want, abs=1e-6)
    from PIL import Image
    two, one = (torch.tensor(np.array(Image.open(f))) for f in (os.path.join(cfg.out_dir, "eval_000000.png"),
                                                                   tmp_path / "one.png"))
    assert two.shape == one.shape == (32 + 4, 3 * (32 + 2) + 2, 3)  # 3 images in a row, 2-pixel padding
    assert (two.int() - one.int()).abs().max() <= 1
    assert "eval_reward" in rows[-1] and rows[-1]["step"] == cfg.max_steps


def test_fast_window_and_loss_stats_are_global(two_ranks):
    """Every rank samples with the same SDE window (drawn once per step for all samples), and the logged window,
    loss and ratio stats are those of all ranks' micro-steps (means; ratio extremes over all), as reward_mean is."""
    cfg, rows, probes = two_ranks
    steps = [r for r in rows if "policy_loss" in r]
    assert len(steps) == cfg.max_steps
    windows = [p["windows"] for p in probes]  # one sampling batch a step here
    assert windows[0] == windows[1] and [[w[0], w[-1]] for w in windows[0]] == [r["sde_window"] for r in steps]
    n = len(probes[0]["stats"]) // cfg.max_steps  # micro-steps a step, on each rank
    for i, row in enumerate(steps):
        stats = [st for p in probes for st in p["stats"][i * n:(i + 1) * n]]
        for k in ("clipfrac", "ratio_mean", "approx_kl", "policy_loss", "kl"):
            assert row[k] == pytest.approx(sum(st[k] for st in stats) / len(stats), rel=1e-6, abs=1e-12), k
        assert row["ratio_min"] == min(st["ratio_min"] for st in stats)
        assert row["ratio_max"] == max(st["ratio_max"] for st in stats)
    local = [[st["policy_loss"] for st in p["stats"]] for p in probes]
    assert local[0] != local[1]  # the ranks' own values differ: the check above means something
