# The colocated-vLLM GRPO run executed on one lent GPU (README "What ran where"): a random-initialised
# Qwen2.5-VL-3B-shaped model and 64-frame synthetic videos written by `python bench.py grpo_setup --out=DIR`.
#   torchrun --nproc_per_node=1 train_grpo.py config/qwen2_5_vl_3b_vllm_1gpu.py --model=DIR/model \
#       --data=DIR/synthetic/train.jsonl --out_dir=DIR/run
# 8 prompts x 4 responses per step, 64 frames of 224x224 (2,048 video tokens), responses up to 128 tokens.
engine = "vllm"
rollout_batch_size = 8
n = 4
max_new_tokens = 128
num_frames = 64
max_pixels = 224 * 224
min_pixels = 224 * 224
lr = 1e-6
micro_batch_size = 4
max_steps = 5
eval_every = 0
save_every = 5
gpu_memory_utilization = 0.3
max_model_len = 4096
progress = False
