# The CPU demo: GRPO teaches a tiny random Qwen2.5-VL to find an 8-frame colour flash in 64-frame videos.
#   python train_grpo.py config/tiny_cpu.py            (2 CPU cores, about 4 minutes; --seed=1, --seed=2 alike)
# It makes the synthetic task and the tiny model in out_dir, teaches the answer format with random letters
# (so held-out accuracy starts at chance, 25%), then runs GRPO and prints held-out accuracy before and after.
# Batch arithmetic: 16 prompts x 8 responses = 128 rollouts per step, one on-policy update per step.
out_dir = "runs/tiny_cpu"
synthetic = True
synthetic_frames = 64          # 64 frames of 28x28 -> 32 video tokens (one per frame pair)
synthetic_flash = 8            # the flash covers 4 of the 32 video tokens. With a 4-frame flash (2 tokens) seed 0
                               # reached 100% only by step ~175 and a 300-step run ended at 75% on a new user's
                               # machine; with 8 frames seeds 0, 1, 2 all reached 100% by step 200 (README)
num_frames = 64
max_pixels = 28 * 28
min_pixels = 28 * 28
think = False                  # the short answer-only prompt: with Long-RL's ~190-token think prompt around 32
                               # video tokens, this 2-layer model collapsed to one letter (25% -> 25%, seed 0)
rollout_batch_size = 16
n = 8
max_new_tokens = 8             # the format is 5 tokens + <|im_end|>: "<answer> B </answer>"
temperature = 1.0
sft_steps = 100                # format-only warm-up on random letters
sft_lr = 1e-3
sft_batch_size = 32
lr = 1e-3                      # tiny model; a real 3B model uses 1e-6 (config/qwen2_5_vl_3b_grpo.py)
beta2 = 0.99
max_steps = 200
eval_every = 50
eval_batch_size = 128
micro_batch_size = 64
gradient_checkpointing = False # nothing to save at this size; it only costs time
save_every = 100
