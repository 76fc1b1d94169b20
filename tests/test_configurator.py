"""
configurator.py: presets, --key=value overrides, loud errors, --help from the dataclass comments.
    python -m pytest tests/test_configurator.py -q
"""
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest

from configurator import parse_config


@dataclass
class Cfg:
    lr: float = 1e-3            # learning rate
    steps: int = 10             # optimizer steps
    name: str = "run"           # run name
    bf16: bool = False          # bf16 compute
    sizes: list = field(default_factory=lambda: [1, 2])  # sizes to try
    limit: Optional[int] = None  # optional cap


def test_defaults_preset_then_flags(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("# a preset\nlr = 3e-4\nsteps = 2 * 50\n")
    cfg = parse_config(Cfg, [str(preset), "--steps=7", "--bf16", "--sizes=[64,256]", "--limit=5", "--name=x"])
    assert (cfg.lr, cfg.steps, cfg.bf16, cfg.sizes, cfg.limit, cfg.name) == (3e-4, 7, True, [64, 256], 5, "x")
    assert parse_config(Cfg, ["--bf16=false", "--limit=none"]).bf16 is False
    assert parse_config(Cfg, []) == Cfg()


@pytest.mark.parametrize("argv, message", [
    (["--lrr=1"], "unknown flag --lrr"),
    (["--steps=ten"], "--steps: expected int"),
    (["--bf16=maybe"], "--bf16: expected true/false"),
    (["--sizes=[1,"], "--sizes: expected JSON"),
    (["--steps"], "--steps: a bare flag is only for true/false fields"),   # not a 1-step run
    (["--lr"], "--lr: a bare flag"),                                       # not lr=True
    (["--name"], "--name: a bare flag"),
])
def test_bad_flags_fail_loudly(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(Cfg, argv)


@pytest.mark.parametrize("text, message", [
    ('steps = "10"', "field 'steps' = '10' (str), expected int"),
    ("steps = 2.5", "field 'steps' = 2.5 (float), expected int"),
    ("lr = 'fast'", "field 'lr' = 'fast' (str), expected float"),
    ("bf16 = 1", "field 'bf16' = 1 (int), expected bool"),
    ("steps = True", "field 'steps' = True (bool), expected int"),
    ("name = None", "field 'name' = None (NoneType), expected str"),
    ("sizes = 4", "field 'sizes' = 4 (int), expected list"),
])
def test_preset_values_are_type_checked(tmp_path, text, message):
    preset = tmp_path / "bad.py"
    preset.write_text(text + "\n")
    with pytest.raises(ValueError, match=re.escape(f"bad.py: {message}")):
        parse_config(Cfg, [str(preset)])


def test_preset_int_for_float_tuple_for_list_none_for_optional(tmp_path):
    preset = tmp_path / "ok.py"
    preset.write_text("lr = 1\nsizes = (3, 4)\nlimit = None\n")
    cfg = parse_config(Cfg, [str(preset)])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.sizes == [3, 4] and cfg.limit is None


def test_unknown_name_in_preset_fails(tmp_path):
    preset = tmp_path / "typo.py"
    preset.write_text("lr = 1e-4\nlearning_rate = 1e-4\n")
    with pytest.raises(ValueError, match=r"typo.py: unknown config field\(s\) \['learning_rate'\]"):
        parse_config(Cfg, [str(preset)])


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py", "rollout.py"])
def test_help_lists_every_field_with_its_meaning(script):
    import dataclasses
    import importlib
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    module = importlib.import_module(script[:-3])
    cls = {"train_grpo.py": "Config", "train_sft.py": "Config", "rollout.py": "RolloutConfig"}[script]
    for f in dataclasses.fields(getattr(module, cls)):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert len(line.split("]", 1)[1].strip()) > 5, f"--{f.name} has no help text"


def test_every_shipped_preset_parses_and_passes_its_scripts_checks():
    """config/*.py: each preset's fields exist in its script's Config, and the GRPO / SFT presets pass the
    start-up checks (the SFT presets, train_sft.py's; the rest of the video ones, train_grpo.py's)."""
    import glob
    import os
    import train_grpo
    import train_sft
    from configurator import parse_config
    from data import make_reason_data
    import train_diffusion_rl
    presets = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "config", "*.py")))
    assert len(presets) >= 15
    for path in presets:
        name = os.path.basename(path)
        if name.startswith(("tiny_image", "tiny_video", "sd3", "wan")):
            parse_config(train_diffusion_rl.Config, [path])
        elif name.startswith("reason_data"):
            parse_config(make_reason_data.Config, [path])
        elif name.endswith("_sft.py") and not name.endswith("from_sft.py"):
            train_sft.check_config(parse_config(train_sft.Config, [path]))
        else:
            train_grpo.check_config(parse_config(train_grpo.Config, [path]))
