"""The prune bench's writer figures: writes beside the prune apart from the control window."""

from bench.console import write_figures


def test_writes_are_split_into_those_beside_the_prune_and_the_control():
    samples = [
        [100.0, 0.004],  # before the prune: control
        [101.0, 0.006],  # control
        [109.99, 0.050],  # started before the prune, still waiting when it began: beside it
        [150.0, 0.110],  # during
        [199.95, 0.020],  # during, ends after it
        [201.0, 0.003],  # after: neither
    ]
    figures = write_figures(samples, prune_started=110.0, prune_ended=200.0)
    assert figures["writes"] == 3
    assert figures["longest_write_stall_ms"] == 110.0
    assert figures["write_p50_ms"] == 50.0
    assert figures["control_writes"] == 2
    assert figures["control_longest_write_stall_ms"] == 6.0
    assert figures["control_write_p50_ms"] == 6.0


def test_no_writes_give_no_figures():
    figures = write_figures([], prune_started=1.0, prune_ended=2.0)
    assert figures["writes"] == 0
    assert figures["longest_write_stall_ms"] is None
    assert figures["control_writes"] == 0


def test_the_longest_writes_show_their_wait_for_the_turn_and_the_prunes_holds_beside_them():
    samples = [
        [110.0, 0.004, 0.001],
        [120.0, 0.300, 0.290],  # waited out a checkpointer's turn
        [130.0, 0.050, 0.045],  # waited out a batch
    ]
    holds = [
        ["batch", 119.0, 0.010, 0.001],
        ["checkpointer", 120.01, 0.280],
        ["batch", 129.99, 0.040, 0.002, 0.001, 0.003, 0.030],
    ]
    figures = write_figures(samples, prune_started=100.0, prune_ended=200.0, holds=holds)
    assert figures["longest_writes"][:2] == [
        {"at_s": 20.0, "ms": 300.0, "turn_wait_ms": 290.0, "prune_holds_ms": [["checkpointer", 280.0]]},
        {
            "at_s": 30.0,
            "ms": 50.0,
            "turn_wait_ms": 45.0,
            "prune_holds_ms": [["batch", 40.0, 2.0, 1.0, 3.0, 30.0]],
        },
    ]
    assert (figures["longest_batch_hold_ms"], figures["longest_checkpointer_hold_ms"]) == (40.0, 280.0)
