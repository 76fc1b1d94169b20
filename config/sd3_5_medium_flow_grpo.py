# Flow-GRPO on SD3.5-medium (flow_grpo config/grpo.py, 8-GPU settings), LoRA r=32, 512x512:
#   torchrun --standalone --nproc_per_node=8 train_diffusion_rl.py config/sd3_5_medium_flow_grpo.py \
#       --model=/ckpt/stable-diffusion-3.5-medium --prompts=train.txt --eval_prompts=test.txt \
#       --reward=clip --reward_model=/ckpt/clip-vit-large-patch14
#   python train_diffusion_rl.py config/sd3_5_medium_flow_grpo.py --bench   # 1 GPU, random init, no download
# Batch: 16 prompts x G=16 = 256 images/step = 32 per rank (2 groups), sampled and trained in micro-batches of 8;
# 9 of 10 SDE steps trained; 2 optimizer steps per sampling round (as upstream: the second is off-policy, so the
# ratio clip acts) -> 2 micro-batches x 9 steps = 18 backward passes per rank per optimizer step.
# reward: flow_grpo uses PickScore / GenEval / OCR servers; here a CLIP score (or aesthetic) loaded by path.
kind = "sd3"
out_dir = "runs/sd3_5_medium_flow_grpo"
model = "/ckpt/stable-diffusion-3.5-medium"  # a local diffusers folder: nothing is downloaded
height = 512
width = 512
max_sequence_length = 128
num_steps = 10
eval_num_steps = 40
eta = 0.7
guidance_scale = 4.5
prompts_per_step = 16
group_size = 16
sample_batch_size = 8
train_batch_size = 8
updates_per_step = 2
timestep_fraction = 0.99
clip_range = 1e-4
global_std = True
beta = 0.04  # geneval/ocr 0.04, pickscore 0.01, clipscore 0.02
reward = "clip"
lora_rank = 32
lora_alpha = 64
lr = 3e-4
max_steps = 1000
bf16 = True
gradient_checkpointing = True
eval_every = 50
ckpt_every = 50
num_eval_prompts = 64
