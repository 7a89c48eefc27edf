"""Hostile and careless input: every case exits 2 with one line naming the key, the value and what is
allowed, before any worker starts, and no traceback. Most cases run ``main`` in this process; a few go
through the real entry point."""
import json
import os

import pytest
import yaml

from helpers import ROOT, base_recipe, cli, write_recipe
from launcher.cli.main import main

SMOKE = str(ROOT / "recipes" / "smoke.yaml")


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:                     # argparse's errors exit
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def one_clean_line(code, err, *expect):
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qhm-launch: error: "), err
    assert "Traceback" not in err
    for text in expect:
        assert text in lines[0], lines[0]


OVERRIDES = [
    ("seed=-1", "seed: -1 is not valid; allowed: >= 0"),
    ("seed=1180591620717411303424", "seed: 1180591620717411303424 is not valid; allowed: an integer of at most"),
    ("optimizer.weight_decay=.nan", "optimizer.weight_decay: nan is not valid; allowed: a finite number"),
    ("optimizer.weight_decay=.inf", "optimizer.weight_decay: inf is not valid"),
    ("schedule.lr.max=.inf", "schedule.lr.max: inf is not valid; allowed: a finite number"),
    ("schedule.batch.growth=.inf", "schedule.batch.growth: inf is not valid"),
    ("epochs=1000000000", "epochs: 1000000000 is not valid; allowed: <= 100000"),
    ("name=" + "x" * 300, "allowed: a non-empty folder name of at most 128 characters"),
    ("name=a\x01b", "name: 'a\\x01b' is not valid; allowed: text without control characters"),
    ("name=' '", "name: ' ' is not valid; allowed: a non-empty folder name"),
    ("distributed.nproc_per_node=0", "distributed.nproc_per_node: 0 is not valid; allowed: >= 1"),
    ("tracking.wandb.tags=[" + "t" * 70 + "]", "tracking.wandb.tags[0]:"),
    ("schedule.beta.max=1.5", "schedule.beta.max: 1.5 is not valid; allowed: in [0, 1)"),
    ("schedule.lr.max", "--set 'schedule.lr.max': not valid; allowed: KEY.PATH=VALUE"),
    ("data.rotation=400", "data.rotation: 400.0 is not valid; allowed: degrees in [0, 180]"),
    ("data.validation=1", "data.validation: 1.0 is not valid; allowed: a fraction in [0, 1)"),
    ("data.workers=1000", "data.workers: 1000 is not valid; allowed: an integer in [0, 64]"),
]


@pytest.mark.parametrize("override,expect", OVERRIDES, ids=[o[0][:30] for o in OVERRIDES])
def test_bad_overrides(override, expect, capsys):
    one_clean_line(*run_main(["plan", SMOKE, "--set", override], capsys), expect)


def test_a_synthetic_size_past_the_limit(capsys):
    one_clean_line(*run_main(["plan", SMOKE, "--set", "data.dataset=synthetic", "--set", "data.size=1000000000000"],
                             capsys), "data.size: 1000000000000 is not valid; allowed: <= 10000000")


def test_a_number_as_a_person_types_it_is_accepted(capsys):
    assert run_main(["plan", SMOKE, "--set", "schedule.lr.max=1e-3", "--json"], capsys)[0] == 0


