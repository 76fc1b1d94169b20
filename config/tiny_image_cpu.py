# CPU demo: python train_diffusion_rl.py config/tiny_image_cpu.py          (~1.5 min on 2 idle cores)
# Tiny SD3 (90k-param transformer, 2 layers) built from configs into out_dir, 32x32 images, reward = mean redness
# (mean R - mean (G+B)/2) of the decoded image. Plain Flow-GRPO: SDE on all 10 steps, 9 trained, CFG 4.5.
# Per step: 8 prompts x G=8 = 64 samples, one sampling batch (forward batch 128 with CFG), one AdamW step.
# Expected (seed 0): held-out ODE redness -0.011 -> 0.238 in 85 s; before/after grid in out_dir/before_after.png.
out_dir = "runs/diffusion_tiny_image"
kind = "sd3"
height = 32
width = 32
max_sequence_length = 16
num_steps = 10
eval_num_steps = 40
prompts_per_step = 8
group_size = 8
sample_batch_size = 64
train_batch_size = 64
reward = "redness"
lr = 3e-3
max_steps = 60
eval_every = 20
ckpt_every = 20
