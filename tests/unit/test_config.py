import json
import subprocess
import sys

import pytest
import yaml

from mmdist.config import (
    FUSIONS,
    Config,
    ConfigError,
    apply_overrides,
    list_presets,
    load_config,
)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    d = cfg.to_dict()
    assert Config.from_dict(d) == cfg
    # through YAML too (what travels to Ray workers / MLflow artifacts)
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert json.loads(json.dumps(d)) == d


def test_demo_preset_exists():
    assert "demo" in list_presets()


def test_overrides_apply_with_types():
    cfg = load_config("demo", ["model.fusion=attention", "train.lr=3e-4", "train.num_workers=1",
                               "train.use_gpu=true", "model.modalities=text,image",
                               "model.task_weights.itm=0.5"])
    assert cfg.model.fusion == "attention"
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.num_workers == 1 and cfg.train.use_gpu is True
    assert cfg.model.modalities == ["text", "image"]
    assert cfg.model.task_weights == {"itm": 0.5}


def test_bad_float_names_key():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.lr=abc"])
    assert "train.lr='abc'" in str(e.value) and "float" in str(e.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["model.fusion=nope"])
    msg = str(e.value)
    assert "model.fusion='nope'" in msg
    for name in FUSIONS:
        assert name in msg


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.learning_rate=0.1"])
    assert "train.learning_rate: unknown key" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["trian.lr=0.1"])
    assert "unknown section 'trian'" in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.lr=abc", "model.fusion=nope", "model.bogus=1",
                             "train.zero_stage=7", "data.val_fraction=1.5"])
    keys = ["train.lr", "model.fusion", "model.bogus", "train.zero_stage", "data.val_fraction"]
    assert len(e.value.problems) == 5
    for key in keys:
        assert any(p.startswith(key) for p in e.value.problems), key


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config("demo", ["train.global_batch_size=65"])
    with pytest.raises(ConfigError, match="cross-attention"):
        load_config("demo", ["model.fusion=attention", "model.fusion_stage=late"])
    # fp16 trains on CPU too (DeepSpeed's loss-scaled fp16 over gloo; test_train_precision)
    assert load_config("demo", ["train.precision=fp16"]).train.precision == "fp16"


def test_resolve_derives_accumulation():
    cfg = load_config("demo", ["train.num_workers=2", "train.micro_batch_size=8",
                               "train.global_batch_size=64"])
    r = cfg.resolve()
    assert r["grad_accum_steps"] == 4 and r["world_size"] == 2
    assert r["primary_metric"] == "val_accuracy" and r["metric_mode"] == "max"


def test_space_is_validated():
    cfg = load_config("demo", ["tune.space.model.fusion=[concat,add]"])
    assert cfg.tune.space == {"model.fusion": ["concat", "add"]}
    with pytest.raises(ConfigError, match="choice 'zzz' is invalid"):
        load_config("demo", ["tune.space.model.fusion=[concat,zzz]"])
    with pytest.raises(ConfigError, match="not a config key"):
        apply_overrides(Config().to_dict(), {"tune.space.model.nothing": [1]})


def test_yaml_file_and_missing_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  fusion: add\ntrain:\n  epochs: 1\n")
    assert load_config(str(p)).model.fusion == "add"
    with pytest.raises(FileNotFoundError, match="presets"):
        load_config(str(tmp_path / "missing.yaml"))


def test_hostile_yaml_is_refused_naming_the_file_and_builds_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    files = {
        # a Python tag: safe loading refuses it, nothing runs
        "tag.yaml": f"model: !!python/object/apply:os.system ['touch {marker}']\n",
        # a billion laughs: 9 levels of 10 aliases, 10**9 values once expanded
        "laughs.yaml": "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
            for p, c in zip("abcdefgh", "bcdefghi")) + "train: {epochs: 1}\n",
        "loop.yaml": "model: &m\n  inner: *m\n",
        "huge.yaml": "train:\n  epochs: 1\n" + "# padding\n" * 200_000,
    }
    expected = {"tag.yaml": "python/object", "laughs.yaml": "expand to",
                "loop.yaml": "refers to itself", "huge.yaml": "at most"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(str(tmp_path / name))
        assert name in str(e.value) and expected[name] in str(e.value), str(e.value)
    assert not marker.exists()
    # anchors within reason still work
    (tmp_path / "ok.yaml").write_text("model: &m {fusion: add}\ntrain: {epochs: 1}\n")
    assert load_config(str(tmp_path / "ok.yaml")).model.fusion == "add"


def test_a_key_given_twice_with_two_values_is_refused_by_name(capsys):
    from mmdist.cli import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["config", "show", "demo", "train.lr=0.1", "model.fusion=add", "train.lr=0.2"])
    assert e.value.code == 2
    assert "train.lr is given twice (train.lr=0.1, then train.lr=0.2)" in capsys.readouterr().err
    args = build_parser().parse_args(["config", "show", "demo", "train.lr=0.1", "train.lr=0.1"])
    assert args.overrides == ["train.lr=0.1", "train.lr=0.1"]  # the same value twice is fine


def _mmdist(*args):
    return subprocess.run([sys.executable, "-m", "mmdist.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_config_show_json():
    r = _mmdist("config", "show", "demo", "model.fusion=add", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["config"]["model"]["fusion"] == "add"
    assert out["derived"]["world_size"] == 2


def test_cli_bad_override_exit_code_and_message():
    r = _mmdist("config", "show", "demo", "train.lr=abc", "model.fusion=nope")
    assert r.returncode == 1
    assert "train.lr='abc'" in r.stderr and "model.fusion='nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_subcommand_has_help(capsys):
    from mmdist.cli import COMMANDS, main

    # in process (each `python -m mmdist.cli` pays ~5 s of imports); the real entry point is
    # exercised by the subprocess tests around this one
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0, name
        assert "--json" in out and f"mmdist {name}" in out, (name, out[:300])


def test_config_error_survives_a_process_boundary():
    """Ray re-raises a worker's exception from its pickle: the problems must come back whole
    (they came back one character per problem)."""
    import pickle

    e = ConfigError(["train.lr='abc': expected float", "model.fusion='nope': unknown"], "x.yaml")
    back = pickle.loads(pickle.dumps(e))
    assert back.problems == e.problems and str(back) == str(e)
