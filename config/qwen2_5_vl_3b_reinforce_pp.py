# Reinforce++-baseline on Qwen2.5-VL-3B: token-level returns whitened over the batch, group-mean baseline,
# KL in the reward (k1), as in OpenRLHF's REINFORCE++.
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_3b_reinforce_pp.py --model=... --data=...
engine = "vllm"
rollout_batch_size = 128
n = 8
max_new_tokens = 2048
num_frames = 32
adv_estimator = "reinforce_pp_baseline"
kl_beta = 1e-3
kl_estimator = "k1"
kl_in_reward = True
clip_low = 0.2
clip_high = 0.2
lr = 1e-6
micro_batch_size = 2
