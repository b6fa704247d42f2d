"""measure_cost: wall time and peak extra memory of a block."""

import time

import torch

from dpo_teach.cost import measure_cost


def test_measures_time_and_peak_memory_of_a_block():
    with measure_cost("cpu") as cost:
        big = torch.ones(40_000_000)  # 153 MiB
        time.sleep(0.05)
        del big
    assert cost.seconds >= 0.05
    assert 120 < cost.peak_memory_mb < 400, cost


def test_memory_held_before_the_block_is_not_counted():
    held = torch.ones(40_000_000)
    with measure_cost("cpu") as cost:
        time.sleep(0.02)
    assert cost.peak_memory_mb < 50, cost
    del held
