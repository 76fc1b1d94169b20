# Long-RL's Qwen2.5-VL-3B video GRPO recipe (examples/new_supports/qwen2_5_vl_3b_video_grpo.sh), one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_3b_grpo.py \
#       --model=Qwen/Qwen2.5-VL-3B-Instruct --data=longvideo-reason/train.jsonl --eval_data=longvideo-reason/eval.jsonl
# Batch arithmetic: 128 prompts x 5 responses = 640 rollouts per step, 16 prompts per rank; one update per step.
engine = "vllm"
rollout_batch_size = 128
n = 5                       # Long-RL uses 5 responses per prompt for the 3B model
temperature = 1.0
top_p = 1.0                 # 1.0 keeps the importance ratios exact (Long-RL: 0.99)
max_new_tokens = 2048
num_frames = 32
max_pixels = 448 * 448
adv_estimator = "grpo"
kl_beta = 1e-2              # low_var_kl against the frozen reference
kl_estimator = "k3"
clip_low = 0.2
clip_high = 0.2
dual_clip = 3.0
loss_agg = "token-mean"
lr = 1e-6
micro_batch_size = 2
sp_size = 1
gpu_memory_utilization = 0.4
save_every = 50
eval_every = 50
