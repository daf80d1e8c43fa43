"""Which sweep trial is registered: a finished one (it has a model), never an early rung."""

from mmdist.tune import best_trial


def _row(metric, model_dir=None):
    return {"metric": metric, "model_dir": model_dir, "overrides": {}}


def test_a_finished_trial_beats_a_better_looking_stopped_one():
    stopped = _row(0.69441)  # ASHA stopped it after its first report: no model
    finished = _row(0.69480, "/runs/t1/checkpoint/model")
    assert best_trial([stopped, finished], "min") is finished
    assert best_trial([_row(0.9), _row(0.8, "m")], "max")["model_dir"] == "m"


def test_the_best_finished_trial_wins_and_without_any_the_best_metric():
    a, b = _row(0.7, "a"), _row(0.6, "b")
    assert best_trial([a, b, _row(0.1)], "min") is b
    assert best_trial([_row(0.3), _row(0.2)], "min")["metric"] == 0.2
