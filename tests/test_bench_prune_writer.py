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
