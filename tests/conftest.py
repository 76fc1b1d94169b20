import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_preset(cfg, path) -> str:
    """A config dataclass written as a preset file (plain assignments), for scripts launched by torchrun."""
    with open(path, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in cfg.__dict__.items())
    return str(path)


def torchrun(script: str, args: list, nproc: int = 2, timeout: int = 300) -> str:
    """Run a script of the repo on `nproc` local gloo processes; fail with its output; return its stdout."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def eval_with_missing_videos(run_dir, tmp_path) -> str:
    """tiny_run's first 4 held-out rows, the first 2 pointing at videos that do not exist: an eval file to skip 2 of."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "data", "eval.jsonl"))][:4]
    for k, r in enumerate(rows):
        r["video"] = f"moved/{k}.mp4" if k < 2 else os.path.join(run_dir, "data", r["video"])
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "eval.jsonl")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Qwen2.5-VL (model/) and a small synthetic task (data/: 16 train and 8 eval videos of 8 frames, rows
    with a reasoning line), for the training scripts' tests."""
    from data.synthetic import SyntheticConfig, make_dataset
    from data.tiny import make_tiny_model
    d = tmp_path_factory.mktemp("run")
    make_dataset(SyntheticConfig(out=str(d / "data"), num_train=16, num_eval=8, frames=8, fps=4.0, seed=0))
    make_tiny_model(str(d / "model"), "qwen2_5_vl", seed=0)
    return d
