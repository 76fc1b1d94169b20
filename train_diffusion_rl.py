"""
Flow-GRPO: RL for flow-matching image/video diffusion models (SD3/SD3.5, Wan2.1) as one explicit loop.
Re-creates yifan123/flow_grpo (scripts/train_sd3.py, train_wan2_1.py, diffusers_patch/sd3_sde_with_logprob.py),
which Long-RL runs inside verl (verl/workers/diffusion_helper.py, dp_actor.py `update_policy_diffusion`).

    python train_diffusion_rl.py config/tiny_image_cpu.py       # CPU demo: tiny SD3 built from configs, redness
    python train_diffusion_rl.py config/tiny_video_cpu.py       # tiny Wan2.1, 9-frame clips: a smoke run
    torchrun --standalone --nproc_per_node=8 train_diffusion_rl.py config/sd3_5_medium_flow_grpo.py --model=/ckpt/sd35m
    torchrun --standalone --nproc_per_node=8 train_diffusion_rl.py config/wan2_1_flow_grpo.py --model=/ckpt/wan2.1-1.3b
    python train_diffusion_rl.py config/sd3_5_medium_flow_grpo.py --bench   # 1 GPU: time one step, random init
    python train_diffusion_rl.py --help                                      # every config field

One step: G samples per prompt with the SDE sampler (latents + per-step log-probs stored) -> rewards -> advantages
(r - group mean) / (std + 1e-4) -> per trained timestep: recompute the log-prob with the current transformer,
clipped-ratio loss (+ beta KL to the reference), backward -> AdamW step(s) -> log, eval, checkpoint.
Deliberate deviations: follow Flow-GRPO, not Long-RL (which resets the scheduler inside every SDE step, trains only
step 0, uses one group per batch); CFG is one forward on cat[uncond, cond] for Wan too (upstream: two passes);
`updates_per_step` optimizer steps per sampling round (upstream 2: the second is off-policy, where the ratio clip
acts; our demo uses 1); no EMA; the Fast window is drawn once per step for all samples (every rank the same
one); eval is an Euler ODE. A reward that fails or is not finite costs only its samples (advantage 0, counted in
`reward_skipped`), a non-finite gradient norm only its update (`updates_skipped`); non-finite weights are never saved.
Expected (CPU demo, seed 0): held-out redness (40-step ODE, 16 prompts) -0.011 -> 0.238 in 85 s on 2 idle cores
(seeds 1, 2: -0.010 -> 0.240 / 0.239); grid: runs/diffusion_tiny_image/before_after.png (top before, bottom after).
"""
import copy
import io
import json
import math
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torchvision.io import read_image
from torchvision.utils import save_image
from tqdm import tqdm
from transformers import (AutoTokenizer, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection,
                          PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel)

from common import (Dist, all_reduce, barrier, finite, init_distributed, keep_metrics_until, latest_checkpoint,
                    load_checkpoint, print0, refuse_old_run, save_checkpoint, wrap_fsdp)
from configurator import parse_config, print_config


@dataclass
class Config:
    # I/O
    out_dir: str = "runs/diffusion_tiny_image"  # run dir: checkpoints, metrics.jsonl, eval grids
    model: str = ""  # diffusers pipeline folder (from_pretrained); "" = build the tiny one into out_dir
    kind: str = "sd3"  # sd3 (StableDiffusion3Pipeline, images) | wan (WanPipeline, videos)
    prompts: str = ""  # training prompts, one a line; "" = built-in synthetic prompts
    eval_prompts: str = ""  # held-out prompts, one a line; "" = built-in held-out prompts
    num_eval_prompts: int = 16  # held-out prompts used per eval (the first ones of the list; any number of ranks)
    # sampling
    height: int = 32  # pixels
    width: int = 32  # pixels
    num_frames: int = 9  # wan only: 4k+1 frames
    max_sequence_length: int = 128  # T5 tokens (SD3 128, Wan 512)
    num_steps: int = 10  # SDE sampling steps for training (Flow-GRPO 10; Wan 20)
    eval_num_steps: int = 40  # Euler ODE steps at eval (eta = 0)
    eta: float = 0.7  # SD3 SDE noise level a in sigma_t = a*sqrt(sigma/(1-sigma)); Wan uses sigmas[1]*sigma; > 0
    guidance_scale: float = 4.5  # CFG weight at sampling AND training (<= 1: no CFG)
    sde_window_size: int = 0  # Flow-GRPO-Fast: SDE only in a random window of this many steps, ODE elsewhere; 0 = off
    sde_window_range: tuple = (0, 5)  # the window lies inside steps [lo, hi): 0 <= lo, lo + size <= hi <= num_steps
    # GRPO
    prompts_per_step: int = 8  # distinct prompts per step, over all ranks (multiple of the world size)
    group_size: int = 8  # samples per prompt (G, >= 2); Flow-GRPO 16-24 (SD3), 4 (Wan)
    sample_batch_size: int = 64  # per-rank samples per sampling forward (x2 with CFG)
    train_batch_size: int = 64  # per-rank samples per training micro-batch
    updates_per_step: int = 1  # optimizer steps per sampling round; all but the first are off-policy (ratio clip acts)
    timestep_fraction: float = 0.99  # train the first int(T*fraction) SDE steps: 0..T-2 (the sharp last one skipped)
    clip_range: float = 1e-4  # PPO ratio clip eps (SD3 1e-4, Wan 1e-3, Fast 1e-5)
    adv_clip_max: float = 5.0  # advantages clipped to [-x, x]
    global_std: bool = True  # advantage std over all rewards of the step (SD3) vs per group (Wan)
    beta: float = 0.0  # KL weight to the reference (0.01-0.04 SD3, 0.004 Wan); 0 = no reference model
    reward: str = "redness"  # redness | brightness | jpeg | clip | aesthetic
    reward_model: str = ""  # CLIP folder (CLIPModel.from_pretrained) for reward=clip|aesthetic
    aesthetic_head: str = ""  # state-dict file of the LAION aesthetic MLP (on CLIP image embeddings)
    # model + optim
    lora_rank: int = 0  # 0 = train the full transformer; >0 = peft LoRA (Flow-GRPO r=32)
    lora_alpha: int = 64  # LoRA alpha
    lr: float = 3e-4  # AdamW learning rate (Flow-GRPO LoRA 3e-4; Wan 1e-4)
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # max grad norm
    max_steps: int = 200  # RL steps (one sampling round + one optimizer step each)
    # system
    seed: int = 0  # everything random derives from it (rank-offset)
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False  # bf16 compute (FSDP2 mixed precision, frozen encoders/VAE in bf16); fp32 master weights
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward
    eval_every: int = 50  # steps between held-out evals (also at step 0 and the end); 0 = never
    ckpt_every: int = 50  # steps between checkpoints (also at the end); 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in out_dir
    bench: bool = False  # time one step of a random-init SD3.5-medium / Wan2.1-1.3B-shaped transformer (GPU), exit


