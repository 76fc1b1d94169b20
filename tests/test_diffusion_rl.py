"""
Flow-GRPO (train_diffusion_rl.py) on tiny diffusers pipelines built from configs; CPU, no downloads.

    pytest -q tests/test_diffusion_rl.py
"""
import glob
import json
import math
import os

import pytest
import torch

from configurator import parse_config
from train_diffusion_rl import (TINY_SD3, TINY_WAN, Config, bench_step, compute_advantages, embedder, flow_grpo_loss,
                                latent_shape, load_pipeline, main, make_reward_fn, make_tiny_pipeline, sample, schedule,
                                sde_std, sde_step, tiny_tokenizer)
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


def test_resume_equals_uninterrupted(tiny, tmp_path):
    common = dict(kind="sd3", model=tiny["sd3"], sde_window_size=2, sde_window_range=(0, 8), updates_per_step=2,
                  **{**TINY, "num_steps": 8})
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


def test_bench_step_runs_on_tiny_shapes(capsys):  # the GPU benchmark's code path, with tiny shapes on CPU
    bench_step(Config(kind="sd3", height=32, width=32, max_sequence_length=8, sample_batch_size=2, train_batch_size=1,
                      num_steps=3, lora_rank=4), TINY_SD3)
    bench_step(Config(kind="wan", height=32, width=32, num_frames=5, max_sequence_length=8, sample_batch_size=2,
                      train_batch_size=1, num_steps=3), TINY_WAN)
    assert capsys.readouterr().out.count("AdamW") == 4  # warm-up + timed, for each kind
