"""max_micro_batch: auto, on CPU through the test hooks: the memory probe (doubling, bisection, margin,
minimum over ranks) and the back-off after an out-of-memory error in the middle of a step, which must
leave the update what it would have been."""
import re

import pytest
import torch

from helpers import base_recipe, final_params, metric_rows, train_ranks
from launcher.train.microbatch import largest_fitting


def test_largest_fitting_against_every_limit():
    for limit in range(1, 70):
        for capacity in range(0, 80):
            calls = []

            def fits(m, calls=calls, capacity=capacity):
                calls.append(m)
                return m <= capacity
            assert largest_fitting(fits, limit) == min(capacity, limit)
            assert len(calls) <= 2 * limit.bit_length() + 2


def recipe(name, **over):
    return base_recipe(**{"name": name, "precision": "fp64", "epochs": 3, "data.size": 200,
                          "checkpoint.every_steps": 0, **over})


def close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain run both tests compare against: in float64 the split of a batch changes nothing."""
    return train_ranks(recipe("ref"), tmp_path_factory.mktemp("ref"))


def test_the_probe_picks_the_largest_fitting_micro_batch_less_a_margin(tmp_path, reference):
    out = train_ranks(recipe("auto", **{"distributed.max_micro_batch": "auto"}), tmp_path,
                      env={"QHM_TEST_OOM_ABOVE": "3"})
    # shares of 8, 16, 32 per rank; 3 fit; 10% margin -> 2; every stage cut into micro-batches of 2
    assert [(r["micro_batch"], r["accum"]) for r in metric_rows(tmp_path / "runs" / "auto")] == [(2, 4), (2, 8), (2, 16)]
    assert len(re.findall(r"max_micro_batch auto: up to 3 samples fit here", out.output)) == 3
    close(final_params(tmp_path / "runs" / "auto"), final_params(reference))


def test_an_out_of_memory_error_halves_the_micro_batch_and_redoes_the_step(tmp_path, reference):
    out = train_ranks(recipe("oom", **{"distributed.max_micro_batch": "auto", "distributed.cpu_micro_batch": 8}),
                      tmp_path, env={"QHM_TEST_OOM_AT": "1:2:1"})   # rank 1 only
    assert "CUDA out of memory at epoch 1 step 2: the micro-batch is halved" in out.output
    rows = metric_rows(tmp_path / "runs" / "oom")
    assert [(r["micro_batch"], r["accum"]) for r in rows] == [(8, 1), (4, 4), (8, 4)]
    close(final_params(tmp_path / "runs" / "oom"), final_params(reference))
    for a, b in zip(rows, metric_rows(reference)):
        assert a["samples"] == b["samples"] and abs(a["train_loss"] - b["train_loss"]) < 1e-10


def test_a_redone_step_reads_the_same_samples_on_the_streamed_path_too(tmp_path):
    """The streamed loader has already handed over the step's micro-batches when the error comes: the
    redo must cut those same samples anew (not read the next step's), and the loader go on at the new
    split."""
    streamed = {"data.stream": True, "data.workers": 0}
    plain = train_ranks(recipe("sref", **streamed), tmp_path)
    out = train_ranks(recipe("soom", **streamed, **{"distributed.max_micro_batch": "auto",
                                                    "distributed.cpu_micro_batch": 8}),
                      tmp_path, env={"QHM_TEST_OOM_AT": "1:2:1"})
    assert "CUDA out of memory at epoch 1 step 2: the micro-batch is halved" in out.output
    assert [(r["micro_batch"], r["accum"]) for r in metric_rows(out)] == [(8, 1), (4, 4), (8, 4)]
    close(final_params(out), final_params(plain))
    for a, b in zip(metric_rows(out), metric_rows(plain)):
        assert a["samples"] == b["samples"] and abs(a["train_loss"] - b["train_loss"]) < 1e-10
