"""
A training checkpoint (torch.distributed.checkpoint shards from train_grpo.py) -> a Hugging Face folder that
`from_pretrained` and vLLM load (standard safetensors + config + generation config + processor).

    python merge.py --checkpoint=runs/grpo --out=runs/grpo/hf          # the run's newest complete step_* folder
    python merge.py --checkpoint=runs/grpo/step_00000200 --out=hf --base=Qwen/Qwen2.5-VL-3B-Instruct
    python rollout.py --model=runs/grpo/hf --eval=eval.jsonl            # or: vllm serve runs/grpo/hf

Input: DIR/step_XXXXXXXX/ holds {"model": the policy's HF-named state dict, "optim": ...}, sharded by however many
ranks trained; it is read here into plain CPU tensors, in one process, with no process group (the optimizer state
is never read). The base model (architecture, config, processor) is the `model` of the run's config.json unless
--base is given (a relative path there is taken from the folder the run was started in, found from its out_dir).
Every key and shape of the checkpoint must match the base model's, else the error names both sources and the
mismatching keys. Weights are saved in the base checkpoint's dtype (bf16 for Qwen releases; the fp32 master
weights are rounded once) unless --dtype says otherwise. --out may be inside the run folder, but neither the run
folder itself (its config.json would be overwritten) nor in a step_* folder.
cf. EasyR1 scripts/model_merger.py (FSDP shards -> save_pretrained).
"""
import glob
import json
import os
import time
from dataclasses import dataclass

import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoProcessor

from common import latest_checkpoint
from configurator import parse_config
from vlm import load_model


@dataclass
class MergeConfig:
    checkpoint: str = ""            # a run folder (its newest complete step_* is used) or one step_* folder
    out: str = ""                   # output folder for save_pretrained (model + processor)
    base: str = ""                  # base model folder / hub id (default: `model` in the run's config.json)
    dtype: str = "auto"             # auto (the base checkpoint's dtype) | float32 | bfloat16 | float16


def run_model(run_config: str) -> str:
    """The `model` a run's config.json names. A relative folder is relative to where the run was started: the run
    folder's ancestor that its out_dir (relative too) leads from, so a merge from another folder finds it."""
    with open(run_config) as f:
        run = json.load(f)
    if not isinstance(run, dict) or "model" not in run:
        raise ValueError(f"{run_config} has no \"model\" field (not a train_grpo.py / train_sft.py config.json; a "
                         "merge with --out=the run folder used to overwrite it): give the base model with --base")
    model, out_dir = run["model"], run.get("out_dir") or ""
    if model and not os.path.isabs(model) and out_dir and not os.path.isabs(out_dir):
        started = os.path.dirname(run_config)
        for _ in os.path.normpath(out_dir).split(os.sep):
            started = os.path.dirname(started)
        if os.path.normpath(os.path.join(started, out_dir)) == os.path.dirname(run_config) and \
                os.path.isdir(os.path.join(started, model)):  # (else a hub id, or a folder from here)
            model = os.path.join(started, model)
    return model


def resolve(checkpoint: str, base: str = "") -> tuple:
    """(step folder, base model, where the base came from, the model the run trained) for a run or step folder."""
    step_dir = checkpoint if os.path.exists(os.path.join(checkpoint, ".metadata")) else latest_checkpoint(checkpoint)
    if not step_dir:
        raise ValueError(f"{checkpoint}: neither a checkpoint folder (with .metadata) nor a run folder with a "
                         "complete step_* checkpoint")
    run_config = os.path.join(os.path.dirname(os.path.abspath(step_dir)), "config.json")
    if base:
        try:
            trained = run_model(run_config) if os.path.exists(run_config) else f"unknown (no {run_config})"
        except ValueError:
            trained = f"unknown ({run_config} names no model)"
        return step_dir, base, "--base", trained
    if not os.path.exists(run_config):
        raise ValueError(f"{run_config} not found: give the base model with --base")
    trained = run_model(run_config)
    if not trained:  # a synthetic run (the CPU demo) names no model: it made its tiny one in tiny-model/
        tiny = os.path.join(os.path.dirname(run_config), "tiny-model")
        if not os.path.exists(os.path.join(tiny, "config.json")):
            raise ValueError(f"{run_config} names no model and there is no {tiny}: give the base model with --base")
        return step_dir, tiny, f"{run_config} (synthetic run: its tiny-model/)", tiny
    return step_dir, trained, run_config, trained


