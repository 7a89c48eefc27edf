"""GPU code paths, checked where they can be reached on a CPU: the CUDA RNG state layout, dynamo's
recompile limit on older torch, CUDA graphs refused with gradient accumulation, the augmentation fill
made once per device, and the TF32 switch."""
import os
import sys
import types

import pytest
import torch

from helpers import base_recipe, run_ranks, write_recipe
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



def _trained(comm, recipe: dict, cwd: str):
    """``recipe`` trained on this rank, in folder ``cwd``; the trainer."""
    from launcher.train import trainer
    os.chdir(cwd)
    return trainer.run(config.from_dict(recipe), comm, log=lambda *a, **k: None)


def _buffers_after_training(comm, recipe: dict, cwd: str) -> dict:
    return {k: v.clone() for k, v in _trained(comm, recipe, cwd).parts.module.named_buffers()}


def test_batch_norm_statistics_follow_the_same_rule_with_max_micro_batch_auto(tmp_path):
    """auto runs every micro-step under no_sync (explicit reduce): the buffers must still be rank 0's at
    each step's start, as DDP's own rule gives without auto, on every rank."""
    common = {"model": {"factory": "helpers:bn_cnn"}, "epochs": 2, "data.size": 96, "checkpoint.every_steps": 0,
              "eval.full_grad_norm": False, "distributed.cpu_micro_batch": 8}
    plain = run_ranks(_buffers_after_training, 2, base_recipe(**common, name="plain"), str(tmp_path))
    auto = run_ranks(_buffers_after_training, 2, base_recipe(**common, name="auto", **{
        "distributed.max_micro_batch": "auto"}), str(tmp_path))
    for rank in range(2):
        for name in plain[rank]:
            assert torch.equal(plain[rank][name], auto[rank][name]), (rank, name)
    # and the statistics are per-rank (each rank's last step updates them from its own samples): the test
    # would not notice a rule that never broadcasts if the ranks agreed anyway
    assert not torch.equal(plain[0]["1.running_mean"], plain[1]["1.running_mean"])


def test_sync_batch_norm_with_max_micro_batch_auto_is_refused():
    with pytest.raises(config.RecipeError, match=r"^distributed.batch_norm: 'sync' is not valid with "
                                                 r"distributed.max_micro_batch auto .*allowed: local"):
        config.from_dict(base_recipe(**{"distributed.batch_norm": "sync", "distributed.max_micro_batch": "auto"}))


def _graphs_compiled(comm, recipe: dict, cwd: str, environ: dict) -> int:
    import torch._dynamo
    from torch._dynamo.utils import counters
    os.environ.update(environ)
    torch._dynamo.reset()
    counters.clear()
    return _trained(comm, recipe, cwd).stages.graphs_compiled()


def test_the_memory_probe_runs_eagerly_so_only_the_stage_shapes_compile(tmp_path):
    """With compile on, probing each candidate size on the compiled module would compile each of them.
    The probe finds 2 (3 fit, less the margin) in every stage: the graphs must be those of a run told 2."""
    common = {"performance.compile": "default", "epochs": 3, "data.size": 96, "checkpoint.every_steps": 0,
              "eval.full_grad_norm": False}
    environ = {"QHM_COMPILE_BACKEND": "eager"}
    told = run_ranks(_graphs_compiled, 2, base_recipe(**common, name="told", **{"distributed.max_micro_batch": 2}),
                     str(tmp_path), environ)
    probed = run_ranks(_graphs_compiled, 2, base_recipe(**common, name="probed", **{
        "distributed.max_micro_batch": "auto"}), str(tmp_path), {**environ, "QHM_TEST_OOM_ABOVE": "3"})
    assert told[0] > 0 and probed == told


