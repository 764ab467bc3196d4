"""benchmarks/device_timing.py: how many operand copies a graph rotates through, and the
CPU path of the graph timer (the CUDA path runs in the GPU check's ceilings and micro steps)."""
import pytest
import torch

from benchmarks import device_timing as T

MB = 10 ** 6


@pytest.mark.parametrize("nbytes,l2,copies", [
    (4096 * 4096 * 2, 50 * MB, 6),        # o_proj fp16 (33.5 MB) on an H100: 6 x 33.5 = 201 > 200 MB
    (4096 * 4096 * 2, 60 * MB, 8),        # ... on an H200: 8 x 33.5 = 268 > 240 MB
    (22016 * 4096 * 2, 60 * MB, 2),       # gate_up (180 MB): 360 > 240
    (32016 * 4096 * 2, 60 * MB, 1),       # lm_head (262 MB) alone spans more than 4x the L2
    (4096 * 4096, 50 * MB, 12),           # o_proj int8 (16.8 MB) on an H100: 12 x 16.8 = 201 > 200
])
def test_rotation_spans_more_than_four_l2s(nbytes, l2, copies):
    assert T.rotation_count(nbytes, l2) == copies
    assert copies * nbytes > 4 * l2 and (copies == 1 or (copies - 1) * nbytes <= 4 * l2)


def test_rotating_copies_and_the_cpu_timer():
    calls = []
    copies = T.rotating_copies(lambda: torch.zeros(1024), 4096, "cpu")    # 4 kB each, 64 kB stand-in L2
    assert len(copies) == 4 * T.CPU_L2_BYTES // 4096 + 1
    secs = T.time_graphed([lambda i=i: calls.append(i) for i in range(3)], "cpu", reps=5)
    assert len(secs) == 5 and all(s >= 0 for s in secs)
    assert calls == [0, 1, 2] * (5 + 3)                 # 3 warm-up rounds, then 5 timed, in order
    with pytest.raises(ValueError, match="no calls"):
        T.time_graphed([], "cpu")
    with pytest.raises(ValueError, match="nbytes"):
        T.rotation_count(0, 1)
