"""The one validation layer of casa's configs (casa.config): types, ranges and
choices declared on the dataclass fields, unknown keys, `--set` parsing."""

import dataclasses
import math

import pytest

from casa.config import (
    ConfigError,
    FusionConfig,
    LMConfig,
    ModelConfig,
    VisionConfig,
    build,
    check_fields,
    parse_value,
)
from casa.pretrained.build_config import BuildConfig
from casa.training.config import TrainConfig, load_config


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("2.5", 2.5), ("-1e-4", -1e-4), ("true", True), ("null", None), ("[1, 2]", [1, 2]),
    ('{"a": 1}', {"a": 1}), ("casa", "casa"), ("runs/x", "runs/x"), ("", ""), ("NaN", math.nan),
])
def test_parse_value(text, value):
    got = parse_value(text)
    if text == "NaN":
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override,message", [
    ("train.steps=2.5", "train.steps=2.5: expected a whole number"),
    ("steps=0", "train.steps=0: must be >= 1"),
    ("lr_new=abc", "train.lr_new='abc': expected a finite number"),
    ("lr_new=-1", "train.lr_new=-1: must be >= 0"),
    ("lr_pretrained=NaN", "train.lr_pretrained=nan: expected a finite number"),
    ("lr_new=Infinity", "train.lr_new=inf: expected a finite number"),
    ("betas=[0.9, 1.5]", "train.betas=[0.9, 1.5]: must be < 1"),
    ("betas=[0.9]", "train.betas=[0.9]: expected a list of 2 finite numbers"),
    ("min_lr_ratio=2", "train.min_lr_ratio=2: must be <= 1"),
    ("grad_accum=true", "train.grad_accum=True: expected a whole number"),
    ("freeze_lm=1", "train.freeze_lm=1: expected true or false or null"),
    ("device=tpu", "train.device='tpu': expected auto, cpu, cuda, cuda:N or mps"),
    ("precision=fp8", "train.precision='fp8': expected one of auto, fp32, bf16"),
    ("train.steps.x=1", "train.steps={'x': 1}: expected a whole number"),
    ("difficulty=5", "train.difficulty=5: expected a table of keys"),
    ("model.lm=3", "model.lm=3: expected a table of keys"),
    ("model.lm.d_model=big", "model.lm.d_model='big': expected a whole number"),
    ("model.fusion.variant=casa_x", "model.fusion.variant='casa_x': expected one of insertion, ca, "),
    ("model.fusion.layers=[0, -2]", "model.fusion.layers=[0, -2]: must be >= 0"),
    ("model.vision.token_reduction=max", "model.vision.token_reduction='max': expected one of none, unshuffle"),
    ("model.lm.dmodel=3", "model.lm: unknown keys ['dmodel']"),
    ("optim.lr=3", "train: unknown keys ['optim']"),
    ("=3", "--set '=3': expected key=value"),
])
def test_wrong_values_name_key_value_and_expectation(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_a_value_below_a_value_from_a_file_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"--set 'train.steps.x=1': train.steps=3 is a value, not a section"):
        load_config(f, ["train.steps.x=1"])
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match=r"c.toml.*cannot parse it as TOML"):
        load_config(f)
    f.write_text("[1, 2]")
    g = tmp_path / "c.json"
    g.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"c.json.*expected a table with 'model' and 'train' sections"):
        load_config(g)
    with pytest.raises(ValueError, match="is a directory"):
        load_config(tmp_path)


def test_values_are_normalised():
    model, train = load_config(None, ["lr_new=1", "betas=[0.8, 0.9]", "model.vision.image_mean=[0, 0, 1]",
                                      "model.lm.rope_theta=500", "model.fusion.layers=[2, 0, 2]"])
    assert train.lr_new == 1.0 and type(train.lr_new) is float and train.betas == (0.8, 0.9)
    assert model.vision.image_mean == (0.0, 0.0, 1.0) and type(model.lm.rope_theta) is float
    assert model.fusion.layers == [0, 2]


def test_python_construction_obeys_the_same_rule():
    with pytest.raises(ConfigError, match=r"FusionConfig.variant='bad': expected one of"):
        FusionConfig(variant="bad")
    with pytest.raises(ConfigError, match=r"LMConfig.n_heads=0: must be >= 1"):
        LMConfig(n_heads=0)
    with pytest.raises(ConfigError, match=r"LMConfig: d_model=30 is not divisible by n_heads=4"):
        LMConfig(d_model=30)
    with pytest.raises(ConfigError, match=r"VisionConfig.image_std=\(0.5, 0, 0.5\): must be > 0"):
        VisionConfig(image_std=(0.5, 0, 0.5))
    with pytest.raises(ConfigError, match=r"train.steps=0: must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"build.vision_trainable_blocks=-5: must be >= -1"):
        BuildConfig(lm="x", vision_trainable_blocks=-5)
    with pytest.raises(ConfigError, match=r"build.fusion.every=0: must be >= 1"):
        BuildConfig(lm="x", fusion={"every": 0})
    assert BuildConfig(lm="x", fusion={"variant": "ca"}).fusion == FusionConfig(variant="ca")


@pytest.mark.parametrize("cls", [LMConfig, VisionConfig, FusionConfig, TrainConfig])
def test_every_field_annotation_is_checked(cls):
    """Each field of each config type-checks its own default (an unsupported annotation would raise)."""
    obj = cls()
    check_fields(obj)
    for f in dataclasses.fields(cls):
        with pytest.raises(ConfigError, match=rf"{f.name}=<object"):
            build(cls, {f.name: object()}, cls.__name__)


def test_model_config_round_trip():
    cfg = ModelConfig.from_dict({"lm": {"d_model": 64}, "fusion": {"variant": "ca", "layers": [1]}})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