ARGUMENTS = [
    (["plan", SMOKE, "--nproc", "0"], "argument --nproc: '0' is not valid; allowed: an integer >= 1"),
    (["plan", SMOKE, "--nnodes", "-2"], "argument --nnodes: '-2' is not valid"),
    (["bounds", SMOKE, "--L", "-1"], "argument --L: '-1' is not valid; allowed: a finite number > 0"),
    (["bounds", SMOKE, "--L", "nan"], "argument --L: 'nan' is not valid"),
    (["bounds", SMOKE, "--sigma2", "inf"], "argument --sigma2: 'inf' is not valid"),
    (["run", SMOKE, "--forc"], "unrecognized arguments: --forc"),
    (["submit", SMOKE, "--dry-run", "--signal-seconds", "-5"], "argument --signal-seconds: '-5' is not valid"),
    (["submit", SMOKE, "--dry-run", "--cpus-per-task", "-3"], "argument --cpus-per-task: '-3' is not valid"),
    (["submit", SMOKE, "--dry-run", "--sbatch-arg=--comment=x\ntouch /tmp/PWNED #"],
     "allowed: text without control characters"),
    (["submit", SMOKE, "--dry-run", "--partition", "gpu\nrm -rf ~"], "argument --partition:"),
    (["submit", SMOKE, "--dry-run", "--account", "a\rb"], "argument --account:"),
    (["submit", SMOKE, "--dry-run", "--time", "1h"], "--time: '1h' is not valid; allowed: HH:MM:SS"),
    (["plot", "nope", "--metric", "nope"], "--metric: 'nope' is not valid"),
    (["run", SMOKE, "--nnodes", "3:2"], "argument --nnodes: '3:2' is not valid; allowed: N or MIN:MAX"),
    # a huge MAX planned every world size up to it (24 GB, OOM-killed); torchrun's own parsers gave tracebacks
    (["run", SMOKE, "--nnodes", "1:99999999999999999999"], "argument --nnodes: '1:99999999999999999999' is not valid; "
     "allowed: N or MIN:MAX, integers with 1 <= MIN <= MAX <= 4096"),
    (["run", SMOKE, "--rdzv-conf", "garbage"], "argument --rdzv-conf: 'garbage' is not valid; allowed: KEY=VALUE,..."),
    (["run", SMOKE, "--rdzv-conf", "last_call_timeout=-3"], "argument --rdzv-conf: 'last_call_timeout=-3' is not valid"),
    (["run", SMOKE, "--rdzv-conf", "is_host=maybe"], "argument --rdzv-conf: 'is_host=maybe' is not valid"),
    (["submit", SMOKE, "--rdzv-conf", "join_timeout=1,,"], "argument --rdzv-conf: 'join_timeout=1,,' is not valid"),
    (["run", SMOKE, "--rdzv-endpoint", "not a host"], "argument --rdzv-endpoint: 'not a host' is not valid; allowed: "
     "HOST:PORT"),
    (["run", SMOKE, "--rdzv-endpoint", "localhost:99999"], "argument --rdzv-endpoint: 'localhost:99999' is not valid"),
    (["run", SMOKE, "--max-restarts", "2"], "--max-restarts: 2 restarts the workers when a node is lost, which needs "
     "elastic membership; allowed: with --nnodes MIN:MAX (MIN < MAX; given 1)"),
    (["run", SMOKE, "--nnodes", "1:2"], "--nnodes: 1:2 needs --rdzv-endpoint HOST:PORT and --rdzv-id ID"),
    (["run", SMOKE, "--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:1", "--rdzv-id", "x", "--set",
      "distributed.engine=deepspeed", "--set", "distributed.zero_stage=2"],
     "--nnodes: 1:2 (elastic membership) resumes on the nodes left, and ZeRO stage 2 partitions the optimizer "
     "state over the processes that wrote it, and DeepSpeed's universal checkpoint, which moves it, carries Adam's "
     "state only (exp_avg, exp_avg_sq), not qhm's"),
    (["submit", SMOKE, "--dry-run", "--nodes", "2", "--min-nodes", "2"],
     "--min-nodes: 2 is not fewer than the job's 2 node(s) (--nodes or slurm.nodes); allowed: 1 to 1"),
    (["submit", SMOKE, "--dry-run", "--min-nodes", "1"], "allowed: --min-nodes with --nodes 2 or more"),
    (["submit", SMOKE, "--dry-run", "--nodes", "2", "--min-nodes", "1", "--elastic"],
     "--min-nodes: 1 keeps one job going on the nodes left, and --elastic chains jobs"),
    (["submit", SMOKE, "--dry-run", "--nodes", "3", "--min-nodes", "1", "--set", "distributed.engine=deepspeed",
      "--set", "distributed.zero_stage=1"], "--min-nodes: 1 (of 3 nodes) (elastic membership) resumes on the nodes left"),
    (["submit", SMOKE, "--dry-run", "--min-nodes", "0"], "argument --min-nodes: '0' is not valid"),
]


@pytest.mark.parametrize("args,expect", ARGUMENTS, ids=[" ".join(a[0][:1] + a[0][2:4])[:40] for a in ARGUMENTS])
def test_bad_arguments(args, expect, capsys):
    one_clean_line(*run_main(args, capsys), expect)


def test_debug_is_accepted_after_the_subcommand_too(capsys):
    with pytest.raises(Exception):  # noqa: B017 - --debug shows the error's own traceback, whatever its class
        main(["plan", SMOKE, "--set", "seed=-1", "--debug"])


