# The recipe's second stage on the CPU demo: GRPO from the SFT stage's weights (config/tiny_cpu_sft.py first).
#   python train_sft.py config/tiny_cpu_sft.py && python train_grpo.py config/tiny_cpu_from_sft.py
# The demo's GRPO settings (config/tiny_cpu.py: 16 prompts x 8 responses a step, lr 1e-3) on the SFT run's task,
# tiny model and weights; no format warm-up (SFT taught the format and more), room for the reasoning, and a
# lower sampling temperature (below).
out_dir = "runs/tiny_cpu_from_sft"
model = "runs/tiny_sft/tiny-model"         # the architecture and processor; the weights come from init_from
init_from = "runs/tiny_sft"                # the SFT run's newest checkpoint (fp32 weights as trained)
data = "runs/tiny_sft/synthetic/train.jsonl"
eval_data = "runs/tiny_sft/synthetic/eval.jsonl"
num_frames = 64
max_pixels = 28 * 28
min_pixels = 28 * 28
think = False                  # the prompt SFT trained with; the format reward accepts the <think> block
rollout_batch_size = 16
n = 8
max_new_tokens = 24            # "<think> the flash was green at 3 seconds </think> <answer> B </answer>" + eos
temperature = 0.7              # after 100 SFT steps greedy answers are right (100% held-out) but at T = 1 this tiny
                               # byte-level model still puts enough mass on stray bytes that samples fall apart
                               # (seed 0: 10% right, 9% well-formed, 61% cut at 24 tokens) and GRPO then learned
                               # the format alone ("<answer></answer>", 0% held-out by step 50); at 0.7: 56% right
                               # at step 1, 95% by step 50. Log-probs are of logits / T, so ratios stay exact
sft_steps = 0                  # no format warm-up: the SFT stage replaces it
lr = 1e-3
beta2 = 0.99
max_steps = 50
eval_every = 25
eval_batch_size = 128
micro_batch_size = 64
gradient_checkpointing = False
save_every = 100
