"""Every command and job entrypoint takes flags and ``key=value`` overrides in any order."""

import importlib.util
from pathlib import Path

import pytest

from mmdist.bench import BENCHES
from mmdist.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]

# command words -> (arguments with overrides and positionals between and after flags,
#                   what the parse must hold)
CASES: dict[str, tuple[list[str], dict]] = {
    "train": (["--config", "tiny", "train.lr=0.001", "--num-cpus", "2", "model.fusion=add",
               "--json"],
              {"config": "tiny", "num_cpus": 2, "json": True,
               "overrides": ["train.lr=0.001", "model.fusion=add"]}),
    # the command of the issue: an override right after --space, and more --space after it
    "sweep": (["--config", "demo", "--space", "model.fusion=concat,attention",
               "train.num_workers=1", "--name", "s1", "tune.max_concurrent_trials=1",
               "--space", "train.lr=0.0003,0.003"],
              {"config": "demo", "name": "s1",
               "space": ["model.fusion=concat,attention", "train.lr=0.0003,0.003"],
               "overrides": ["train.num_workers=1", "tune.max_concurrent_trials=1"]}),
    "prepare": (["data.vocab_size=300", "--out", "shards", "data.shard_rows=50", "--source",
                 "synthetic", "--json"],
                {"out": "shards", "source": "synthetic", "json": True,
                 "overrides": ["data.vocab_size=300", "data.shard_rows=50"]}),
    "evaluate": (["--json", "--model", "models:/m@champion", "--data", "shards", "--split",
                  "train"],
                 {"json": True, "model": "models:/m@champion", "data": "shards",
                  "split": "train"}),
    "pull": (["--dst", "out", "models:/m@champion", "--json"],
             {"dst": "out", "uri": "models:/m@champion", "json": True}),
    "promote": (["models:/m/3", "--json", "--alias", "challenger"],
                {"uri": "models:/m/3", "json": True, "alias": "challenger"}),
    "predict": (["--text", "a red circle", "--json", "--model", "models:/m@champion"],
                {"text": "a red circle", "json": True, "model": "models:/m@champion"}),
    "serve": (["--port", "9001", "models:/m@champion", "--max-batch-size", "8", "--json"],
              {"port": 9001, "model": "models:/m@champion", "max_batch_size": 8, "json": True,
               "host": "127.0.0.1"}),
    "bench serve": (["--clients", "1,8", "--json", "--requests", "20"],
                    {"clients": "1,8", "json": True, "requests": 20}),
    "preflight": (["--sweep", "train.num_workers=1", "--timeout", "5",
                   "tune.max_concurrent_trials=1"],
                  {"sweep": True, "timeout": 5.0,
                   "overrides": ["train.num_workers=1", "tune.max_concurrent_trials=1"]}),
    "config": (["show", "--json", "tiny", "train.lr=0.1", "--json", "model.fusion=add"],
               {"action": "show", "preset": "tiny", "json": True,
                "overrides": ["train.lr=0.1", "model.fusion=add"]}),
    "cache": (["build", "data.path=shards", "--config", "tiny", "--num-cpus", "2",
               "model.freeze=[image_encoder]", "--json"],
              {"action": "build", "config": "tiny", "num_cpus": 2, "json": True,
               "keys": ["data.path=shards", "model.freeze=[image_encoder]"]}),
    "bench ingest": (["--rows", "64", "--json", "--cpus", "1"],
                     {"rows": 64, "json": True, "cpus": 1}),
    "bench train": (["--steps", "2", "train.micro_batch_size=4", "--config", "tiny",
                     "train.lr=0.01"],
                    {"steps": 2, "config": "tiny",
                     "overrides": ["train.micro_batch_size=4", "train.lr=0.01"]}),
    "bench zero": (["--vocab-size", "100", "model.size=tiny", "--json", "train.zero_stage=3"],
                   {"vocab_size": 100, "json": True,
                    "overrides": ["model.size=tiny", "train.zero_stage=3"]}),
    "bench adapt": (["--lm-width", "64", "model.size=tiny", "--json", "--lm-layers", "2"],
                    {"lm_width": 64, "lm_layers": 2, "json": True,
                     "overrides": ["model.size=tiny"]}),
    "bench mfu": (["--steps", "1", "train.micro_batch_size=2", "--warmup", "0",
                   "model.size=tiny"],
                  {"steps": 1, "warmup": 0,
                   "overrides": ["train.micro_batch_size=2", "model.size=tiny"]}),
    "bench fusion": (["--rows", "200", "train.lr=0.001", "--methods", "concat", "--jobs", "1"],
                     {"rows": 200, "methods": "concat", "jobs": 1,
                      "overrides": ["train.lr=0.001"]}),
    "bench sweep": (["--space", "model.fusion=concat,add", "train.max_steps=2", "--config",
                     "tiny", "--space", "train.lr=0.003"],
                    {"space": ["model.fusion=concat,add", "train.lr=0.003"], "config": "tiny",
                     "overrides": ["train.max_steps=2"]}),
}

# jobs/*.py -> the command whose arguments it takes
JOBS = {"train.py": "train", "sweep.py": "sweep", "prepare_data.py": "prepare",
        "evaluate.py": "evaluate", "predict.py": None, "serve.py": "serve"}
PREDICT_JOB = (["--model", "m", "--data", "shards", "--json", "--out", "preds", "--actors", "2"],
               {"model": "m", "data": "shards", "json": True, "out": "preds", "actors": 2})


def _check(args, expected: dict) -> None:
    got = {k: getattr(args, k, "<missing>") for k in expected}
    assert got == expected


def test_every_command_has_a_case():
    words = {c for c in COMMANDS if c != "bench"} | {f"bench {b}" for b in BENCHES}
    assert set(CASES) == words


@pytest.mark.parametrize("words", sorted(CASES))
def test_command_takes_flags_and_overrides_in_any_order(words):
    argv, expected = CASES[words]
    args = build_parser().parse_args([*words.split(), *argv])
    assert args._command == words.split()[0]
    _check(args, expected)


def test_unknown_flag_still_refused_with_its_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", "tiny", "train.num_workers=1", "--bogus", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus 3" in capsys.readouterr().err


def test_missing_positional_and_bad_choice_still_named(capsys):
    with pytest.raises(SystemExit):
        main(["pull", "--dst", "out"])
    assert "the following arguments are required: uri" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "--json", "nope"])
    assert "argument action: invalid choice: 'nope'" in capsys.readouterr().err


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name[:-3]}", ROOT / "jobs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_job_has_a_case():
    assert {p.name for p in (ROOT / "jobs").glob("*.py")} == set(JOBS)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_takes_flags_and_overrides_in_any_order(name):
    argv, expected = CASES[JOBS[name]] if JOBS[name] else PREDICT_JOB
    _check(_job(name).build_parser().parse_args(argv), expected)


def test_job_help_lists_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        _job("sweep.py").build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "KEY=VALUE" in out and "--space" in out