def recipe_file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    path = recipe_file(tmp_path, "bomb.yaml", ("\n".join(lines) + "\n").encode())
    assert os.path.getsize(path) < 400
    one_clean_line(*run_main(["plan", path], capsys), "expands to more than 100000 values")


@pytest.mark.parametrize("name,content,expect", [
    ("huge.yaml", b"tags: [" + b",".join([b"x"] * 600_000) + b"]\n", "allowed: at most 1048576"),
    ("latin1.yaml", "name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    ("dup.yaml", b"name: a\nepochs: 2\nname: b\n", "key 'name' appears twice (lines 1 and 3)"),
    ("nul.yaml", b"name: a\x00b\n", "is not valid YAML"),
    ("list.yaml", b"- 1\n- 2\n", "recipe: [1, 2] is not valid; allowed: a mapping of"),
    ("recursive.yaml", b"a: &a [1, *a]\n", "recipe"),
])
def test_bad_recipe_files(tmp_path, capsys, name, content, expect):
    one_clean_line(*run_main(["plan", recipe_file(tmp_path, name, content)], capsys), expect)


def test_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = write_recipe(tmp_path, base_recipe(output=str(tmp_path / "afile")))
    one_clean_line(*run_main(["run", str(path)], capsys), "output:", "is a file; allowed: a folder")


@pytest.mark.e2e
def test_through_the_real_entry_point_nothing_starts(tmp_path):
    """The same one line when the launcher is a fresh process, and no run folder appears."""
    path = write_recipe(tmp_path, base_recipe(seed=-1))
    for args in (["run", str(path)], ["--debug", "plan", str(path), "--nproc", "0"],
                 ["submit", str(path), "--dry-run", "--sbatch-arg=x\ny"]):
        proc = cli(args, cwd=tmp_path)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_sweep_files_are_read_as_safely(tmp_path, capsys):
    write_recipe(tmp_path, base_recipe(), "base.yaml")
    (tmp_path / "sweep.yaml").write_text("recipe: base.yaml\nname: s\nname: t\ngrid: {seed: [1]}\n")
    one_clean_line(*run_main(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"], capsys), "appears twice")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"recipe": "base.yaml", "name": "s\nx", "grid": {"seed": [1]}}))
    one_clean_line(*run_main(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"], capsys), "sweep.name")


def test_what_needs_cuda_is_refused_without_it(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: sync batch norm is allowed")
    one_clean_line(*run_main(["run", SMOKE, "--set", "distributed.batch_norm=sync"], capsys),
                   "distributed.batch_norm: 'sync' is not valid here")
    one_clean_line(*run_main(["run", SMOKE, "--set", "performance.cuda_graphs=true"], capsys),
                   "performance.cuda_graphs: true is not valid here")


def test_options_the_deepspeed_engine_does_not_take(capsys):
    for key, value, expect in (("performance.compile", "default", "performance.compile: 'default' is not valid with"),
                               ("distributed.max_micro_batch", "auto", "distributed.max_micro_batch: 'auto' is not valid")):
        one_clean_line(*run_main(["plan", SMOKE, "--set", "distributed.engine=deepspeed", "--set", f"{key}={value}"],
                                 capsys), expect)


def test_what_used_to_be_a_launcher_side_traceback_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tagged.yaml").write_text('seed: !!python/object/apply:os.system ["touch PWNED"]\n')
    one_clean_line(*run_main(["plan", "tagged.yaml"], capsys), "recipe: 'tagged.yaml' is not valid at line 1",
                   "allowed: plain YAML values (no tags)")
    one_clean_line(*run_main(["run", SMOKE, "--set", 'seed=!!python/object/apply:os.system ["touch PWNED"]'], capsys),
                   "seed:")
    assert not (tmp_path / "PWNED").exists()
    one_clean_line(*run_main(["bounds", SMOKE, "--n", "100000000000000000000"], capsys),
                   "--n", "allowed: an integer in [1, 10^12]")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    one_clean_line(*run_main(["run", SMOKE, "--set", f"output={tmp_path}", "--set", "name=loop"], capsys),
                   "name:", "is a symbolic link that leads nowhere")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(base_recipe(name="r")))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "global_step": e, "samples": e, "batch": 8,
                                                           "test_acc": 0.5, "train_loss": 1.0, "grad_norm": 1.0})
                                               + "\n" for e in range(2)))
    one_clean_line(*run_main(["plot", str(run), "--metric", "test_acc", "--out", "/proc/nope/x.png"], capsys),
                   "--out: '/proc/nope/x.png' cannot be written")
