# The recipe's SFT stage for Qwen2.5-VL-7B on long videos with Ulysses SP, before config/qwen2_5_vl_7b_grpo.py:
#   torchrun --standalone --nproc_per_node=8 train_sft.py config/qwen2_5_vl_7b_sft.py \
#       --model=Qwen/Qwen2.5-VL-7B-Instruct --data=reason/cot.jsonl --eval_data=reason/eval.jsonl
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_7b_grpo.py \
#       --model=Qwen/Qwen2.5-VL-7B-Instruct --init_from=runs/sft_7b --data=reason/train.jsonl
# Our choices (Long-RL ships no SFT stage): the RL preset's 512 frames of 224x224 (64 tokens per frame pair) and
# SP = 4 (7B's 28 query heads allow SP in {1, 2, 4, 7}); lr 1e-5 with a warm-up; one pass over the data.
# Batch arithmetic: SP 4 on 8 GPUs = 2 data-parallel groups; 32 rows per step = 16 per group, one row per
# micro-batch (a 512-frame row is ~16k tokens, split 4 ways); one pass over N rows is N / 32 steps.
# Memory (bench.py memory, README "Memory plan": the SFT step is the same forward + backward as GRPO's update):
# 512 frames are between the table's 256 (SP 4: 21.8 / 23.3 GiB frozen / trained tower) and 1,024 frames
# (25.4 / 31.4 GiB) per GPU: fits an 80 GB GPU with room; there is no reference model or vLLM in this stage.
out_dir = "runs/sft_7b"
target = "cot"
think = True
num_frames = 512
max_pixels = 224 * 224
sp_size = 4
batch_size = 32
micro_batch_size = 1
lr = 1e-5
warmup_steps = 20
max_steps = 1000
max_new_tokens = 2048
eval_every = 100
eval_max_samples = 256
save_every = 50
