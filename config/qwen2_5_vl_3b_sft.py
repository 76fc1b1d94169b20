# The recipe's SFT stage for Qwen2.5-VL-3B on one 8-GPU node, before config/qwen2_5_vl_3b_grpo.py:
#   torchrun --standalone --nproc_per_node=8 train_sft.py config/qwen2_5_vl_3b_sft.py \
#       --model=Qwen/Qwen2.5-VL-3B-Instruct --data=reason/cot.jsonl --eval_data=reason/eval.jsonl
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/qwen2_5_vl_3b_grpo.py \
#       --model=Qwen/Qwen2.5-VL-3B-Instruct --init_from=runs/sft_3b --data=reason/train.jsonl
# Long-RL's repository ships no SFT stage (its README points elsewhere), so these are our choices, each with its
# reason: the RL preset's frames and pixels (the SFT model should see videos as RL will); lr 1e-5, ten times the
# RL rate, with a short warm-up, the usual for full fine-tuning of a 3B VLM; one pass over the data.
# Batch arithmetic: 64 rows per step = 8 per GPU, micro-batches of 2 (4 forward/backward per step per GPU);
# one pass over an N-row CoT file is N / 64 steps (set max_steps to it).
# Memory (python bench.py memory; the SFT step is the same forward + backward as GRPO's update): its 3B check, ONE
# GPU holding the whole fp32 master + AdamW state, predicts 52.9 GiB at 16k tokens (51.6 measured on the H200);
# on 8 GPUs FSDP2 shards that state 8 ways, and a row here is ~4k tokens (32 frames of 448x448 = 256 tokens per
# frame pair), so each GPU stays far inside 80 GB. No reference model and no vLLM engine in this stage.
out_dir = "runs/sft_3b"
target = "cot"
think = True                # Long-RL's think/answer prompt, as in RL
num_frames = 32
max_pixels = 448 * 448
batch_size = 64
micro_batch_size = 2
lr = 1e-5
warmup_steps = 20
max_steps = 500
max_new_tokens = 2048       # eval answers: the reasoning must fit
eval_every = 100
eval_max_samples = 512
save_every = 100