# ----------------------------------------------------------------------------------------------------------
# transformer shapes: tiny ones (tests, CPU demo; notes/flow-grpo.md section 5) and the real ones (bench_step)

TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))  # 90k params
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=64, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # 29k params
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))  # stabilityai/stable-diffusion-3.5-medium, 2.5B
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                  text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # Wan2.1-T2V-1.3B-Diffusers
ANIMALS = "cat dog fox owl horse rabbit bear deer duck frog lion tiger".split()
PLACES = ["in a forest", "on a beach", "in the snow", "in a city", "on a hill", "by a lake"]
PROMPTS = [f"a photo of a {a} {p}" for a in ANIMALS for p in PLACES]  # 72 built-in prompts; a fixed 16 held out


def tiny_tokenizer(max_len: int):
    """WordLevel tokenizer over the built-in prompts' words, <s> ... </s> added (no tokenizer files offline)."""
    words = sorted({w for p in PROMPTS for w in p.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + words)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_len)


def make_tiny_pipeline(out_dir: str, kind: str = "sd3") -> str:
    """Tiny random (seed 0) StableDiffusion3Pipeline / WanPipeline, save_pretrained'd: loads by path like a real one."""
    import diffusers as D  # late: diffusers is optional (Flow-GRPO only; the module imports without it)
    t5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=8)
    clip = dict(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                vocab_size=1000, bos_token_id=0, pad_token_id=1, eos_token_id=2, max_position_embeddings=77)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "sd3":  # CLIP outputs (32+32) are zero-padded to T5's 64 = joint_attention_dim; pooled 32+32 = 64
            vae = D.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                  scaling_factor=1.5035)  # x2 spatial
            pipe = D.StableDiffusion3Pipeline(
                transformer=D.SD3Transformer2DModel(**TINY_SD3), scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=vae, text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=tiny_tokenizer(16),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=tiny_tokenizer(16),
                text_encoder_3=T5EncoderModel(T5Config(**t5)), tokenizer_3=tiny_tokenizer(512))
        else:
            pipe = D.WanPipeline(
                transformer=D.WanTransformer3DModel(**TINY_WAN), text_encoder=UMT5EncoderModel(UMT5Config(**t5)),
                scheduler=D.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=3.0),
                vae=D.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, True, True]),  # x8 spatial, x4 temporal
                tokenizer=tiny_tokenizer(512))
    pipe.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# model: diffusers pipeline by path; text encoders + VAE frozen; only the transformer trains (full or LoRA), FSDP2.

def load_pipeline(path: str, cfg: Config, d: Dist):
    """-> pipe (frozen parts on device), transformer (trainable), ref (frozen copy for the KL, or None)."""
    from diffusers import StableDiffusion3Pipeline, WanPipeline  # late: as above
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    pipe = (StableDiffusion3Pipeline if cfg.kind == "sd3" else WanPipeline).from_pretrained(path, dtype=dtype)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval().to(d.device)
    return (pipe, *make_trainable(pipe.transformer.float(), cfg, d))  # fp32 master weights; bf16 compute via FSDP2


def make_trainable(transformer, cfg: Config, d: Dist):
    """Full training (+ a frozen copy as reference when beta > 0) or peft LoRA (reference = disable_adapter()),
    then FSDP2 per block + root."""
    ref = None
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model  # late: peft only for LoRA runs
        names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
        targets = [f"attn.{n}" for n in names] if cfg.kind == "sd3" else names  # cf. flow_grpo train_sd3 / train_wan2_1
        transformer = get_peft_model(transformer, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                             init_lora_weights="gaussian", target_modules=targets))
    else:
        transformer.requires_grad_(True)
        ref = copy.deepcopy(transformer).requires_grad_(False) if cfg.beta > 0 else None
    blocks = lambda m: [b for n, b in m.named_modules()  # noqa: E731  the transformer blocks: one FSDP unit each
                        if re.fullmatch(r"(.*\.)?(transformer_)?blocks\.\d+", n)]
    ref = None if ref is None else wrap_fsdp(ref, blocks(ref), d, cfg.bf16)
    return wrap_fsdp(transformer, blocks(transformer), d, cfg.bf16), ref


