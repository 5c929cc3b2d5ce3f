from streams.progress import Progress


def test_lag_with_a_committed_offset_that_stands_still_counts_up() -> None:
    p = Progress()
    assert p.observe([("a", 10, 5)], now=100.0) == 0.0
    assert p.observe([("a", 12, 5)], now=130.0) == 30.0
    assert p.observe([("a", 12, 5), ("b", 3, 3)], now=160.0) == 60.0


def test_a_moving_committed_offset_or_no_lag_resets_the_partition() -> None:
    p = Progress()
    p.observe([("a", 10, 5)], now=0.0)
    assert p.observe([("a", 20, 6)], now=50.0) == 0.0  # slow but moving
    assert p.observe([("a", 20, 6)], now=80.0) == 30.0
    assert p.observe([("a", 20, 20)], now=90.0) == 0.0  # caught up
    assert p.observe([("a", 21, 20)], now=95.0) == 0.0  # new lag starts counting now
    assert p.observe([("a", 21, 20)], now=99.0) == 4.0


def test_never_committed_partition_with_input_counts_and_reset_forgets() -> None:
    p = Progress()
    p.observe([("a", 4, None)], now=0.0)
    assert p.observe([("a", 4, None), ("b", None, None)], now=7.0) == 7.0
    p.reset()
    assert p.observe([("a", 4, None)], now=8.0) == 0.0
    assert p.observe([], now=9.0) == 0.0