def test_more_processes_than_visible_gpus_is_one_line_naming_both_counts(monkeypatch):
    from launcher.errors import UserError
    from launcher.train.preflight import check_devices
    recipe = config.from_dict(base_recipe(**{"distributed.nproc_per_node": 2}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(UserError, match=r"^distributed.nproc_per_node: 2 processes asked, 1 GPU visible here "
                                        r"\(CUDA_VISIBLE_DEVICES=3\); allowed: at most 1 \(one process per GPU\), "
                                        r"or auto$"):
        check_devices(recipe, 2, has_cuda=True, visible=1)
    check_devices(recipe, 2, has_cuda=True, visible=2)            # one per GPU: fine
    check_devices(recipe, 2, has_cuda=False, visible=0)           # CPU processes: no GPU to count


@pytest.mark.parametrize("visible,expect,said", [(0, 2, "2 processes, no GPU here: processes on CPU"),
                                                 (1, 1, "1 process, one per visible GPU (1)"),
                                                 (8, 8, "8 processes, one per visible GPU (8)")])
def test_nproc_auto_is_one_process_per_visible_gpu_or_two_on_cpu(visible, expect, said):
    from launcher.train.preflight import resolve_nproc
    recipe, lines = config.from_dict(base_recipe(**{"distributed.nproc_per_node": "auto"})), []
    assert resolve_nproc(recipe, visible, lines.append) == expect == recipe.distributed.nproc_per_node
    assert lines == [f"[qhm-launch] distributed.nproc_per_node auto: {said}"]
    chosen = config.from_dict(base_recipe(**{"distributed.nproc_per_node": 3}))
    assert resolve_nproc(chosen, 8, lines.append) == 3 and len(lines) == 1      # a chosen count is kept, unsaid
    with pytest.raises(config.RecipeError, match="^distributed.nproc_per_node: 'many' is not valid; allowed: "):
        config.from_dict(base_recipe(**{"distributed.nproc_per_node": "many"}))


def _train_and_report_determinism(comm, recipe: dict, cwd: str):
    module = _trained(comm, recipe, cwd).parts.module
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))      # as training left them (set when it was built)
    return flags, {k: v.clone() for k, v in module.state_dict().items()}


def test_deterministic_turns_on_torch_s_switches_and_changes_no_number_on_cpu(tmp_path):
    common = {"epochs": 2, "data.size": 96, "checkpoint.every_steps": 0, "eval.full_grad_norm": False}
    on = run_ranks(_train_and_report_determinism, 2, base_recipe(**common, name="on", **{
        "performance.deterministic": True}), str(tmp_path))
    off = run_ranks(_train_and_report_determinism, 2, base_recipe(**common, name="off"), str(tmp_path))
    assert on[0][0] == (True, True, ":4096:8")
    assert off[0][0][:2] == (False, False)            # nothing carried over into the next recipe's process
    for name, value in on[0][1].items():               # CPU kernels are deterministic already: the same bits
        assert torch.equal(value, off[0][1][name]), name


def test_deterministic_pooling_replaces_resnet_s_global_pool_with_the_same_function():
    from launcher.train import models
    net = models.build("resnet18", (3, 16, 16), 10, 0, torch.float64)
    twin = models.build("resnet18", (3, 16, 16), 10, 0, torch.float64)
    assert models.deterministic_pooling(twin) == 1 and isinstance(twin.avgpool, models.GlobalAvgPool)
    assert models.deterministic_pooling(twin) == 0
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    net.eval(), twin.eval()
    torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-12)
    # a model whose only module is the pool is replaced at the top
    assert models.deterministic_pooling(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((1, 1)))) == 1


@pytest.mark.parametrize("over,args,cpus,warned", [
    ({}, [], 2, False),                                                     # in memory: a core per rank
    ({"data.stream": True, "data.workers": 3}, [], 8, False),               # 2 ranks x (3 workers + 1)
    ({"data.stream": True, "data.workers": 3}, ["--cpus-per-task", "4"], 4, True),
])
def test_a_job_asks_for_the_cpus_its_ranks_and_data_workers_need(tmp_path, capsys, monkeypatch, over, args, cpus,
                                                                 warned):
    """No Slurm needed: the dry run prints the script."""
    from launcher.cli.main import main
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, base_recipe(**over))
    assert main(["submit", str(path), "--dry-run", "--nodes", "2", *args]) == 0
    out, err = capsys.readouterr()
    assert f"#SBATCH --cpus-per-task={cpus}\n" in out
    assert 'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"' in out
    assert ("--cpus-per-task 4 is fewer than the 8 a node's ranks and their data workers need" in err) == warned


def test_each_rank_gets_its_share_of_the_cpus_the_job_may_use(monkeypatch):
    from launcher.cluster.launch import threads_per_rank
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})   # 6 of the machine's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads_per_rank(2) == 3 and threads_per_rank(4) == 1 and threads_per_rank(8) == 1


def test_bf16_on_a_cpu_without_bf16_instructions_is_one_warning(tmp_path):
    from launcher import config
    from launcher.train.preflight import slow_precision_warning
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n")
    new = tmp_path / "new"
    new.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    bf16, fp32 = (config.from_dict(base_recipe(precision=p)) for p in ("bf16", "fp32"))
    line = slow_precision_warning(bf16, False, old)
    assert line.startswith("qhm-launch: WARNING: precision bf16 on this CPU, which has no bf16 instructions")
    assert "\n" not in line and "precision: fp32" in line
    assert slow_precision_warning(bf16, False, new) is None and slow_precision_warning(bf16, False, arm) is None
    assert slow_precision_warning(fp32, False, old) is None and slow_precision_warning(bf16, True, old) is None
    assert slow_precision_warning(bf16, False, tmp_path / "missing") is None