def embedder(pipe, cfg: Config, device):
    """prompts -> {"embeds": (B,L,D), "pooled": (B,D) SD3 only}. Each distinct prompt goes through the text encoders
    on its own: the encoders' rounding depends on the batch (a prompt encoded beside others differs by ~1e-7), so
    batched, a prompt's embedding would depend on the prompts it first came with, and --resume would differ."""

    @torch.no_grad()
    def encode(p):  # SD3: CLIP-L + CLIP-G + T5 -> (1, 77+T5 tokens, 4096), pooled (1, 2048); Wan: UMT5 -> (1, L, 4096)
        out = pipe.encode_prompt([p], **({"prompt_2": None, "prompt_3": None} if cfg.kind == "sd3" else {}),
                                 do_classifier_free_guidance=False, device=device,
                                 max_sequence_length=cfg.max_sequence_length)
        return {"embeds": out[0][0], **({"pooled": out[2][0]} if len(out) == 4 else {})}

    def embed(prompts):
        one = {p: encode(p) for p in dict.fromkeys(prompts)}  # a group's G copies are encoded once
        return {k: torch.stack([one[p][k] for p in prompts]).to(device) for k in one[prompts[0]]}
    return embed


def schedule(scheduler, num_steps: int):
    """sigmas (T+1 floats, 1 -> 0, shift 3) and the model's timesteps (T,) of the checkpoint's own scheduler."""
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.tolist(), scheduler.timesteps.float()


def latent_shape(pipe, cfg: Config):
    if cfg.kind == "sd3":  # (C, H/f, W/f)
        f = pipe.vae_scale_factor
        return pipe.transformer.config.in_channels, cfg.height // f, cfg.width // f
    f_t, f_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial  # (C, (F-1)/4+1, H/8, W/8)
    return (pipe.vae.config.z_dim, (cfg.num_frames - 1) // f_t + 1, cfg.height // f_s, cfg.width // f_s)


@torch.no_grad()
def decode(pipe, x0, kind: str):
    """latents -> images (B,3,H,W) or videos (B,F,3,H,W) in [0, 1] with the frozen VAE."""
    vae = pipe.vae
    if kind == "sd3":
        img = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).sample
    else:
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x0)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(x0)
        img = vae.decode((x0 * std + mean).to(vae.dtype)).sample.transpose(1, 2)  # (B,3,F,H,W) -> (B,F,3,H,W)
    return (img.float() / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# the SDE step with its log-prob (flow_grpo diffusers_patch/sd3_sde_with_logprob.py), sampling, velocity with CFG

def sde_std(sigmas, i: int, eta: float, kind: str) -> float:
    """sigma_t of step i; 0 means the Euler ODE step."""
    sigma = sigmas[i]
    if eta == 0:
        return 0.0
    if kind == "wan":  # sigmas[-1] + (sigmas[1] - sigmas[-1]) * sigma, with sigmas[-1] = 0
        return sigmas[1] * sigma
    return eta * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))  # sigma==1 guard: else 1/0 = inf


def sde_step(x, v, sigma: float, sigma_next: float, std_t: float, x_next=None):
    """x_{t-1} ~ N(mean, (std_t sqrt(-dt))^2) -> (x_next, log-prob per sample (B,), mean). Draws x_next if not given."""
    x, v = x.float(), v.float()  # fp32: bf16 overflows in the log-prob
    dt = sigma_next - sigma  # < 0: sigma runs 1 -> 0
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    if std_t == 0:  # ODE: x + v dt, no log-prob
        return mean, torch.zeros(x.shape[0], device=x.device), mean
    s = std_t * math.sqrt(-dt)  # std of the transition
    if x_next is None:
        x_next = mean + s * torch.randn(x.shape).to(x)  # CPU RNG: same on any device, restored by --resume
    logp = -(x_next.detach() - mean) ** 2 / (2 * s**2) - math.log(s) - math.log(math.sqrt(2 * math.pi))
    return x_next, logp.mean(dim=tuple(range(1, x.dim()))), mean  # MEAN over C,(F,)H,W, constants kept


def velocity(transformer, x, t, cond: dict, uncond: dict, guidance: float):
    """v = v_u + w (v_c - v_u): one forward on cat[uncond, cond]; v is the flow velocity (noise - x0)."""
    if guidance > 1:
        x = torch.cat([x, x])
        cond = {k: torch.cat([uncond[k].expand_as(c), c]) for k, c in cond.items()}
    extra = {"pooled_projections": cond["pooled"]} if "pooled" in cond else {}
    v = transformer(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.device),
                    encoder_hidden_states=cond["embeds"], return_dict=False, **extra)[0].float()
    if guidance > 1:
        v_u, v_c = v.chunk(2)
        v = v_u + guidance * (v_c - v_u)
    return v


@torch.no_grad()
def sample(transformer, cond, uncond, noise, sigmas, timesteps, cfg: Config, sde_js):
    """SDE at the steps in sde_js, ODE elsewhere -> all latents (B,T+1,...) and log-probs (B,T) (0 at ODE steps)."""
    x, xs, logps = noise, [noise], []
    for i in range(len(timesteps)):
        v = velocity(transformer, x, timesteps[i], cond, uncond, cfg.guidance_scale)
        std_t = sde_std(sigmas, i, cfg.eta, cfg.kind) if i in sde_js else 0.0
        x, logp, _ = sde_step(x, v, sigmas[i], sigmas[i + 1], std_t)
        xs.append(x)
        logps.append(logp)
    return torch.stack(xs, 1), torch.stack(logps, 1)


# ----------------------------------------------------------------------------------------------------------
# rewards: the programmatic ones need nothing; CLIP score / aesthetic load a CLIPModel (+ an MLP head) by path

