"""`mmdist train` without data.path generates ``data.synthetic_source``: the preset says which."""

import json

import pandas as pd
import pytest

from mmdist.config import SYNTHETIC_SOURCES, ConfigError, load_config
from mmdist.data.generated import synthetic_source_name
from mmdist.data.mmt import generate_row
from mmdist.data.sources import SOURCES
from mmdist.data.synthetic_video import summary_of
from mmdist.data.video import strip_to_frames
from mmdist.train.run import ensure_data
from tests.conftest import pretrained_overrides


def test_the_names_are_prepare_sources():
    assert set(SYNTHETIC_SOURCES) <= set(SOURCES)


@pytest.mark.parametrize("overrides,name", [
    ([], "synthetic"),
    (["model.modalities=[text,image,video]"], "synthetic_video"),
    (["data.synthetic_source=digits"], "digits"),
    (["model.modalities=[text,video]", "data.synthetic_source=synthetic"], "synthetic"),
])
def test_default_follows_the_model_and_the_key_wins(overrides, name):
    assert synthetic_source_name(load_config("tiny", overrides)) == name


def test_an_unknown_source_is_named():
    with pytest.raises(ConfigError, match="data.synthetic_source"):
        load_config("tiny", ["data.synthetic_source=shapes"])


def test_ref_mmt_without_data_path_trains_on_translation_rows(pretrained_dirs, tmp_path):
    cfg = load_config("ref_mmt", [*pretrained_overrides("ref_mmt", pretrained_dirs),
                                  "data.synthetic_samples=24", "data.image_size=32"])
    assert cfg.data.path is None and cfg.data.synthetic_source == "mmt"
    data = ensure_data(cfg, tmp_path / "cache")
    assert data.name.startswith("mmt-")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["source"] == "mmt" and manifest["counts"]["rows_written"] == 24
    rows = pd.concat([pd.read_parquet(data / s["path"]) for s in manifest["shards"]])
    assert len(rows) == 24
    for r in rows.itertuples():
        want = generate_row(int(r.sample_id), cfg.train.seed, 32)
        assert (r.text, r.target) == (want.text, want.target), r.sample_id
    # another source gets its own cache folder: no shards of one are reused for the other
    other = ensure_data(cfg.override({"data.synthetic_source": "synthetic"}), tmp_path / "cache")
    assert other != data and json.loads((other / "manifest.json").read_text())["source"] == \
        "synthetic"


def test_a_video_model_writing_text_gets_summaries(tmp_path):
    cfg = load_config("tiny", ["model.modalities=[text,audio,video]", "model.task=lm",
                               "data.synthetic_samples=8", "data.video_frames=3"])
    data = ensure_data(cfg, tmp_path / "cache")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["source"] == "synthetic_video"
    rows = pd.concat([pd.read_parquet(data / s["path"]) for s in manifest["shards"]])
    words = [t.split() for t in rows["target"]]
    assert all(w[0] == "a" and w[3] == "moves" for w in words), words
    assert all(summary_of(w[1], w[2], w[4], w[7]) == t for w, t in zip(words, rows["target"]))
    s = cfg.data.image_size
    assert strip_to_frames(rows["video"].iloc[0], 3, s).shape == (3, 3, s, s)
