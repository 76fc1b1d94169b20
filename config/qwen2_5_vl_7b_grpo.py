# Long-RL's Qwen2.5-VL-7B long-video GRPO recipe with MR-SP, one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_7b_grpo.py \
#       --model=Qwen/Qwen2.5-VL-7B-Instruct --data=longvideo-reason/train.jsonl
# sp_size=4: 2 data-parallel groups of 4 GPUs; each group holds one long video's sequence split 4 ways
# (7B has 28 query heads, 4 kv heads: SP in {1, 2, 4, 7}). 64 prompts x 8 = 512 rollouts per step.
engine = "vllm"
rollout_batch_size = 64
n = 8
temperature = 1.0
top_p = 1.0
max_new_tokens = 2048
num_frames = 512            # long videos: Long-RL trains with up to 512-1,024 frames at 8 GPUs with MR-SP
max_pixels = 224 * 224      # 64 video tokens per frame pair
adv_estimator = "grpo"
kl_beta = 1e-2
kl_estimator = "k3"
clip_low = 0.2
clip_high = 0.2
lr = 1e-6
micro_batch_size = 1
sp_size = 4
gpu_memory_utilization = 0.35
save_every = 25