def load_clip_scorer(path: str, head_path: str, device):
    """(images (N,3,H,W) in [0,1], prompts) -> cosine(CLIP image, CLIP prompt), or with head_path the LAION aesthetic
    MLP (DDPO / flow_grpo; state-dict keys layers.0/2/4/6/7) on the normalised CLIP image embedding."""
    model, tok = CLIPModel.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)
    size, nn = model.config.vision_config.image_size, torch.nn
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)  # OpenAI CLIP pixel stats
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
    head = nn.Sequential(nn.Linear(model.config.projection_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                         nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    if head_path:
        sd = torch.load(head_path, map_location="cpu", weights_only=True)
        head.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})
    head = head.to(device).eval()
    unit = lambda out: torch.nn.functional.normalize(out.pooler_output, dim=-1)  # noqa: E731

    @torch.no_grad()
    def score(images, prompts):
        px = torch.nn.functional.interpolate(images.to(device), size=(size, size), mode="bicubic", antialias=True)
        img = unit(model.get_image_features(pixel_values=(px - mean) / std))
        if head_path:
            return head(img).squeeze(-1)
        ids = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return (img * unit(model.get_text_features(**ids))).sum(-1)
    return score


def jpeg_kb(img) -> float:
    """Size in kB of one image (3,H,W) in [0,1] as a quality-95 JPEG (DDPO's compressibility reward is its negative)."""
    buf = io.BytesIO()
    Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().cpu().numpy()).save(buf, format="JPEG", quality=95)
    return buf.tell() / 1000


def make_reward_fn(cfg: Config, device):
    """(images (B,3,H,W) or videos (B,F,3,H,W) in [0,1], prompts) -> rewards (B,); a video scores its frames' mean."""
    assert cfg.reward in ("redness", "brightness", "jpeg", "clip", "aesthetic"), cfg.reward
    scorer = load_clip_scorer(cfg.reward_model, cfg.aesthetic_head, device) if cfg.reward in ("clip", "aesthetic") \
        else None

    def reward_fn(images, prompts):
        n_f = images.shape[1] if images.dim() == 5 else 1
        img = images.reshape(-1, *images.shape[-3:])  # (B*F, 3, H, W)
        if cfg.reward == "redness":
            r = img[:, 0].mean((1, 2)) - img[:, 1:].mean((1, 2, 3))  # mean R - mean (G+B)/2, in [-1, 1]
        elif cfg.reward == "brightness":
            r = img.mean((1, 2, 3))
        elif cfg.reward == "jpeg":
            r = torch.tensor([-jpeg_kb(im) for im in img])
        else:
            r = scorer(img, [p for p in prompts for _ in range(n_f)])
        return r.float().to(device).view(-1, n_f).mean(1)
    return reward_fn


def score(reward_fn, images, prompts: list, batch: int):
    """Rewards (N,) of images in batches of `batch`. A batch whose reward function raises (a reward server down, an
    image it cannot read) scores NaN, with a message naming it: its samples are skipped (advantage 0), the run goes
    on."""
    rewards = []
    for b in range(0, len(prompts), batch):
        ps = prompts[b:b + batch]
        try:
            rewards.append(reward_fn(images[b:b + batch], ps).float())
        except Exception as e:  # noqa: BLE001  any failure of the scorer costs its batch only
            print(f"warning: reward {type(e).__name__}: {e}: {len(ps)} samples skipped (prompts: "
                  f"{'; '.join(dict.fromkeys(ps))})", flush=True)
            rewards.append(torch.full((len(ps),), float("nan"), device=images.device))
    return torch.cat(rewards)


# ----------------------------------------------------------------------------------------------------------
# GRPO on the denoising chain

def compute_advantages(rewards, global_std: bool, clip: float):
    """rewards (P, G), one row per prompt -> A = clip((r - mean_row) / (std + 1e-4), +-clip); std (ddof 0) over
    ALL rewards of the step (global_std, Flow-GRPO SD3) or over the row (Wan). A non-finite reward (a failed or
    broken score) is left out of the means and stds, and its sample gets A = 0."""
    r = torch.where(torch.isfinite(rewards), rewards, float("nan"))  # NaN = skipped: nanmean leaves it out
    mean = r.nanmean(1, keepdim=True)
    dev2 = (r - (r.nanmean() if global_std else mean)) ** 2  # squared deviations from the step's / the row's mean
    std = dev2.nanmean().sqrt() if global_std else dev2.nanmean(1, keepdim=True).sqrt()
    return ((r - mean) / (std + 1e-4)).clamp(-clip, clip).nan_to_num(0.0)


def flow_grpo_loss(transformer, ref, x, x_next, logp_old, adv, j, cond, uncond, sigmas, timesteps, cfg: Config):
    """Clipped-ratio policy loss (+ beta KL to the reference) of one micro-batch at denoising step j."""
    std_t, dt = sde_std(sigmas, j, cfg.eta, cfg.kind), sigmas[j + 1] - sigmas[j]
    v = velocity(transformer, x, timesteps[j], cond, uncond, cfg.guidance_scale)
    _, logp, mean = sde_step(x, v, sigmas[j], sigmas[j + 1], std_t, x_next)  # same x_next as sampled
    ratio = torch.exp(logp - logp_old)  # r = p_theta(x_next|x) / p_old(x_next|x), per sample (B,)
    eps = cfg.clip_range
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean()  # mean(max(-A r, -A clip(r, 1+-eps)))
    if cfg.kind == "wan":
        pg = pg * std_t / math.sqrt(-dt)  # train_wan2_1.py weighting sigma_t / sqrt(-dt)
    kl = torch.zeros((), device=x.device)
    if cfg.beta > 0:
        with torch.no_grad(), (transformer.disable_adapter() if ref is None else nullcontext()):
            v_ref = velocity(ref if ref is not None else transformer, x, timesteps[j], cond, uncond, cfg.guidance_scale)
        _, _, mean_ref = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], std_t, x_next)
        var = std_t**2 * (-dt if cfg.kind == "wan" else 1.0)  # SD3: sigma_t^2 (upstream); Wan: exact, sigma_t^2 |dt|
        kl = (((mean - mean_ref) ** 2).mean(dim=tuple(range(1, x.dim()))) / (2 * var)).mean()  # (mu-mu_ref)^2/2var
    stats = {"clipfrac": ((ratio - 1).abs() > eps).float().mean().item(), "ratio_mean": ratio.mean().item(),
             "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item(),
             "approx_kl": 0.5 * ((logp - logp_old) ** 2).mean().item(), "kl": kl.item(), "policy_loss": pg.item()}
    return pg + cfg.beta * kl, stats


