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
    assert LiTConfig().setting == "LL" and LiTConfig().text_tower == {"type": "hf", "path": "e5-small",
                                                                     "pooling": "mean", "context_length": 64}



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
        LiTConfig(text_head="conv")
    with pytest.raises(ConfigError, match="^model.setting: .*Valid settings"):
        LiTConfig(setting="XY")
    cfg = load_config(overrides=["data.cache=x"])
    cfg.optim.name = "sgd"  # changed after loading: validate() still catches it
    with pytest.raises(ConfigError, match="^optim.name: "):
        cfg.validate()


def test_optimiser_and_schedule_refuse_unknown_names_with_the_same_message(tiny_model):
    from littune.config import OptimSection
    from littune.train.optim import build_optimizer, schedule_factor

    with pytest.raises(ConfigError, match="^optim.name: 'sgd' is not one of adamw, adam, adafactor$"):
        build_optimizer(tiny_model("Lu"), OptimSection(name="sgd"))
    with pytest.raises(ConfigError, match="^schedule.decay: 'step' is not one of "):
        schedule_factor(50, 100, 10, "step")


@pytest.mark.parametrize("override,key", [
    ("model.embed_dim=0", "model.embed_dim"),
    ("model.temperature_init=-1", "model.temperature_init"),
    ("model.temperature_init=0", "model.temperature_init"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("keep_checkpoints=-1", "keep_checkpoints"),
    ("checkpoint_every=-5", "checkpoint_every"),
    ("val.every=-1", "val.every"),
    ("data.workers=-2", "data.workers"),
    ("log_every=0", "log_every"),
])
def test_out_of_range_values_are_refused_in_one_line_naming_the_key(override, key):
    """embed_dim=0 trained flat at ln B and exited 0; log_every=0 was a ZeroDivisionError traceback;
    temperature_init=-1 a 'math domain error' naming no key; the negative counts were taken silently."""
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.cache=x", override])
    assert str(e.value).startswith(f"{key}: must be ") and "\n" not in str(e.value)


def test_the_smallest_allowed_values_load():
    cfg = load_config(overrides=["data.cache=x", "model.embed_dim=1", "model.temperature_init=0.01",
                                 "schedule.warmup_steps=0", "optim.weight_decay=0", "keep_checkpoints=0",
                                 "checkpoint_every=0", "val.every=0", "data.workers=0", "log_every=1"])
    assert (cfg.model.embed_dim, cfg.keep_checkpoints, cfg.log_every) == (1, 0, 1)
    with pytest.raises(ConfigError, match="^model.embed_dim: must be >= 1"):
        LiTConfig(embed_dim=0)


@pytest.mark.parametrize("override,bad,good", [
    ("model.text_tower={type: hf, path: minilm, poolng: cls}", "model.text_tower.poolng", "model.text_tower.pooling"),
    ("model.text_tower={type: hf, path: minilm, context_lenght: 32}", "model.text_tower.context_lenght",
     "model.text_tower.context_length"),
    ("model.text_tower={type: hf, pth: minilm}", "model.text_tower.pth", "model.text_tower.path"),
    ("model.text_tower={type: transformer, widht: 32}", "model.text_tower.widht", "model.text_tower.width"),
    ("val.zeroshot=[{name: a, cache: x, clasnames: f.txt}]", "val.zeroshot[0].clasnames",
     "val.zeroshot[0].classnames"),
    ("val.zeroshot=[{cache: x}, {cache: y, template: short}]", "val.zeroshot[1].template",
     "val.zeroshot[1].templates"),
    ("val.retrieval=[{cache: x, group_by_fold: true}]", "val.retrieval[0].group_by_fold",
     "val.retrieval[0].group_by_folder"),
])
def test_misspelt_keys_inside_towers_and_validation_sets_are_refused_with_a_suggestion(override, bad, good):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.cache=x", override])
    assert str(e.value) == f"unknown configuration key {bad!r} (did you mean {good}?)"


def test_valid_tower_and_validation_set_keys_load():
    cfg = load_config(overrides=[
        "data.cache=x", "model.text_tower={type: hf, path: minilm, pooling: cls, context_length: 32, prefix: 'query: '}",
        "val.zeroshot=[{name: a, cache: x, classnames: f.txt, templates: short}]",
        "val.retrieval=[{name: b, cache: y, group_by_folder: true}]"])
    assert cfg.model.text_tower["prefix"] == "query: " and cfg.val.retrieval[0]["group_by_folder"] is True
    with pytest.raises(ConfigError, match=r"^val.zeroshot\[0\]: expected a mapping"):
        load_config(overrides=["data.cache=x", "val.zeroshot=[heldout]"])
    with pytest.raises(ConfigError, match=r"^val.retrieval\[0\].cache: "):
        load_config(overrides=["data.cache=x", "val.retrieval=[{name: b}]"])


def test_print_config_shows_the_overrides_and_refuses_an_unknown_key(capsys):
    """--print-config printed the defaults whenever the configuration did not load (a valid override
    hidden, an unknown key not reported); a configuration without data still prints."""
    import yaml

    from littune.cli import main

    assert main(["train", "--print-config", "--set", "optim.lr=0.5", "--set", "model.embed_dim=64"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["model"]["embed_dim"] == 64 and printed["data"]["cache"] is None
    assert main(["train", "--print-config", "--set", "optim.lrr=0.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == ("littune train: error: unknown configuration key 'optim.lrr' "
                                         "(did you mean optim.lr?)")
    assert main(["train", "--print-config", "--set", "model.embed_dim=0"]) == 2
    assert "model.embed_dim: must be >= 1" in capsys.readouterr().err
