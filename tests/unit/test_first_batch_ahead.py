"""FirstBatchAhead: the first item is pulled before anyone iterates; items, order and errors
are the wrapped iterator's own."""

import threading

import pytest

from mmdist.data.torch_batches import FirstBatchAhead


def test_the_first_item_is_pulled_before_iteration_and_order_is_kept():
    pulled = threading.Event()

    def gen():
        pulled.set()
        yield from range(5)

    ahead = FirstBatchAhead(gen())
    assert pulled.wait(10), "the first item was not requested before iterating"
    assert list(ahead) == [0, 1, 2, 3, 4]


def test_an_empty_iterator_yields_nothing():
    assert list(FirstBatchAhead(iter([]))) == []


def test_an_error_of_the_first_pull_reaches_the_consumer():
    def gen():
        raise OSError("shard 3 is gone")
        yield  # pragma: no cover

    ahead = FirstBatchAhead(gen())
    with pytest.raises(OSError, match="shard 3 is gone"):
        list(ahead)


def test_an_error_after_the_first_item_reaches_the_consumer_in_place():
    def gen():
        yield 1
        raise ValueError("row 7")

    it = iter(FirstBatchAhead(gen()))
    assert next(it) == 1
    with pytest.raises(ValueError, match="row 7"):
        next(it)