def gather(t):
    """all_gather along dim 0 (identity on one process)."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def gather0(t):
    """gather along dim 0 onto rank 0 (None on the others; identity on one process): every rank sends t's shape."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(t.contiguous(), out, dst=0)
    return torch.cat(out) if out else None


def save_grid(images, path: str):
    """(N,3,H,W) or (N,F,3,H,W) in [0,1] -> PNG, 8 images a row; a video is one row, its frames side by side."""
    video = images.dim() == 5
    save_image(torch.cat(images.unbind(1), dim=-1) if video else images, path, nrow=1 if video else 8, pad_value=1)


@torch.no_grad()
def evaluate(pipe, transformer, prompts, embed, uncond, reward_fn, shape, cfg: Config, d: Dist, path: str):
    """Held-out prompts, Euler ODE (eta=0), eval_num_steps, the same noise at every eval -> mean reward over all
    prompts (failed rewards left out), grid PNG of all of them in order (rank 0). Rank r takes prompts r, r+W, ...;
    a shorter share is padded with a repeated prompt (its reward and image dropped), so that every rank runs the
    same sampling batches (FSDP gathers the weights in each forward) and sends as many rewards and images."""
    sigmas, timesteps = schedule(pipe.scheduler, cfg.eval_num_steps)
    noise = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    W, n = d.world_size, len(prompts)
    mine = list(range(d.rank, n, W))
    share = -(-n // W)  # ceil(n / W) prompts sampled on every rank
    padded, rewards, images = mine + [mine[0] if mine else 0] * (share - len(mine)), [], []
    for b in range(0, share, cfg.sample_batch_size):
        idx = padded[b:b + cfg.sample_batch_size]
        ps = [prompts[i] for i in idx]
        xs, _ = sample(transformer, embed(ps), uncond, noise[idx].to(d.device), sigmas, timesteps,
                       replace(cfg, eta=0.0), sde_js=())
        images.append(decode(pipe, xs[:, -1], cfg.kind))
        rewards.append(score(reward_fn, images[-1], ps, len(ps)))
    rewards = torch.cat(rewards)
    rewards[len(mine):] = float("nan")  # the padding: left out of the mean
    images = gather0(torch.cat(images))  # (W * share, ...): rank r's j-th image at r * share + j
    if d.is_main:
        save_grid(images[[i % W * share + i // W for i in range(n)]], path)  # prompt i: rank i % W's (i // W)-th
    rewards = gather(rewards)
    return rewards[torch.isfinite(rewards)].mean().item()


def read_prompt_file(path: str, field: str) -> list:
    """The non-blank lines of a UTF-8 text file, stripped; an error naming the file and the setting if none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} (--{field}): not UTF-8 text ({e})") from None
    if not lines:
        raise ValueError(f"{path} (--{field}): no prompts (the file is empty or its lines are blank)")
    return lines


def read_prompts(cfg: Config):
    """(train, held-out) prompt lists, each from its file, or the built-in ones split by a fixed shuffle (56 train,
    16 held out)."""
    shuffled = random.Random(0).sample(PROMPTS, len(PROMPTS))
    train = read_prompt_file(cfg.prompts, "prompts") if cfg.prompts else shuffled[16:]
    held = read_prompt_file(cfg.eval_prompts, "eval_prompts") if cfg.eval_prompts else shuffled[:16]
    if len(train) < cfg.prompts_per_step:  # a step draws prompts_per_step distinct prompts
        raise ValueError(f"{cfg.prompts or 'the built-in prompts'}: {len(train)} training prompts, fewer than "
                         f"--prompts_per_step={cfg.prompts_per_step} (distinct prompts a step)")
    return train, held[:cfg.num_eval_prompts]


# ----------------------------------------------------------------------------------------------------------

def sde_window(cfg: Config, T: int, rng) -> list:
    """The denoising steps that use the SDE (and so carry log-probs): a random window of sde_window_size steps
    (Flow-GRPO-Fast, train_sd3_fast.py: start ~ U{lo, hi - size}), or all T steps. rng is the step's generator,
    the same on every rank: one window for all samples."""
    if cfg.sde_window_size > 0:
        start = int(rng.integers(cfg.sde_window_range[0], cfg.sde_window_range[1] - cfg.sde_window_size + 1))
        return list(range(start, start + cfg.sde_window_size))
    return list(range(T))


@torch.no_grad()
def sample_round(pipe, transformer, prompts, cond, uncond, shape, sigmas, timesteps, cfg: Config, sde_js, device):
    """Sample len(prompts) images in batches of sample_batch_size -> (trajectories (N, T+1, *latent) x_T .. x_0,
    logp_old (N, T) fp32, decoded images). Noise comes from the CPU RNG, so --resume reproduces it."""
    xs, logps, images = [], [], []
    for b in range(0, len(prompts), cfg.sample_batch_size):
        mb = slice(b, b + cfg.sample_batch_size)
        noise = torch.randn(cfg.sample_batch_size, *shape).to(device)
        x, lp = sample(transformer, {k: c[mb] for k, c in cond.items()}, uncond, noise, sigmas, timesteps, cfg, sde_js)
        xs.append(x)
        logps.append(lp)
        images.append(decode(pipe, x[:, -1], cfg.kind))
    return torch.cat(xs), torch.cat(logps), torch.cat(images)


def train_round(transformer, ref, optimizer, params, xs, logps, adv, cond, uncond, sigmas, timesteps, train_js,
                cfg: Config):
    """Recompute log p at the stored (x_j, t_j, x_j+1) with the current model. Gradients accumulate over
    micro-batches x trained steps, then a clipped AdamW step; updates_per_step of them per sampling round.
    An update whose gradient norm is not finite is skipped (a NaN would reach every weight through the step).
    -> (per-micro-step loss stats, the last update's gradient norm, updates skipped)."""
    N = len(xs)
    per_update = N // cfg.updates_per_step  # samples per optimizer step
    n_acc, stats, skipped = (per_update // cfg.train_batch_size) * len(train_js), [], 0  # loss: mean of n_acc
    for b in range(0, N, cfg.train_batch_size):
        mb, update = slice(b, b + cfg.train_batch_size), (b + cfg.train_batch_size) % per_update == 0
        for k, j in enumerate(train_js):
            if hasattr(transformer, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter at the last backward
                transformer.set_requires_gradient_sync(update and k == len(train_js) - 1)
            loss, st = flow_grpo_loss(transformer, ref, xs[mb, j], xs[mb, j + 1], logps[mb, j], adv[mb], j,
                                      {kk: c[mb] for kk, c in cond.items()}, uncond, sigmas, timesteps, cfg)
            (loss / n_acc).backward()
            stats.append(st)
        if update:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP2
            if math.isfinite(grad_norm):  # the same on every rank: all step or all skip
                optimizer.step()
            else:
                print0(f"warning: non-finite gradient norm ({grad_norm}): optimizer step skipped, gradients dropped")
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm, skipped


def step_metrics(step: int, all_rewards, stats: list, grad_norm: float, updates_skipped: int, sde_js: list,
                 times: list, device) -> dict:
    """One metrics.jsonl row, over all ranks: rewards (the skipped ones counted, left out of mean and std), loss
    stats over all micro-steps (means; ratio min/max as extremes), the update's gradient norm; timings of rank 0."""
    t0, t1, t2, t3 = times
    ok = all_rewards[torch.isfinite(all_rewards)]
    means = [k for k in stats[0] if k not in ("ratio_min", "ratio_max")]
    local = lambda f, k: torch.tensor([float(f([st[k] for st in stats]))], dtype=torch.float64, device=device)  # noqa
    # every rank has as many micro-steps, so the mean over all of them is the mean of the ranks' means
    world = dist.get_world_size() if dist.is_initialized() else 1
    agg = {k: all_reduce(local(np.mean, k)).item() / world for k in means}
    agg["ratio_min"] = all_reduce(local(min, "ratio_min"), op=dist.ReduceOp.MIN).item()
    agg["ratio_max"] = all_reduce(local(max, "ratio_max"), op=dist.ReduceOp.MAX).item()
    return {"step": step + 1, "reward_mean": ok.mean().item(), "reward_std": ok.std().item(),
            "reward_skipped": all_rewards.numel() - ok.numel(), **{k: agg[k] for k in stats[0]},
            "grad_norm": grad_norm, "updates_skipped": updates_skipped, "sde_window": [sde_js[0], sde_js[-1]],
            "t_sample": t1 - t0, "t_reward": t2 - t1, "t_train": t3 - t2}


def save_before_after(cfg: Config, state: dict):
    """The eval grids of step 0 and the last step stacked into before_after.png (top: before)."""
    grids = [os.path.join(cfg.out_dir, f"eval_{s:06d}.png") for s in (0, cfg.max_steps)]
    if cfg.eval_every <= 0 or state["eval_before"] is None or not all(map(os.path.exists, grids)):
        return
    print(f"held-out {cfg.reward} (ODE, {cfg.eval_num_steps} steps): before {state['eval_before']:.4f} -> "
          f"after {state['eval_last']:.4f}")
    grids = [read_image(g) for g in grids]
    save_image(torch.cat(grids, 1) / 255, os.path.join(cfg.out_dir, "before_after.png"))


def check_config(cfg: Config, world: int = 1):
    """Start-up checks: a setting that would fail later (after the model is loaded, or mid-run) or train nothing
    stops here, naming the field."""
    if cfg.kind not in ("sd3", "wan"):
        raise ValueError(f"--kind={cfg.kind}: choose sd3 (StableDiffusion3Pipeline, images) or wan (WanPipeline, "
                         "videos)")
    if cfg.eta <= 0:
        raise ValueError(f"--eta={cfg.eta}: Flow-GRPO needs eta > 0 (eta = 0 is the ODE sampler: no log-probs, so "
                         "no gradient)")
    if cfg.group_size < 2:
        raise ValueError(f"--group_size={cfg.group_size}: the advantage compares the G samples of a prompt, G = 1 "
                         "gives every sample advantage 0; use G >= 2")
    if cfg.sde_window_size:  # Fast: the window start ~ U{lo, hi - size} must exist, its steps lie in 0..num_steps-1
        r = cfg.sde_window_range
        if len(r) != 2 or not 0 <= r[0] < r[1] <= cfg.num_steps:
            raise ValueError(f"--sde_window_range={tuple(r)}: need (lo, hi) with 0 <= lo < hi <= "
                             f"num_steps={cfg.num_steps}")
        if not 0 < cfg.sde_window_size <= r[1] - r[0]:
            raise ValueError(f"--sde_window_size={cfg.sde_window_size}: the window must fit in sde_window_range "
                             f"{tuple(r)}: 1 .. {r[1] - r[0]} steps, or 0 = off")
    elif not 0 < cfg.timestep_fraction <= 1 or int(cfg.num_steps * cfg.timestep_fraction) < 1:
        raise ValueError(f"--num_steps={cfg.num_steps} --timestep_fraction={cfg.timestep_fraction}: the first "
                         "int(num_steps * timestep_fraction) steps are trained: need >= 1 (fraction in (0, 1])")
    for name in ("prompts_per_step", "sample_batch_size", "train_batch_size", "updates_per_step"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)}: must be >= 1")
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts_per_step={cfg.prompts_per_step} must be a multiple of the {world} ranks: each "
                         "rank holds whole groups")
    n = cfg.prompts_per_step // world * cfg.group_size  # samples per rank per step
    if n % cfg.sample_batch_size:
        raise ValueError(f"--sample_batch_size={cfg.sample_batch_size} must divide the {n} samples per rank "
                         f"(prompts_per_step / {world} ranks x group_size)")
    if n % (cfg.updates_per_step * cfg.train_batch_size):
        raise ValueError(f"--train_batch_size={cfg.train_batch_size} x --updates_per_step={cfg.updates_per_step} "
                         f"must divide the {n} samples per rank: each update takes whole micro-batches")
    if cfg.ckpt_every < 0:
        raise ValueError(f"--ckpt_every={cfg.ckpt_every}: steps between checkpoints, or 0 = only at the end")
    if cfg.eval_every > 0 and cfg.num_eval_prompts < 1:
        raise ValueError(f"--num_eval_prompts={cfg.num_eval_prompts} with --eval_every={cfg.eval_every}: an eval "
                         "needs >= 1 prompt (or eval_every=0: no eval)")


def main(cfg: Config):
    d = init_distributed(cfg.device)
    check_config(cfg, d.world_size)
    if not cfg.resume:  # before anything is written: another run's log and checkpoints stay as they are
        refuse_old_run(cfg.out_dir)
    train_prompts, eval_prompts = read_prompts(cfg)  # checked before the model is loaded
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + d.rank)  # the sampling noise: each rank its own
    W, G = d.world_size, cfg.group_size
    P = cfg.prompts_per_step // W  # prompts per rank; each rank holds whole groups
    N = P * G  # samples per rank per step
    os.makedirs(cfg.out_dir, exist_ok=True)
    if d.is_main:
        print_config(cfg)
    path = cfg.model or os.path.join(cfg.out_dir, f"tiny_{cfg.kind}_pipeline")
    if not cfg.model and d.is_main and not os.path.exists(path):
        make_tiny_pipeline(path, cfg.kind)
    barrier()
    pipe, transformer, ref = load_pipeline(path, cfg, d)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    embed, reward_fn, shape = embedder(pipe, cfg, d.device), make_reward_fn(cfg, d.device), latent_shape(pipe, cfg)
    uncond = embed([""])  # the negative prompt "" for CFG, encoded once
    sigmas, timesteps = schedule(pipe.scheduler, cfg.num_steps)
    T = len(timesteps)
    n_train = cfg.sde_window_size or int(T * cfg.timestep_fraction)
    print0(f"{N * W} samples/step ({cfg.prompts_per_step} prompts x G={G}), {n_train} of {T} steps trained, "
           f"{cfg.updates_per_step} update(s)/step, {sum(p.numel() for p in params) / 1e6:.3f}M trainable params, "
           f"latents {shape}, sigmas {np.round(sigmas, 4).tolist()}")
    state = {"step": 0, "eval_before": None, "eval_last": None}
    if cfg.resume and latest_checkpoint(cfg.out_dir):
        state = load_checkpoint(latest_checkpoint(cfg.out_dir), transformer, optimizer)  # weights, Adam, RNG
        print0(f"resumed from {latest_checkpoint(cfg.out_dir)} at step {state['step']}")
    run_eval = lambda s: evaluate(pipe, transformer, eval_prompts, embed, uncond, reward_fn, shape, cfg, d,  # noqa
                                  os.path.join(cfg.out_dir, f"eval_{s:06d}.png"))
    if d.is_main and cfg.resume:  # rows logged after the checkpoint (before a stop) are logged again from here, and
        keep_metrics_until(cfg.out_dir, state["step"] if state["step"] else -1)  # at step 0 the step-0 eval too
    log = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if d.is_main else None
    if state["step"] == 0 and cfg.eval_every > 0:
        state["eval_before"] = run_eval(0)
        print0(f"eval before training: reward {state['eval_before']:.4f} (ODE, {cfg.eval_num_steps} steps)")
        if log:
            log.write(json.dumps({"step": 0, "eval_reward": state["eval_before"]}) + "\n")
    bar = tqdm(range(state["step"], cfg.max_steps), disable=not d.is_main, initial=state["step"], total=cfg.max_steps)
    for step in bar:
        t0 = time.time()
        # ---- sample: P prompts x G samples on this rank; SDE in the window (Fast) or everywhere, ODE elsewhere
        rng = np.random.default_rng([cfg.seed, step])  # the same on every rank and after --resume: a function of step
        pick = rng.choice(len(train_prompts), cfg.prompts_per_step, replace=False)
        prompts = [train_prompts[i] for i in pick[d.rank * P:(d.rank + 1) * P] for _ in range(G)]  # data pos = f(step)
        sde_js = sde_window(cfg, T, rng)
        train_js = sde_js[:n_train]  # default: steps 0..T-2 (the very sharp last step is skipped)
        cond = embed(prompts)
        xs, logps, images = sample_round(pipe, transformer, prompts, cond, uncond, shape, sigmas, timesteps, cfg,
                                         sde_js, d.device)
        t1 = time.time()
        # ---- reward + advantage: rewards gathered from all ranks, normalised per group (or globally)
        rewards = score(reward_fn, images, prompts, cfg.sample_batch_size)  # (N,), NaN where the reward failed
        all_rewards = gather(rewards).view(-1, G)  # (prompts_per_step, G), rank-major rows
        if not torch.isfinite(all_rewards).all():
            print0(f"step {step + 1}: {(~torch.isfinite(all_rewards)).sum().item()} of {all_rewards.numel()} rewards "
                   "failed or not finite: those samples skipped (advantage 0)")
        adv = compute_advantages(all_rewards, cfg.global_std, cfg.adv_clip_max)[d.rank * P:(d.rank + 1) * P].flatten()
        t2 = time.time()
        # ---- train
        stats, grad_norm, skipped = train_round(transformer, ref, optimizer, params, xs, logps, adv, cond, uncond,
                                                sigmas, timesteps, train_js, cfg)
        t3 = time.time()
        # ---- log + eval + ckpt
        m = step_metrics(step, all_rewards, stats, grad_norm, skipped, sde_js, [t0, t1, t2, t3], d.device)
        if cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            m["eval_reward"] = state["eval_last"] = run_eval(step + 1)
        if d.is_main:
            log.write(json.dumps(m) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", clip=f"{m['clipfrac']:.2f}",
                            **({"eval": f"{m['eval_reward']:.3f}"} if "eval_reward" in m else {}))
        if (cfg.ckpt_every > 0 and (step + 1) % cfg.ckpt_every == 0) or step + 1 == cfg.max_steps:
            save_checkpoint(cfg.out_dir, step + 1, finite(transformer, "checkpointed"), optimizer,  # good ones stay
                            {k: state[k] for k in ("eval_before", "eval_last")}, cfg.keep_last)
    if d.is_main:
        save_before_after(cfg, state)
    return pipe, transformer


# ----------------------------------------------------------------------------------------------------------

def bench_step(cfg: Config, shapes=None):
    """Time sampling (sample_batch_size) and one update (train_batch_size x trained steps) of a random-init transformer
    of the real shape (SD35_MEDIUM / WAN21_1_3B; `shapes` overrides) with random text embeddings, after a warm-up."""
    import diffusers as D  # late: diffusers is optional (Flow-GRPO only; the module imports without it)
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    sd3, cuda = cfg.kind == "sd3", d.device.startswith("cuda")
    shapes = shapes or (SD35_MEDIUM if sd3 else WAN21_1_3B)
    t = (D.SD3Transformer2DModel if sd3 else D.WanTransformer3DModel)(**shapes).to(d.device)
    t, _ = make_trainable(t, replace(cfg, beta=0.0), d)
    params = [p for p in t.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sigmas, timesteps = schedule(D.FlowMatchEulerDiscreteScheduler(shift=3.0) if sd3 else D.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0), cfg.num_steps)
    f = 8  # the real VAEs: x8 spatial, x4 temporal (Wan)
    shape = (16, *([] if sd3 else [(cfg.num_frames - 1) // 4 + 1]), cfg.height // f, cfg.width // f)
    L = 77 + cfg.max_sequence_length if sd3 else cfg.max_sequence_length  # text tokens: CLIP 77 + T5 (SD3), UMT5 (Wan)
    dim = shapes["joint_attention_dim"] if sd3 else shapes["text_dim"]  # 4096: T5-XXL / UMT5-XXL width
    emb = lambda b: {"embeds": torch.randn(b, L, dim, device=d.device),  # noqa: E731
                     **({"pooled": torch.randn(b, shapes["pooled_projection_dim"], device=d.device)} if sd3 else {})}
    B, Bt, uncond = cfg.sample_batch_size, cfg.train_batch_size, emb(1)
    js = list(range(cfg.sde_window_size or int(len(timesteps) * cfg.timestep_fraction)))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for it in range(2):  # warm-up, then timed
        sync()
        t0 = time.time()
        xs, lps = sample(t, emb(B), uncond, torch.randn(B, *shape, device=d.device), sigmas, timesteps, cfg,
                         range(len(timesteps)))
        sync()
        t1 = time.time()
        for j in js:
            loss, _ = flow_grpo_loss(t, None, xs[:Bt, j], xs[:Bt, j + 1], lps[:Bt, j], torch.randn(Bt, device=d.device),
                                     j, emb(Bt), uncond, sigmas, timesteps, replace(cfg, beta=0.0))
            (loss / len(js)).backward()
        opt.step()
        opt.zero_grad()
        sync()
        n_all, n_train = sum(p.numel() for p in t.parameters()) / 1e9, sum(p.numel() for p in params) / 1e6
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print0(f"[{it}] sample {B} x {len(timesteps)} steps (CFG {cfg.guidance_scale}): {t1 - t0:.2f}s | train {Bt} x "
               f"{len(js)} steps + AdamW: {time.time() - t1:.2f}s | peak {peak:.1f} GiB | {n_all:.3f}B params, "
               f"{n_train:.1f}M trained | {cfg.height}x{cfg.width}, bf16={cfg.bf16}")


if __name__ == "__main__":
    config = parse_config(Config)
    bench_step(config) if config.bench else main(config)
