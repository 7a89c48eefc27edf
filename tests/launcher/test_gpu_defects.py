"""Defects of the CUDA and cluster paths (GPU round 2), each where its behaviour can be reached on a CPU:
a GPU job where torch sees no GPU, DeepSpeed's grad-norm key by version, gradient layout under the
explicit reduce, the rendezvous port outside the ephemeral range, CPUs per GPU rank, a run without wandb."""
import os
import subprocess

import pytest
import torch

from helpers import base_recipe, cli, run_ranks, write_recipe
from launcher.cli.main import main
from test_bad_input import one_clean_line, run_main


def test_a_gpu_job_on_a_machine_where_torch_sees_no_gpu_is_one_line(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(**{"slurm.gpus_per_node": 1}))
    one_clean_line(*run_main(["run", str(path)], capsys), "slurm.gpus_per_node: 1 GPU(s) per node asked, and torch "
                   "sees no GPU here", "allowed: a node whose GPUs torch can use, or slurm.gpus_per_node: 0")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_deepspeeds_compute_grad_norm_is_set_only_where_it_is_known(monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from launcher import config
    from launcher.engines import deepspeed
    recipe = config.from_dict(base_recipe(**{"distributed.engine": "deepspeed", "distributed.zero_stage": 2}))
    assert deepspeed.build_config(recipe, 4, 1, 2)["zero_optimization"]["compute_grad_norm"] is False
    older = {k: v for k, v in DeepSpeedZeroConfig.model_fields.items() if k != "compute_grad_norm"}
    monkeypatch.setattr(DeepSpeedZeroConfig, "model_fields", older)        # as DeepSpeed 0.16 has it
    assert "compute_grad_norm" not in deepspeed.build_config(recipe, 4, 1, 2)["zero_optimization"]


def _explicit_reduce_strides(comm):
    from launcher.engines.ddp import DDPEngine
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    model = model.to(memory_format=torch.channels_last)
    engine = DDPEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), comm, explicit_reduce=True)
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    with engine.micro_step(True):
        engine.backward(engine.model(x).sum())
    before = {id(p): p.grad.data_ptr() for p in model.parameters()}
    engine._reduce()
    out = [(p.stride(), p.grad.stride(), p.grad.data_ptr() == before[id(p)]) for p in model.parameters()]
    engine.close()
    return out


def test_the_explicit_reduce_keeps_each_gradients_layout_and_memory():
    """max_micro_batch auto all-reduces the gradients itself: a channels_last weight keeps a channels_last
    gradient (it was (27, 9, 3, 1) against the weight's (27, 1, 9, 3)), written in place (no clone)."""
    for weight, grad, same_memory in run_ranks(_explicit_reduce_strides, 2)[0]:
        assert weight == grad and same_memory


def rendezvous_port(tmp_path, job_id: int, ports: str) -> int:
    from launcher.cluster.slurm import RENDEZVOUS_PORT
    (tmp_path / "range").write_text(ports + "\n")
    out = subprocess.run(["bash", "-c", RENDEZVOUS_PORT + "\necho $RDZV_PORT"], capture_output=True, text=True,
                         env={"SLURM_JOB_ID": str(job_id), "QHM_PORT_RANGE": str(tmp_path / "range"),
                              "PATH": os.environ["PATH"]}, check=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("job_id", [1, 4096, 12_345, 2 ** 31 - 1])
def test_the_rendezvous_port_is_outside_the_ephemeral_range(tmp_path, job_id):
    port = rendezvous_port(tmp_path, job_id, "32768\t60999")
    assert 10000 <= port < 32768
    assert 61000 <= rendezvous_port(tmp_path, job_id, "1024\t60999") <= 65535      # a range that starts low
    assert rendezvous_port(tmp_path, job_id, "32768 60999") == port                # the same job, the same port


def test_a_gpu_rank_reserves_cores_for_its_threads(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe())
    assert main(["submit", str(path), "--nodes", "2", "--gpus-per-node", "8", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=32" in script and "ip_local_port_range" in script
    assert main(["submit", str(path), "--nodes", "2", "--gpus-per-node", "8", "--dry-run", "--set",
                 "slurm.cpus_per_rank=2"]) == 0
    assert "#SBATCH --cpus-per-task=16" in capsys.readouterr().out
    assert main(["submit", str(path), "--dry-run"]) == 0
    assert "#SBATCH --cpus-per-task=2" in capsys.readouterr().out              # CPU: a core per rank, as before


@pytest.mark.e2e
def test_a_run_with_wandb_offline_where_wandb_is_not_installed_trains_on(tmp_path):
    fake = tmp_path / "nowandb"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError('No module named wandb (a test stands in for its absence)')\n")
    path = write_recipe(tmp_path, base_recipe(epochs=1, **{"tracking.wandb.mode": "offline", "data.size": 64}))
    done = cli(["run", str(path)], cwd=tmp_path, check=0,
               env={"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])})
    said = [line for line in (done.stdout + done.stderr).splitlines() if "W&B is not available" in line]
    assert len(said) == 1 and "Traceback" not in done.stderr
    assert (tmp_path / "runs" / "t" / "final_model.pt").exists()
    assert len((tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()) == 1
