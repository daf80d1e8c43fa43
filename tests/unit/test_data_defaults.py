"""What the data decides when the config leaves it open: the class count of a class head."""

import pytest

from mmdist.config import load_config
from mmdist.errors import CommandError
from mmdist.models import build_model
from mmdist.train.startable import label_problems, with_data_defaults
from tests.unit.synthetic_mm import VOCAB


def _manifest(top: int | None) -> dict:
    return {"labels": {"rows": 10, "max": top, "counts": {}}}


@pytest.mark.parametrize("task", ["model.task=classify", "model.task=vqa"])
def test_num_classes_comes_from_the_largest_label(task):
    cfg = load_config("tiny", [task, "model.vqa_answer=classify"])
    assert cfg.model.num_classes == 0  # the default: from the data
    got = with_data_defaults(cfg, _manifest(9))
    assert got.model.num_classes == 10
    assert label_problems(cfg, _manifest(9)["labels"], "shards") == []
    assert with_data_defaults(cfg, _manifest(0)).model.num_classes == 2  # one label seen
    model = build_model(got, VOCAB)  # a class head as wide as the data needs
    widths = [m.net[-1].out_features for m in model.modules() if type(m).__name__ == "MLPHead"]
    assert 10 in widths


def test_a_set_value_is_kept_and_checked_against_the_data():
    cfg = load_config("tiny", ["model.task=classify", "model.num_classes=4"])
    assert with_data_defaults(cfg, _manifest(2)).model.num_classes == 4
    assert label_problems(cfg, _manifest(9)["labels"], "shards") == [
        "model.num_classes=4 but the data has labels up to 9 (shards): set "
        "model.num_classes=10 (labels count from 0)"]


def test_no_labels_to_count_is_a_clear_error():
    cfg = load_config("tiny", ["model.task=classify"])
    with pytest.raises(CommandError, match=r"model\.num_classes=0 .* record no class label"):
        with_data_defaults(cfg, _manifest(None))
    with pytest.raises(ValueError, match=r"model\.num_classes=0 \(from the data\) .* set "
                                         r"model\.num_classes"):
        build_model(cfg, VOCAB)
    itm = load_config("tiny", ["model.task=itm"])  # no class head: nothing to decide
    assert with_data_defaults(itm, _manifest(None)).model.num_classes == 0
