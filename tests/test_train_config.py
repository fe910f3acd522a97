"""Training config: official base.yaml keys, our keys, and every bad-input case."""

from __future__ import annotations

from pathlib import Path

import pytest

import esft_rs
from esft_rs.errors import InvalidFileError
from esft_rs.training import TrainConfig, load_config

# The official ESFT configs/base.yaml, values and comments as released.
OFFICIAL_BASE = """\
seed: 5934875
# Model settings
seq_length: 4096  # Maximum sequence length

# Data settings
per_device_batch_size: 1
n_device: 8  # Number of devices

# Training settings
optim: adamw_torch_fused
steps: 500  # Number of training steps
learning_rate: 0.00001  # Learning rate
weight_decay: 0.1  # Weight decay for optimizer
warmup_steps: 0  # Number of warmup steps for learning rate scheduler
logging_steps: 10  # Log every X steps
adam_beta1: 0.9
adam_beta2: 0.95
random_concat_ratio: 0.2  # Ratio of random concatenation

# Evaluation settings
eval_steps: 100  # Evaluate every X steps
save_steps: 100  # Save model every X steps

# Additional settings (if needed)
gradient_checkpointing: true
gradient_accumulation_steps: 16
max_grad_norm: 1.0  # Max gradient norm for gradient clipping
ep_size: 2
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text(text)
    return p


def test_starter_configs(tmp_path: Path) -> None:
    configs = Path(__file__).resolve().parent.parent / "configs"
    # configs/base.yaml is the official file, comments included, under a header of ours
    text = (configs / "base.yaml").read_text()
    assert text.endswith(OFFICIAL_BASE) and load_config(configs / "base.yaml")[0] == TrainConfig()
    small, notes = load_config(configs / "small.yaml")
    assert not notes and small.steps * small.seq_length * small.per_device_batch_size <= 100_000
    assert not small.gradient_checkpointing and small.gradient_accumulation_steps == 1


def test_starter_configs_ship_in_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """``-c small`` names the packaged file, wherever esft-rs is run; a clone's configs/
    holds the same files; a file of that name here wins; a wrong name says what exists."""
    from esft_rs.training.config import STARTER_CONFIGS, config_path, starter_config

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    for name in STARTER_CONFIGS:
        packaged = starter_config(name)
        assert packaged.is_file() and packaged.parent.parent == Path(esft_rs.__file__).parent
        assert load_config(name)[0] == load_config(root / "configs" / f"{name}.yaml")[0]
        assert (root / "configs" / f"{name}.yaml").read_bytes() == packaged.read_bytes()
    # the wheel carries them (maturin's include list)
    tomllib = pytest.importorskip("tomllib")
    includes = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["maturin"]["include"]
    assert any(Path(f"python/esft_rs/configs/{n}.yaml").match(i["path"])
               for n in STARTER_CONFIGS for i in includes)
    write(tmp_path, "steps: 3\n").rename(tmp_path / "small")
    assert config_path("small") == Path("small") and load_config("small")[0].steps == 3
    with pytest.raises(esft_rs.EsftError, match=r"smal: No such file or directory \(nor a"
                       r" starter config: base, small\)"):
        load_config("smal")


def test_official_base_yaml_loads_unchanged(tmp_path: Path) -> None:
    cfg, notes = load_config(write(tmp_path, OFFICIAL_BASE))
    # Our defaults are the official values, so the file changes nothing.
    assert cfg == TrainConfig()
    assert cfg.learning_rate == 1e-5 and cfg.gradient_accumulation_steps == 16
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay) == (0.9, 0.95, 0.1)
    assert (cfg.mode, cfg.lr_scheduler, cfg.val_ratio) == ("esft", "constant", 0.02)
    assert [n.split(": ")[1] for n in notes] == [
        "n_device is ignored", "optim is ignored", "ep_size is ignored"]


def test_our_keys_and_yaml_float_strings(tmp_path: Path) -> None:
    cfg, notes = load_config(write(
        tmp_path, "learning_rate: 1e-4\nmode: random\nlr_scheduler: cosine\nsteps: 7\n"))
    assert (cfg.learning_rate, cfg.mode, cfg.lr_scheduler) == (1e-4, "random", "cosine")
    assert not notes
    assert cfg.with_overrides({"steps": 3, "mode": None}).steps == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 0.1\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ("nonsense_key: 1\n", "unknown key 'nonsense_key'"),
        ("steps: many\n", "steps must be int, got 'many'"),
        ("steps: 1.5\n", "steps must be int, got 1.5"),
        ("gradient_checkpointing: 1\n", "gradient_checkpointing must be bool, got 1"),
        ("learning_rate: fast\n", "learning_rate must be float, got 'fast'"),
        ("steps: 0\n", "steps must be positive, got 0"),
        ("adam_beta2: 1.5\n", "adam_beta2 must be in [0, 1), got 1.5"),
        ("adam_beta1: 1.0\n", "adam_beta1 must be in [0, 1), got 1.0"),  # torch refused it
        ("adam_beta2: 1\n", "adam_beta2 must be in [0, 1), got 1.0"),
        ("val_ratio: 1\n", "val_ratio must be in [0, 1), got 1.0"),
        ("mode: lora\n", "mode must be one of esft, full, random, got 'lora'"),
        ("- steps\n", "expected a mapping of keys to values"),
        ("steps: [1\n", "not valid YAML"),
    ],
)
def test_bad_config(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidFileError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override_names_the_arguments() -> None:
    with pytest.raises(InvalidFileError, match=r"^arguments: steps must be positive"):
        TrainConfig().with_overrides({"steps": -1}, "arguments")
