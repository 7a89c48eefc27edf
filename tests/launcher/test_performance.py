"""GPU speed options that run on CPU too: channels_last and torch.compile (once per batch stage,
partial micro-batches and evaluation eager), against the same run without them."""
import re

import torch

import pytest

from helpers import base_recipe, cli, final_params, metric_rows, train_ranks, write_recipe


@pytest.mark.e2e       # compiles in a fresh process: dynamo's caches and counters are per process
def test_compile_and_channels_last_match_the_eager_run_and_compile_once_per_stage(tmp_path):
    common = {"epochs": 2, "data.size": 200, "distributed.nproc_per_node": 1, "distributed.max_micro_batch": 64,
              "checkpoint.every_steps": 0, "eval.full_grad_norm": False}
    eager = train_ranks(base_recipe(name="eager", **common), tmp_path)
    fast = write_recipe(tmp_path, base_recipe(name="fast", **{**common, "performance.compile": "default",
                                                              "performance.channels_last": True}), "fast.yaml")
    out = cli(["run", str(fast)], cwd=tmp_path, check=0).stdout
    # batch 16, 32 on one process: micro-batches of 16, 32 (each stage a new shape, and the last batch
    # of each epoch partial): one graph per stage, no more
    assert [(r["micro_batch"], r["accum"]) for r in metric_rows(tmp_path / "runs" / "fast")] == [(16, 1), (32, 1)]
    assert len(re.findall(r"compile \(default\): batch stage \d+: the micro-step of", out)) == 2
    assert "[qhm-launch] compile: 2 graphs compiled over the run" in out
    a, b = final_params(tmp_path / "runs" / "fast"), final_params(eager)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
