"""The speed defaults of ``littune embed``: decoding workers, forward lanes and their threads never ask
for more cores than the process may use (a forward thread per core at most, one worker per two cores)."""

from __future__ import annotations

import pytest

from littune.cache import workers as W


@pytest.fixture
def cores(monkeypatch):
    """Pretend this process may run on ``n`` CPUs, with no thread settings in the environment."""
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def set_cpus(n: int):
        monkeypatch.setattr(W.os, "sched_getaffinity", lambda _pid: set(range(n)))

    return set_cpus


@pytest.mark.parametrize("cpus, workers, lanes, threads", [(1, 1, 1, 1), (2, 1, 2, 1), (4, 2, 2, 1),
                                                          (8, 4, 2, 2), (16, 6, 2, 5), (64, 6, 2, 29)])
def test_defaults_for_each_core_count(cores, cpus, workers, lanes, threads):
    cores(cpus)
    assert (W.default_workers(), W.default_lanes(), W.default_threads(W.default_workers(), W.default_lanes())) \
        == (workers, lanes, threads)


@pytest.mark.parametrize("cpus", [2, 3, 4, 6, 8, 12, 16, 32])
def test_forward_threads_and_workers_fit_the_cores_beyond_two(cores, cpus):
    cores(cpus)
    w, lanes = W.default_workers(), W.default_lanes()
    assert w + lanes * W.default_threads(w, lanes) <= max(cpus, w + lanes)  # only 1-thread lanes may share a core


def test_omp_num_threads_is_the_budget_of_all_lanes_together_not_of_each(cores, monkeypatch):
    """Bug: with OMP_NUM_THREADS=8 each of 2 lanes took 8 threads (16 spinning on 8 cores)."""
    cores(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert W.default_threads(W.default_workers(), 2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default
    assert W.default_threads(4, 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored
    assert W.default_threads(4, 2) == 2


def test_torchrun_local_ranks_share_the_cores(cores, monkeypatch):
    """Two ranks on one 16-core machine: each sizes itself for 8 cores."""
    cores(16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert W._cores() == 8 and W.default_workers() == 4 and W.default_threads(4, 2) == 2
