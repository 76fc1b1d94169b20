"""
merge.py: 2 gloo ranks train one GRPO step and save (FSDP2 shards); the merged HF folder loads with
from_pretrained and gives the training model's logits; a checkpoint of another model fails with a clear error.
    python -m pytest tests/test_merge.py -q
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import merge
import vlm
import common as C
import train_grpo as T
from conftest import ROOT, torchrun, write_preset



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen2.5-VL trained by 2 torchrun ranks (a 2-step format warm-up, so that the weights surely move,
    then one GRPO step) and checkpointed as FSDP2 shards."""
    from data.synthetic import SyntheticConfig, make_dataset
    from data.tiny import make_tiny_model
    d = tmp_path_factory.mktemp("merge")
    make_dataset(SyntheticConfig(out=str(d / "data"), num_train=8, num_eval=4, frames=8, fps=4.0, seed=0))
    make_tiny_model(str(d / "model"), "qwen2_5_vl", seed=0)
    cfg = T.Config(out_dir=str(d / "run"), data=str(d / "data" / "train.jsonl"), model=str(d / "model"),
                   num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28, rollout_batch_size=4, n=4, max_new_tokens=8,
                   lr=1e-2, max_steps=1, save_every=1, progress=False, gradient_checkpointing=False, sft_steps=2,
                   sft_batch_size=4, sft_lr=1e-2)
    torchrun("train_grpo.py", [write_preset(cfg, d / "preset.py")])
    return d


def logits(model, processor, video_path):
    """Full-vocabulary logits [1, L, V] of a fixed prompt with a video (vision tower, decoder and lm_head)."""
    video = vlm.load_video(video_path, T.Config(num_frames=8, max_pixels=28 * 28, min_pixels=28 * 28), "qwen2_5_vl")
    p = vlm.build_prompt(model, processor, "What colour was the flash?", video)
    with torch.no_grad():
        hidden, _ = vlm.decoder_hidden(model, p.input_ids[None], p.positions[:, None],
                                       vlm.encode_videos(model, [p]))
        return model.lm_head(hidden)


def test_merged_logits_equal_training_model(trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = merge.merge(merge.MergeConfig(checkpoint=str(trained / "run"), out=str(tmp_path / "hf")))
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)  # the processor travelled with the weights
    # the training model: a fresh base model restored through train_grpo's own resume path
    model, _ = vlm.load_model(str(trained / "model"))
    base_logits = logits(model, processor, str(trained / "data" / "eval" / "00000.mp4"))
    C.load_checkpoint(C.latest_checkpoint(str(trained / "run")), model, torch.optim.AdamW(model.parameters()))
    want = logits(model.eval(), processor, str(trained / "data" / "eval" / "00000.mp4"))
    got = logits(merged, processor, str(trained / "data" / "eval" / "00000.mp4"))
    assert (want - base_logits).abs().max() > 1e-3  # the step changed the model, so equality below means something
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert merged.config.model_type == "qwen2_5_vl" and merged.dtype == torch.float32
    assert any(f.endswith(".safetensors") for f in os.listdir(out))


def test_checkpoint_of_another_model_is_a_clear_error(trained, tmp_path):
    from data.tiny import TinySize, make_tiny_model
    other = make_tiny_model(str(tmp_path / "wide"), "qwen2_5_vl", TinySize(hidden=96, heads=4, kv_heads=2))
    with pytest.raises(ValueError, match=r"a run of .*model\) does not match the base model .*wide.*from --base") as e:
        merge.merge(merge.MergeConfig(checkpoint=str(trained / "run"), out=str(tmp_path / "hf"), base=other))
    assert re.search(r"shape mismatches \[lm_head.weight: checkpoint \(\d+, 64\) vs base \(\d+, 96\)", str(e.value))
    qwen3 = make_tiny_model(str(tmp_path / "q3"), "qwen3_vl")
    with pytest.raises(ValueError, match=r"qwen3_vl.*keys missing from the checkpoint"):
        merge.merge(merge.MergeConfig(checkpoint=str(trained / "run" / "step_00000001"), out=str(tmp_path / "o"),
                                      base=qwen3))
    with pytest.raises(ValueError, match="complete step_"):
        merge.merge(merge.MergeConfig(checkpoint=str(tmp_path), out=str(tmp_path / "o")))


