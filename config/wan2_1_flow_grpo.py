# Flow-GRPO on Wan2.1-T2V-1.3B (flow_grpo train_wan2_1.py, config general_ocr_wan2_1), LoRA r=32:
#   torchrun --standalone --nproc_per_node=8 train_diffusion_rl.py config/wan2_1_flow_grpo.py \
#       --model=/ckpt/Wan2.1-T2V-1.3B-Diffusers --prompts=train.txt --eval_prompts=test.txt \
#       --reward=clip --reward_model=/ckpt/clip-vit-large-patch14
#   python train_diffusion_rl.py config/wan2_1_flow_grpo.py --bench   # 1 GPU, random init, no download
# 33 frames at 240x416 -> latents (16, 9, 30, 52). Batch: 16 prompts x G=4 = 64 clips/step = 8 per rank,
# sampled and trained in micro-batches of 2; 19 of 20 SDE steps trained.
kind = "wan"
out_dir = "runs/wan2_1_flow_grpo"
model = "/ckpt/Wan2.1-T2V-1.3B-Diffusers"  # a local diffusers folder: nothing is downloaded
height = 240
width = 416
num_frames = 33
max_sequence_length = 512
num_steps = 20
eval_num_steps = 50
guidance_scale = 4.5
prompts_per_step = 16
group_size = 4
sample_batch_size = 2
train_batch_size = 2
clip_range = 1e-3
global_std = False
beta = 0.004
reward = "clip"
lora_rank = 32
lora_alpha = 64
lr = 1e-4
max_steps = 1000
bf16 = True
gradient_checkpointing = True
eval_every = 50
ckpt_every = 50
num_eval_prompts = 16
