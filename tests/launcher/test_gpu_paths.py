"""GPU code paths, checked where they can be reached on a CPU: the CUDA RNG state layout, dynamo's
recompile limit on older torch, CUDA graphs refused with gradient accumulation, the augmentation fill
made once per device, and the TF32 switch."""
import os
import sys
import types

import pytest
import torch

from helpers import base_recipe, write_recipe
from launcher import config
from launcher.cli.main import main
from launcher.data import order
from launcher.train.build import apply_tf32
from launcher.train.stages import raise_recompile_limit
from launcher.train.state import RankRNG, own_device_state


def test_a_rank_restores_its_own_device_s_cuda_state_whatever_the_layout():
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]
    assert torch.equal(own_device_state(states, 2), states[2])      # layout before: every visible device
    assert own_device_state(states[:1], 2) is None                  # fewer GPUs visible now: nothing to restore
    assert own_device_state(states[1], 5) is states[1]              # own device only: taken as it is


def test_a_cpu_rank_saves_no_cuda_state_and_loads_an_old_one_without_error():
    rng = RankRNG(0, 0)
    state = rng.state_dict()
    assert "cuda" not in state
    rng.load_state_dict({**state, "cuda": [torch.zeros(4, dtype=torch.uint8)] * 8})   # written on an 8-GPU node


def test_the_recompile_limit_is_raised_under_either_name():
    new = types.SimpleNamespace(recompile_limit=8, cache_size_limit=8)      # torch >= 2.7
    raise_recompile_limit(new, 12)
    assert (new.recompile_limit, new.cache_size_limit) == (12, 8)
    old = types.SimpleNamespace(cache_size_limit=8)                          # torch 2.6
    raise_recompile_limit(old, 12)
    assert old.cache_size_limit == 12
    raise_recompile_limit(old, 4)
    assert old.cache_size_limit == 12                                        # never lowered


@pytest.mark.parametrize("perf,micro,refused", [
    ({"performance.compile": "reduce-overhead"}, 8, "performance.compile: 'reduce-overhead' is not valid with "
                                                    "gradient accumulation (epoch 1: batch 32 = 8 x 2 x 2"),
    ({"performance.compile": "max-autotune"}, "auto", "distributed.max_micro_batch: auto"),
    ({"performance.compile": "reduce-overhead"}, 32, None),                 # accumulation 1 in every stage
    ({"performance.compile": "default"}, 8, None),                          # no graphs: accumulation is fine
])
def test_cuda_graphs_with_gradient_accumulation_are_refused_before_anything_starts(tmp_path, capsys, monkeypatch,
                                                                                   perf, micro, refused):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))                 # `run` puts the working folder on both
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    recipe = base_recipe(**{**perf, "distributed.max_micro_batch": micro})
    path = write_recipe(tmp_path, recipe)
    from launcher.train import preflight
    if refused is None:
        preflight.preflight(config.load(path), 2)
        return
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and refused in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_submit_dry_run_refuses_cuda_graphs_with_accumulation_too(tmp_path, capsys, monkeypatch):
    """A login node checks without the data's factories, and still refuses what cannot run."""
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, base_recipe(**{"performance.compile": "reduce-overhead",
                                                 "distributed.max_micro_batch": 8}))
    assert main(["submit", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "performance.compile: 'reduce-overhead' is not valid with gradient accumulation" in err


def test_the_augmentation_fill_is_made_once_per_device_and_dtype():
    a = order.fill_tensor((0.5, 0.25, 0.0), 3, torch.float32, torch.device("cpu"))
    assert order.fill_tensor((0.5, 0.25, 0.0), 3, torch.float32, torch.device("cpu")) is a
    assert order.fill_tensor((), 2, torch.float64, torch.device("cpu")).tolist() == [0.0, 0.0]


def test_tf32_is_torch_s_default_unless_the_recipe_says_and_changes_the_trajectory():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_tf32(None)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        apply_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    old = config.from_dict(base_recipe()).to_dict()
    old["performance"].pop("tf32")                          # a checkpoint written before the key existed
    assert config.trajectory_diff(old, config.from_dict(base_recipe()).to_dict()) == []
    assert config.trajectory_diff(old, config.from_dict(base_recipe(**{"performance.tf32": True})).to_dict()) == [
        "performance.tf32: None -> True"]