def test_cli(trained, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "merge.py"), f"--checkpoint={trained / 'run'}",
                          f"--out={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "merged" in run.stdout and "step 1" in run.stdout
    assert os.path.exists(tmp_path / "hf" / "config.json")


def test_synthetic_run_merges_onto_its_tiny_model(tmp_path):
    """A synthetic run (the CPU demo: config.json names no model) resolves to the tiny model it made in tiny-model/;
    without that folder the error says to pass --base."""
    step = tmp_path / "run" / "step_00000002"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": ""}))
    with pytest.raises(ValueError, match="names no model.*--base"):
        merge.resolve(str(step))
    (tmp_path / "run" / "tiny-model").mkdir()
    (tmp_path / "run" / "tiny-model" / "config.json").write_text("{}")
    step_dir, base, source, trained = merge.resolve(str(step))
    assert base == trained == str(tmp_path / "run" / "tiny-model") and "synthetic run" in source


def test_out_in_the_run_or_a_step_folder_is_refused(trained, tmp_path):
    """--out=the run folder would overwrite its config.json (the next merge then failed with KeyError 'model');
    inside a step folder it would mix into the checkpoint (and go when the step is rotated out)."""
    run = shutil.copytree(trained / "run", tmp_path / "run")
    before = (run / "config.json").read_text()
    for out in (run, run / "step_00000001", run / "step_00000001" / "hf", tmp_path / "run" / "." ):
        with pytest.raises(ValueError, match=r"--out=.*: (the run folder|inside the checkpoint) .*run"):
            merge.merge(merge.MergeConfig(checkpoint=str(run), out=str(out)))
    with pytest.raises(ValueError, match=r"--out=.*inside the checkpoint"):
        merge.merge(merge.MergeConfig(checkpoint=str(run / "step_00000001"), out=str(run / "step_00000001")))
    assert (run / "config.json").read_text() == before and not (run / "model.safetensors").exists()
    assert merge.merge(merge.MergeConfig(checkpoint=str(run), out=str(run / "hf"))) == str(run / "hf")  # beside: fine


def test_run_config_model_path_is_resolved_or_clearly_missing(trained, tmp_path, monkeypatch):
    """A run trained from the project folder with relative paths (--model=models/m --out_dir=runs/r) merges from
    any working directory; a config.json without "model", or a base model that is gone, is a clear error."""
    proj = tmp_path / "proj"
    run = shutil.copytree(trained / "run", proj / "runs" / "r")
    shutil.copytree(trained / "model", proj / "models" / "m")
    (run / "config.json").write_text(json.dumps({"model": "models/m", "out_dir": "runs/r"}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    step_dir, base, source, trained_model = merge.resolve(str(run))
    assert base == trained_model == str(proj / "models" / "m") and source == str(run / "config.json")
    assert merge.merge(merge.MergeConfig(checkpoint=str(run), out="hf")) == "hf"
    (run / "config.json").write_text(json.dumps({"out_dir": "runs/r"}))  # e.g. another tool's config.json
    with pytest.raises(ValueError, match=r"config.json has no \"model\" field.*--base"):
        merge.resolve(str(run))
    (run / "config.json").write_text(json.dumps({"model": "models/gone", "out_dir": "runs/r"}))
    with pytest.raises(ValueError, match=r"(?s)cannot load the base model models/gone \(from .*config.json\).*--base"):
        merge.merge(merge.MergeConfig(checkpoint=str(run), out="hf2"))

