"""Params of a resumed run: MLflow keeps the first value; what a resume changed goes on a tag."""

import json

from mlflow.tracking import MlflowClient

from mmdist import tracking


def test_a_resume_that_changes_a_param_says_so_on_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.get_or_create_run(uri, "e", "r")
    tracking.log_params(uri, run_id, {"train.num_workers": 2, "train.lr": 0.1})
    tracking.log_params(uri, run_id, {"train.num_workers": 2, "train.lr": 0.1})  # same: no tag
    assert tracking.CHANGED_ON_RESUME_TAG not in MlflowClient(uri).get_run(run_id).data.tags

    tracking.log_params(uri, run_id, {"train.num_workers": 3, "train.lr": 0.1, "new.key": 1})
    tracking.log_params(uri, run_id, {"train.num_workers": 3, "train.lr": 0.1})
    tracking.log_params(uri, run_id, {"train.num_workers": 2, "train.lr": 0.1})  # back again
    data = MlflowClient(uri).get_run(run_id).data
    assert data.params == {"train.num_workers": "2", "train.lr": "0.1", "new.key": "1"}
    assert json.loads(data.tags[tracking.CHANGED_ON_RESUME_TAG]) == {
        "train.num_workers": ["3", "2"]}
