"""One model configuration (the training config's ``model`` section is LiTConfig) and one table of choices."""

import dataclasses

import pytest

from littune import LiTConfig
from littune.config import CHOICES, ModelSection, TrainConfig, load_config
from littune.errors import ConfigError


def test_model_section_is_the_model_config_with_one_set_of_defaults():
    assert ModelSection is LiTConfig
    cfg = load_config(overrides=["data.cache=x", "model.embed_dim=64", "model.setting=LU", "model.loss=sigmoid"])
    assert type(cfg.model) is LiTConfig
    assert (cfg.model.embed_dim, cfg.model.setting, cfg.model.loss) == (64, "LU", "sigmoid")
    assert dataclasses.asdict(TrainConfig().model) == dataclasses.asdict(LiTConfig())
    # The library's default model is what `littune train` trains by default.
    assert LiTConfig().image_tower == "efficientnet-lite0"
    assert LiTConfig().text_tower["width"] == 384 and LiTConfig().text_tower["pooling"] == "last"



@pytest.mark.parametrize("key", sorted(k for k in CHOICES if k.count(".") < 2 and k != "model.setting"))
def test_each_enumerated_option_is_refused_in_one_line_naming_its_key(key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.cache=x", f"{key}=bogus"])
    msg = str(e.value)
    assert msg.startswith(f"{key}: 'bogus' is not one of ") and "\n" not in msg
    assert all(v in msg for v in CHOICES[key])


@pytest.mark.parametrize("override,key", [
    ("model.setting=Lx", "model.setting"),
    ("model.image_tower=resnet-9000", "model.image_tower"),
    ("model.image_tower={type: caffe, path: x}", "model.image_tower.type"),
    ("model.text_tower={type: rnn}", "model.text_tower.type"),
    ("model.text_tower={type: transformer, tokenizer: wordpiece}", "model.text_tower.tokenizer"),
    ("model.text_tower={type: transformer, pooling: cls}", "model.text_tower.pooling"),
    ("model.text_tower={type: hf, path: minilm, pooling: last}", "model.text_tower.pooling"),
])
def test_tower_options_are_checked_when_the_config_loads(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(overrides=["data.cache=x", override])


def test_library_config_uses_the_same_checks():
    with pytest.raises(ConfigError, match="^model.loss: 'hinge' is not one of softmax, sigmoid$"):
        LiTConfig(loss="hinge")
    with pytest.raises(ConfigError, match="^model.text_head: "):
        LiTConfig(text_head="mlp")
    with pytest.raises(ConfigError, match="^model.setting: .*Valid settings"):
        LiTConfig(setting="XY")
    cfg = load_config(overrides=["data.cache=x"])
    cfg.optim.name = "sgd"  # changed after loading: validate() still catches it
    with pytest.raises(ConfigError, match="^optim.name: "):
        cfg.validate()


def test_optimiser_and_schedule_refuse_unknown_names_with_the_same_message(tiny_model):
    from littune.config import OptimSection
    from littune.optim import build_optimizer, schedule_factor

    with pytest.raises(ConfigError, match="^optim.name: 'sgd' is not one of adamw, adam, adafactor$"):
        build_optimizer(tiny_model("Lu"), OptimSection(name="sgd"))
    with pytest.raises(ConfigError, match="^schedule.decay: 'step' is not one of "):
        schedule_factor(50, 100, 10, "step")
