"""The config as pydantic models: choices typed from the tuples, strict types read from CLI text,
rules that still run beside type errors, derived values as properties, config_io kept private."""

from typing import get_args

import grimp
import pytest

from mmdist import config
from mmdist.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config


@pytest.mark.parametrize("section,field,choices", [
    (ModelConfig, "task", config.TASKS), (ModelConfig, "size", config.SIZES),
    (ModelConfig, "fusion", config.FUSIONS), (ModelConfig, "fusion_stage", config.FUSION_STAGES),
    (ModelConfig, "text_encoder", config.TEXT_ENCODERS),
    (ModelConfig, "image_encoder", config.IMAGE_ENCODERS),
    (ModelConfig, "audio_encoder", config.AUDIO_ENCODERS),
    (ModelConfig, "decoder", config.DECODERS),
    (ModelConfig, "lm_conditioning", config.LM_CONDITIONING),
    (ModelConfig, "vqa_answer", config.VQA_ANSWERS), (TrainConfig, "precision", config.PRECISIONS),
    (config.TuneConfig, "scheduler", config.SCHEDULERS),
    (config.TuneConfig, "search", config.SEARCH_ALGS),
])
def test_choice_tuples_are_the_field_types(section, field, choices):
    assert get_args(section.model_fields[field].annotation) == choices
    assert get_args(get_args(ModelConfig.model_fields["modalities"].annotation)[0]) \
        == config.MODALITIES


def test_cli_text_is_read_as_yaml_for_the_field_type():
    cfg = load_config("demo", ["train.num_workers=2.0", "train.lr=1", "train.use_gpu=yes",
                               "tracking.experiment=123", "data.path=null",
                               "model.modalities=[text, image]", "tune.metric=val_loss"])
    assert cfg.train.num_workers == 2 and isinstance(cfg.train.num_workers, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.use_gpu is True and cfg.tracking.experiment == "123"
    assert cfg.data.path is None and cfg.model.modalities == ["text", "image"]


@pytest.mark.parametrize("override,problem", [
    ("train.num_workers=true", "train.num_workers='true': expected int"),
    ("train.num_workers=1.5", "train.num_workers='1.5': expected int"),
    ("train.use_gpu=1", "train.use_gpu='1': expected bool"),
    ("train.lr=true", "train.lr='true': expected float"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in [0, 1)"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0: must be >= 1"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must be >= 0 (0 = off)"),
    ("train.zero_stage=4", "train.zero_stage=4: must be in [0, 3]"),
    ("model.modalities=text,smell", "model.modalities=['text', 'smell']: unknown 'smell'; "
                                    "choose from ['text', 'image', 'audio', 'video']"),
    ("model.modalities=[]", "model.modalities=[]: must not be empty"),
    ("model.task_weights=5", "model.task_weights='5': expected dict[str, float]"),
    ("tracking.experiment=", "tracking.experiment='': must not be empty"),
    ("tune.metric=loss", "tune.metric='loss': must match '^val_'"),
])
def test_each_problem_names_key_value_and_rule(override, problem):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert e.value.problems == [problem]


def test_rules_still_run_beside_type_errors_in_one_report():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.lr=abc", "train.global_batch_size=65",
                             "model.fusion=attention", "model.fusion_stage=late", "model.bogus=1",
                             "model.image_encoder=vit_b_16", "data.image_size=40"])
    keys = ["train.lr=", "train.global_batch_size=65", "model.fusion=attention", "model.bogus",
            "data.image_size=40"]
    assert len(e.value.problems) == len(keys), e.value.problems
    for key in keys:
        assert any(p.startswith(key) for p in e.value.problems), key


def test_root_and_sections_must_be_mappings():
    with pytest.raises(ConfigError, match=r"<root>: expected a mapping, got \[1\]"):
        Config.from_dict([1])
    with pytest.raises(ConfigError, match="model: expected a mapping, got 5"):
        Config.from_dict({"model": 5})
    with pytest.raises(ConfigError, match=r"foo: unknown key; known keys: \['data'"):
        Config.from_dict({"foo": 1})


def test_derived_values_are_properties_and_resolve_lists_them():
    cfg = load_config("demo", ["train.num_workers=2", "train.micro_batch_size=8",
                               "train.global_batch_size=64", "tune.metric=val_loss"])
    t = cfg.train
    assert (t.world_size, t.train_batch_size, t.grad_accum_steps) == (2, 64, 4)
    assert (cfg.primary_metric, cfg.metric_mode) == ("val_loss", "min")
    assert cfg.resolve() == {"world_size": 2, "zero_stage": 2, "global_batch_size": 64,
                             "grad_accum_steps": 4, "primary_metric": "val_loss",
                             "metric_mode": "min"}
    assert load_config("demo", ["model.task=lm"]).metric_mode == "min"
    assert load_config("demo").resolve()["global_batch_size"] == 64  # 32 x 2, no accumulation


def test_fields_can_be_assigned_and_derived_values_follow():
    cfg = load_config("demo")
    cfg.train.num_workers = 4
    assert cfg.train.world_size == 4 and cfg.resolve()["global_batch_size"] == 128
    assert cfg.override({}) == cfg


def test_sections_built_directly_are_validated_too():
    assert DataConfig(image_size=16, val_fraction=0.25).image_size == 16
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        DataConfig(image_size=0)
    with pytest.raises(ValueError, match="late fusion combines one pooled"):
        ModelConfig(fusion="attention", fusion_stage="late")


def test_config_io_is_private_to_config():
    graph = grimp.build_graph("mmdist")
    assert graph.find_modules_that_directly_import("mmdist.config_io") == {"mmdist.config"}
    assert not {m for m in graph.find_modules_directly_imported_by("mmdist.config_io")
                if m.startswith("mmdist")}
    # the config reads the registry's names (its choices) and the model parts model.freeze
    # names (config_parts); neither imports anything of ours
    assert {m for m in graph.find_modules_directly_imported_by("mmdist.config")
            if m.startswith("mmdist")} == {"mmdist.config_io", "mmdist.config_parts",
                                           "mmdist.registry"}
    for leaf in ("mmdist.registry", "mmdist.config_parts"):
        assert not {m for m in graph.find_modules_directly_imported_by(leaf)
                    if m.startswith("mmdist")}, leaf
