# CPU demo (video): python train_diffusion_rl.py config/tiny_video_cpu.py
# Tiny Wan2.1 (29k-param transformer) built from configs into out_dir; 9-frame 64x64 clips = latents (16,3,8,8);
# reward = mean redness over frames. Wan settings: sigma_t = sigmas[1]*sigma, per-group std, clip 1e-3.
# Per step: 4 prompts x G=4 = 16 clips, 10 SDE steps with CFG, 9 trained steps.
out_dir = "runs/diffusion_tiny_video"
kind = "wan"
height = 64
width = 64
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
max_steps = 40
eval_every = 20
ckpt_every = 20
num_eval_prompts = 8
