# The recipe's first stage on the CPU demo's task: supervised fine-tuning on chain-of-thought rows.
#   python train_sft.py config/tiny_cpu_sft.py          (2 CPU cores, a few minutes)
#   python train_grpo.py config/tiny_cpu_from_sft.py    (then GRPO from these weights)
# The synthetic rows carry a reasoning line ("the flash was green at 3 seconds"); the target is
# "<think> the flash was green at 3 seconds </think> <answer> B </answer>" + eos after the short prompt.
# Batch arithmetic: 32 rows per step, one optimizer step each, micro-batches of 32 (one forward a step).
out_dir = "runs/tiny_sft"
synthetic = True
synthetic_frames = 64          # the GRPO demo's task exactly (config/tiny_cpu.py): 64 frames of 28x28, 8-frame flash
synthetic_flash = 8
num_frames = 64
max_pixels = 28 * 28
min_pixels = 28 * 28
think = False                  # the short answer prompt, as in the GRPO demo (the target still reasons in <think>)
target = "cot"
batch_size = 32
micro_batch_size = 32
lr = 1e-3                      # tiny random model; a real 7B SFT uses 1e-5 (config/qwen2_5_vl_7b_sft.py)
beta2 = 0.99
max_steps = 100
eval_every = 25
eval_batch_size = 128
max_new_tokens = 24            # "<think> the flash was green at 3 seconds </think> <answer> B </answer>" + eos
gradient_checkpointing = False
save_every = 0                 # one checkpoint, at the end: what GRPO starts from
