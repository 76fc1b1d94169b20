# A real LongVideo-Reason-style run: Qwen2.5-VL-7B captions 10-s clips on this machine's GPU (rollout.py's HF
# engine, greedy), a reasoning LLM behind an OpenAI-compatible endpoint writes the questions, and the policy you
# will RL-train drops the questions it already always gets right (Long-RL kept the hard ones).
#   vllm serve Qwen/Qwen3-32B --port 8000 --max-model-len 32768        # on a second GPU / node (or any endpoint)
#   python data/make_reason_data.py config/reason_data_example.py --videos=/data/long_videos --out=/data/reason
# Kill it any time and run the same command again: every finished clip, question and filter score is kept.
# Arithmetic: a 10-min video = 60 clips x 16 frames at 448x448 = 60 x (16/2 x 16 x 16) = 60 x 2048 video tokens
# to caption; its ~60 captions x ~150 words (~12k tokens) go to the question model once per category (4).
# Then: torchrun --nproc_per_node=8 train_grpo.py config/<preset>.py --data=/data/reason/train.jsonl \
#            --eval_data=/data/reason/eval.jsonl
clip_seconds = 10.0
frames_per_clip = 16
max_pixels = 448 * 448
caption_backend = "local"
caption_model = "Qwen/Qwen2.5-VL-7B-Instruct"
caption_batch_size = 8              # 8 clips x 2048 video tokens per generate() batch
caption_max_tokens = 512
question_backend = "openai"
question_base_url = "http://127.0.0.1:8000/v1"
question_model = "Qwen/Qwen3-32B"   # the name the server was started with; key (if any) in $OPENAI_API_KEY
question_max_tokens = 8192          # a thinking model reasons first; its <think> block is stripped before parsing
question_temperature = 0.6
max_caption_chars = 80000           # ~20k tokens of captions: keeps prompt + reply inside --max-model-len 32768
concurrency = 16
timeout_s = 600.0
eval_fraction = 0.05
filter_model = "Qwen/Qwen2.5-VL-7B-Instruct"   # the policy to be trained
filter_k = 8
filter_num_frames = 64
