"""pixelflow.profiling: live tensor bytes on CPU, FLOP counts, seconds per call, the MFU peak."""

import torch

from pixelflow.profiling import TensorMemoryTracker, count_flops, device_peak_tflops, timed


def test_tracker_counts_live_storage_until_it_is_freed_and_keeps_the_high_water_mark():
    kept = torch.zeros(1000)  # made outside the mode: counted once tracked
    tracker = TensorMemoryTracker()
    tracker.track(kept, kept[10:], "not a tensor", torch.zeros(3, device="meta"))  # a view shares its storage
    assert tracker.current == tracker.peak == 4000
    with tracker:
        temporary = torch.ones(2000)
        assert tracker.current == 12000
        del temporary
        assert tracker.current == 4000 and tracker.peak == 12000
        tracker.reset_peak()
        half = kept[:500] * 2
    assert tracker.peak == tracker.current == 6000
    del half
    assert tracker.current == 4000


def test_flops_of_a_matmul_and_seconds_per_call():
    a, b = torch.zeros(8, 16), torch.zeros(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    calls = []
    assert timed(lambda: calls.append(1), torch.device("cpu"), repeats=3) >= 0
    assert len(calls) == 4  # one warm-up call, then the timed ones


def test_peak_tflops_is_the_override_or_unknown_off_cuda():
    assert device_peak_tflops(torch.device("cpu"), 123.0) == 123.0
    assert device_peak_tflops(torch.device("cpu")) is None

