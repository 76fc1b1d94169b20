# CPU demo: python train_diffusion_rl.py config/tiny_image_cpu.py
# Tiny SD3 (90k-param transformer, 2 layers) built from configs into out_dir, 32x32 images, reward = mean redness.
# Per step: 8 prompts x G=8 = 64 samples, 10 SDE steps with CFG (forward batch 128), 9 trained steps.
out_dir = "runs/diffusion_tiny_image"
kind = "sd3"
height = 32
width = 32
max_sequence_length = 16
num_steps = 10
eval_num_steps = 20
prompts_per_step = 8
group_size = 8
sample_batch_size = 64
train_batch_size = 64
reward = "redness"
lr = 1e-3
max_steps = 100
eval_every = 25
ckpt_every = 25
