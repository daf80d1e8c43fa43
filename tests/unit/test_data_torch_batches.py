"""as_tensors, what every Ray Data batch mmdist consumes goes through (iter_torch), and the
prefetch choice (real batches: the integration tests of the data pipeline)."""

import numpy as np
import pytest
import torch

from mmdist.data.schema import as_tensors


def test_as_tensors_shares_memory_and_names_a_ragged_column():
    image = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)
    image.flags.writeable = False  # as a view of the object store is
    out = as_tensors({"image": image, "has_text": np.array([True, False])})
    assert out["image"].dtype == torch.uint8 and out["has_text"].dtype == torch.bool
    assert out["image"].data_ptr() == image.ctypes.data  # no copy
    with pytest.raises(TypeError, match="'text'"):
        as_tensors({"text": np.array(["a", None], dtype=object)})


def test_prefetch_only_where_blocks_can_be_remote(monkeypatch):
    from mmdist.data import ray_scheduling, torch_batches

    monkeypatch.setattr(ray_scheduling, "one_node", lambda: True)
    assert torch_batches.prefetch_batches() == 0
    monkeypatch.setattr(ray_scheduling, "one_node", lambda: False)
    assert torch_batches.prefetch_batches() == torch_batches.PREFETCH_BATCHES_MULTI_NODE > 0
