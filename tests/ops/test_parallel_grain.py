"""The CPU ops give the same results on one thread and on all threads: the parallel grain
(csrc/cpu/common.h threads_for) only decides how work is split, never what is computed."""
import pytest
import torch

from strategies import ops
from tests.ops.conftest import TOLERANCE
from tests.ops.test_opcheck import cases

ALWAYS_PARALLEL, NEVER_PARALLEL = 0, 1 << 62


@pytest.fixture
def two_threads():
    """Two torch (OpenMP) threads for the test. An in-process vLLM CPU worker from an earlier test
    binds this process to one thread and replaces torch.set_num_threads with a no-op, so the
    underlying setter is called."""
    previous = torch.get_num_threads()
    torch._C.set_num_threads(2)
    assert torch.get_num_threads() == 2
    yield
    torch._C.set_num_threads(previous)


def run_at_grain(op, args, grain: int):
    fresh = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
    previous = ops.set_parallel_grain(grain)
    try:
        result = op(*fresh)
    finally:
        ops.set_parallel_grain(previous)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    mutated = [arg for arg in fresh if isinstance(arg, torch.Tensor)]  # in-place outputs included
    return [t for t in outputs if isinstance(t, torch.Tensor)] + mutated


def test_set_parallel_grain_returns_previous_and_negative_only_reads():
    previous = ops.set_parallel_grain(12345)
    try:
        assert ops.set_parallel_grain(-1) == 12345
        assert ops.set_parallel_grain(-1) == 12345
    finally:
        assert ops.set_parallel_grain(previous) == 12345
    assert ops.set_parallel_grain(-1) == previous


@pytest.mark.parametrize("op,args", list(cases()),
                         ids=lambda v: getattr(v, "_opname", None) if callable(v) else "")
def test_one_thread_equals_all_threads(op, args, two_threads):
    serial = run_at_grain(op, args, NEVER_PARALLEL)
    parallel = run_at_grain(op, args, ALWAYS_PARALLEL)
    assert len(serial) == len(parallel)
    for one, many in zip(serial, parallel):
        if one.is_floating_point():
            torch.testing.assert_close(many.float(), one.float(), **TOLERANCE[torch.float32])
        else:
            assert torch.equal(many, one)