def checkpoint_shapes(step_dir: str) -> dict:
    """{HF name: shape} of the model tensors in a DCP checkpoint, read from its metadata (no tensor is loaded)."""
    meta = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    return {k[len("model."):]: tuple(m.size) for k, m in meta.items() if k.startswith("model.") and hasattr(m, "size")}


def check_match(step_dir: str, saved: dict, model, base: str, base_from: str, trained: str):
    """Raise naming both sources and the mismatching keys unless the checkpoint has exactly the model's tensors."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    shapes = [f"{k}: checkpoint {saved[k]} vs base {want[k]}" for k in sorted(want.keys() & saved.keys())
              if saved[k] != want[k]]
    if missing or unexpected or shapes:
        show = lambda xs: "; ".join(xs[:5]) + (f"; ... ({len(xs)} in all)" if len(xs) > 5 else "")
        raise ValueError(
            f"checkpoint {step_dir} (a run of {trained}) does not match the base model {base} (from {base_from}, "
            f"{model.config.model_type}): {len(shapes)} shape mismatches [{show(shapes)}], {len(missing)} keys "
            f"missing from the checkpoint [{show(missing)}], {len(unexpected)} unexpected [{show(unexpected)}]. "
            "Pass the model the run trained as --base")


def check_out(out: str, step_dir: str):
    """--out must not be the run folder (save_pretrained would overwrite the run's config.json, which the next merge
    reads) nor a step_* folder or inside one (the checkpoint's own files; rotated out with the step)."""
    run_dir, out = os.path.realpath(os.path.dirname(os.path.abspath(step_dir))), os.path.realpath(out)
    if out == run_dir:
        raise ValueError(f"--out={out}: the run folder itself (its config.json would be overwritten); give a new "
                         f"folder, e.g. {os.path.join(run_dir, 'hf')}")
    for step in glob.glob(os.path.join(run_dir, "step_*")):
        if out == step or out.startswith(step + os.sep):
            raise ValueError(f"--out={out}: inside the checkpoint {step} of the run {run_dir}; give a new folder, "
                             f"e.g. {os.path.join(run_dir, 'hf')}")


def merge(cfg: MergeConfig) -> str:
    t0 = time.time()
    step_dir, base, base_from, trained = resolve(cfg.checkpoint, cfg.base)
    check_out(cfg.out, step_dir)
    dtype = cfg.dtype
    try:  # a folder that is gone reads as a hub id to transformers: say where the name came from
        base_config = AutoConfig.from_pretrained(base)
    except OSError as e:
        raise ValueError(f"cannot load the base model {base} (from {base_from}): {e}. Give it with --base") from None
    if dtype == "auto":  # the dtype the base checkpoint ships in (fp32 for our tiny models, bf16 for Qwen's)
        dtype = str(getattr(base_config, "dtype", None) or "float32").replace("torch.", "")
    model, _ = load_model(base, dtype)  # every family vlm.py supports (the Omni thinker has no Auto class)
    check_match(step_dir, checkpoint_shapes(step_dir), model, base, base_from, trained)
    # DCP reads into the given tensors in place (casting fp32 -> the model's dtype); tied weights share storage
    dcp.load({"model": model.state_dict()}, checkpoint_id=step_dir, no_dist=True)
    os.makedirs(cfg.out, exist_ok=True)
    model.save_pretrained(cfg.out)  # safetensors + config.json + generation_config.json
    AutoProcessor.from_pretrained(base).save_pretrained(cfg.out)
    state = os.path.join(step_dir, "state.json")
    step = json.load(open(state)).get("step") if os.path.exists(state) else "?"
    n = sum(p.numel() for p in model.parameters())
    size = sum(os.path.getsize(os.path.join(cfg.out, f)) for f in os.listdir(cfg.out) if f.endswith(".safetensors"))
    print(f"merged {step_dir} (step {step}) onto {base} ({model.config.model_type}, from {base_from}): "
          f"{len(model.state_dict())} tensors, {n / 1e6:.1f}M parameters, {dtype}, {size / 2**20:.1f} MiB of "
          f"safetensors -> {cfg.out} ({time.time() - t0:.1f} s)")
    return cfg.out


if __name__ == "__main__":
    cfg = parse_config(MergeConfig)
    if not (cfg.checkpoint and cfg.out):
        raise SystemExit("give --checkpoint=DIR and --out=HF_DIR (see --help)")
    merge(cfg)
