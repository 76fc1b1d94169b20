import os
import subprocess
import sys

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
