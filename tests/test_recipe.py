"""
Long-RL's whole recipe on the CPU, every stage through its command line as the README's "Recipe" section gives
it: generated videos -> data/make_reason_data.py (the tiny model captions locally, a loopback OpenAI-compatible
server writes the questions) -> train_sft.py -> train_grpo.py --init_from -> merge.py -> rollout.py --eval on the
merged folder. Each stage reads only what the previous one wrote.
    python -m pytest tests/test_recipe.py -q
"""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT
from data.datasets import load_jsonl
from data.tiny import make_tiny_model
from data.video import write_video
from test_make_reason_data import Server


def run(args: list, env: dict) -> str:
    """`python SCRIPT --key=value ...` from the repository root, as a user types it; fail with its output."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_data_sft_rl_merge_eval(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(6):  # 11-s grey videos at 4 fps, a different level each: 2 clips of 5 s (+ the tail) apiece
        write_video(str(videos / f"v{k}.mp4"), (np.full((56, 56, 3), 30 * k + i, np.uint8) for i in range(44)), fps=4)
    tiny = make_tiny_model(str(tmp_path / "tiny"), "qwen2_5_vl", seed=0)
    server = Server()
    env = {"FAKE_KEY": "sk-t", "NO_PROXY": "127.0.0.1,localhost"}
    frames = ["--num_frames=8", "--max_pixels=3136", "--min_pixels=3136", "--progress=False"]
    try:
        data = tmp_path / "reason"
        run(["data/make_reason_data.py", f"--videos={videos}", f"--out={data}", "--caption_backend=local",
             f"--caption_model={tiny}", "--caption_max_tokens=6", "--clip_seconds=5.0", "--frames_per_clip=4",
             f"--question_base_url={server.url}", "--question_model=qm", "--question_api_key_env=FAKE_KEY",
             "--eval_fraction=0.3", "--retry_backoff_s=0.0", "--progress=False"], env)
    finally:
        server.server.shutdown()
        server.server.server_close()
    cot, held_out = load_jsonl(str(data / "cot.jsonl")), load_jsonl(str(data / "eval.jsonl"))
    assert len(cot) >= 4 and held_out and all(s.reasoning for s in cot)   # 6 videos x 4 categories, split by video

    sft = tmp_path / "sft"
    out = run(["train_sft.py", f"--model={tiny}", f"--data={data / 'cot.jsonl'}", f"--eval_data={data / 'eval.jsonl'}",
               f"--out_dir={sft}", "--batch_size=4", "--micro_batch_size=4", "--max_steps=2", "--lr=1e-3",
               "--max_new_tokens=16", "--gradient_checkpointing=False", *frames], env)
    assert "held-out: loss" in out and os.path.isdir(sft / "step_00000002")

    grpo = tmp_path / "grpo"
    out = run(["train_grpo.py", f"--model={tiny}", f"--init_from={sft}", f"--data={data / 'train.jsonl'}",
               f"--eval_data={data / 'eval.jsonl'}", f"--out_dir={grpo}", "--rollout_batch_size=2", "--n=2",
               "--max_steps=1", "--save_every=1", "--max_new_tokens=16", "--lr=1e-3",
               "--gradient_checkpointing=False", *frames], env)
    assert f"weights from {sft / 'step_00000002'}" in out and os.path.isdir(grpo / "step_00000001")

    out = run(["merge.py", f"--checkpoint={grpo}", f"--out={grpo / 'hf'}"], env)
    assert "merged" in out and os.path.exists(grpo / "hf" / "config.json")

    preds = tmp_path / "preds.jsonl"
    out = run(["rollout.py", f"--model={grpo / 'hf'}", f"--eval={data / 'eval.jsonl'}", f"--out={preds}",
               "--max_new_tokens=16", *frames], env)
    assert "accuracy" in out and "read as" in out
    header, *rows = [json.loads(line) for line in open(preds)]
    assert header["settings"]["model"] == str(grpo / "hf") and header["settings"]["num_frames"] == 8
    assert len(rows) == len(held_out) and all("read_as" in r for r in rows)
