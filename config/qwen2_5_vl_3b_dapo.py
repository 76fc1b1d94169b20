# DAPO on Qwen2.5-VL-3B (Long-RL's qwen2_5_vl_3b_video_dapo.sh): clip-higher, dynamic sampling, token-level loss,
# overlong shaping, no KL and no reference model.
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_3b_dapo.py --model=... --data=...
engine = "vllm"
rollout_batch_size = 128
n = 8
max_new_tokens = 2048
num_frames = 32
adv_estimator = "grpo"
clip_low = 0.2
clip_high = 0.28            # clip-higher
dynamic_sampling = True     # drop groups whose rewards are all equal; refill from new prompts
max_sampling_tries = 3
loss_agg = "token-mean"
overlong_buffer = 512       # r += min(-(len - (2048 - 512)) / 512 * 1.0, 0)
overlong_penalty = 1.0
kl_beta = 0.0               # no reference model is loaded
lr = 1e-6
micro_batch_size = 2
