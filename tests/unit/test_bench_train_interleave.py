"""`mmdist bench train` interleaves its sides so the machine's swings hit them alike."""

from mmdist.bench.train import interleaved


def test_sides_take_turns_in_chunks_and_the_order_alternates():
    calls: list[tuple[str, int]] = []

    def side(name):
        def take(n):
            calls.append((name, n))
            return {"seconds": 0.5 * n, "steps": n, "forward": 0.1 * n}
        return take

    out = interleaved({"a": side("a"), "b": side("b"), "c": side("c")}, steps=12, chunk=5)
    assert calls == [("a", 5), ("b", 5), ("c", 5), ("c", 5), ("b", 5), ("a", 5),
                     ("a", 2), ("b", 2), ("c", 2)]
    for name in "abc":
        assert out[name]["steps"] == 12
        assert abs(out[name]["seconds"] - 6.0) < 1e-9 and abs(out[name]["forward"] - 1.2) < 1e-9
