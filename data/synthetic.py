"""
The synthetic long-video task: proof that RL makes the model *look at the video*.

    python data/synthetic.py --out=runs/synthetic --num_train=512 --num_eval=256 --frames=64

Each video is a long stream of grey noise frames; in one short segment at a random time the whole frame
flashes one of four colours. The question is always "What colour was the flash?" with the options in a fixed
order (A red, B green, C blue, D yellow), so the answer is visible only in the video: a model that ignores the
frames scores 25%, and only one that finds the flash among the video tokens scores higher. The eval set is
balanced over the four answers (a model that always says one letter scores exactly 25%).

Videos are written with PyAV (data/video.py) at `fps` frames per second; everything is deterministic from
--seed. With `--leak_control` the flash colour is drawn independently of the answer, so nothing can be learned
(the control run must stay at chance).
"""
import json
import os
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__":  # run as a script: import from the repo root, not from data/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from configurator import parse_config
from data.tiny import make_tiny_model
from data.video import write_video

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (235, 220, 30)}
OPTIONS = [f"{letter}. {name}" for letter, name in zip("ABCD", COLOURS)]
QUESTION = "What colour was the flash?"


def make_frames(rng: np.random.Generator, frames: int, size: int, flash_len: int, colour: tuple):
    """[frames, size, size, 3] uint8: grey levels with pixel noise, and a full-frame colour flash somewhere."""
    level = rng.integers(60, 190, size=(frames, 1, 1, 1))
    video = np.clip(level + rng.normal(0, 20, size=(frames, size, size, 3)), 0, 255).astype(np.uint8)
    start = int(rng.integers(0, frames - flash_len + 1))
    video[start:start + flash_len] = np.array(colour, dtype=np.uint8)
    return video, start


PITCH = {"red": 330.0, "green": 440.0, "blue": 660.0, "yellow": 880.0}  # Hz of the beep heard with each flash


def flash_tone(rng, cfg, start: int, hz: float, sr: int = 16000) -> np.ndarray:
    """Quiet noise over the whole video and a beep at `hz` while the flash is on (audio for Omni models)."""
    t = np.arange(int(cfg.frames / cfg.fps * sr)) / sr
    wave = rng.normal(0, 0.01, len(t))
    on = (t >= start / cfg.fps) & (t < (start + cfg.flash_frames) / cfg.fps)
    return (wave + on * 0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_split(out_dir: str, split: str, count: int, rng, cfg, balanced: bool) -> str:
    rows = []
    names = list(COLOURS)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for i in range(count):
        answer = i % 4 if balanced else int(rng.integers(0, 4))
        shown = int(rng.integers(0, 4)) if cfg.leak_control else answer
        frames, start = make_frames(rng, cfg.frames, cfg.size, cfg.flash_frames, COLOURS[names[shown]])
        rel = os.path.join(split, f"{i:05d}.mp4")
        audio = flash_tone(rng, cfg, start, PITCH[names[shown]]) if cfg.audio else None
        write_video(os.path.join(out_dir, rel), frames, fps=cfg.fps, audio=audio)
        rows.append({"video": rel, "problem": QUESTION, "options": OPTIONS, "answer": "ABCD"[answer],
                     "problem_type": "multiple_choice", "category": "flash",
                     "flash_start_s": start / cfg.fps,
                     # a chain of thought for the SFT stage (train_sft.py): where the flash is, what it shows
                     "reasoning": f"the flash was {names[shown]} at {start / cfg.fps:.0f} seconds"})
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@dataclass
class SyntheticConfig:
    out: str = "runs/synthetic"     # output folder: train.jsonl, eval.jsonl, train/*.mp4, eval/*.mp4
    num_train: int = 512            # training videos
    num_eval: int = 256             # held-out videos (balanced over the four answers)
    frames: int = 64                # frames per video
    fps: float = 8.0                # frame rate of the written videos (frames / fps = duration in seconds)
    size: int = 28                  # frame side in pixels (28 = one Qwen2.5-VL merged patch per frame pair)
    flash_frames: int = 4           # length of the coloured flash, in frames
    audio: bool = False             # add an audio track: a beep whose pitch names the colour, during the flash
    leak_control: bool = False      # draw the flash colour independently of the answer (must stay at chance)
    seed: int = 0                   # everything is deterministic from this


def make_dataset(cfg: SyntheticConfig):
    """Write train and eval splits; returns (train_jsonl, eval_jsonl)."""
    rng = np.random.default_rng(cfg.seed)
    train = write_split(cfg.out, "train", cfg.num_train, rng, cfg, balanced=False)
    held_out = write_split(cfg.out, "eval", cfg.num_eval, rng, cfg, balanced=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(cfg.__dict__, f)
    return train, held_out


def run_inputs(cfg, make: bool = True) -> tuple:
    """(train jsonl, eval jsonl, model folder) of a training run (train_grpo.py, train_sft.py): cfg.data,
    cfg.eval_data and cfg.model, and with cfg.synthetic the CPU demo's files in cfg.out_dir for whichever is empty:
    the task in synthetic/ and a tiny random Qwen2.5-VL in tiny-model/, made once (by the rank with make=True;
    the caller's barrier holds the others back until they exist)."""
    if not cfg.synthetic:
        return cfg.data, cfg.eval_data, cfg.model
    data_dir, model_dir = os.path.join(cfg.out_dir, "synthetic"), os.path.join(cfg.out_dir, "tiny-model")
    if make and not os.path.exists(os.path.join(data_dir, "config.json")):
        print(f"making the synthetic task in {data_dir}", flush=True)
        make_dataset(SyntheticConfig(out=data_dir, num_train=cfg.synthetic_train, num_eval=cfg.synthetic_eval,
                                     frames=cfg.synthetic_frames, flash_frames=cfg.synthetic_flash, seed=cfg.seed,
                                     leak_control=cfg.synthetic_leak_control))
    if make and not cfg.model and not os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"making a tiny random Qwen2.5-VL in {model_dir}", flush=True)
        make_tiny_model(model_dir, "qwen2_5_vl", seed=cfg.seed)
    return (cfg.data or os.path.join(data_dir, "train.jsonl"), cfg.eval_data or os.path.join(data_dir, "eval.jsonl"),
            cfg.model or model_dir)


if __name__ == "__main__":
    cfg = parse_config(SyntheticConfig)
    t0 = time.time()
    train, held_out = make_dataset(cfg)
    print(f"wrote {cfg.num_train} train and {cfg.num_eval} eval videos of {cfg.frames} frames to {cfg.out} "
          f"in {time.time() - t0:.1f} s ({train}, {held_out})")
