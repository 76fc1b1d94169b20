# Video smoke run: python train_diffusion_rl.py config/tiny_video_cpu.py      (~1 min on 2 idle cores)
# Tiny Wan2.1 (29k-param transformer) built from configs into out_dir; 9-frame 32x32 clips = latents (16,3,4,4).
# Wan settings: sigma_t = sigmas[1]*sigma, UniPC flow sigmas, per-group std, clip 1e-3, loss x sigma_t/sqrt(-dt).
# Per step: 4 prompts x G=4 = 16 clips, 10 SDE steps with CFG, 9 trained steps. It runs the whole video path
# (sample, decode, reward, update, eval strip PNG, checkpoint), but the reward does NOT visibly rise: the random
# tiny Wan VAE decodes almost the same clip from any latent (reward std ~1e-4 within a step).
out_dir = "runs/diffusion_tiny_video"
kind = "wan"
height = 32
width = 32
num_frames = 9
max_sequence_length = 16
num_steps = 10
eval_num_steps = 20
prompts_per_step = 4
group_size = 4
sample_batch_size = 16
train_batch_size = 16
global_std = False
clip_range = 1e-3
reward = "redness"
lr = 3e-3
max_steps = 10
eval_every = 10
ckpt_every = 10
num_eval_prompts = 4
