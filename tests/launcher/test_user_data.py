"""Your own model, data and loss, and the streamed path: a user package from a temp folder, an
ImageFolder of generated PNGs, the streamed order proved to be the keyed order (against the in-memory
path, and across world sizes), bitwise resume after kill -9, and every bad factory in one line."""
import math
import os
import shutil
import signal
import sys

import pytest
import torch

from helpers import (ROOT, alive, assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, kill_group,
                      metric_rows, start, train_ranks, wait_for, write_recipe)

EXAMPLE = ROOT / "recipes" / "examples" / "own_model_and_data.py"


def user_package(folder):
    """The repository's example, as a package of the user's own in ``folder``."""
    pkg = folder / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(EXAMPLE, pkg / "parts.py")
    (pkg / "cli.py").write_text("import sys\n"              # factories that end the process (argparse exits 2)
                                "def build_data():\n    raise SystemExit(2)\n"
                                "def build_model():\n    sys.exit(0)\n")
    (pkg / "edge.py").write_text(EDGE)
    return folder


EDGE = """
import torch
class Temperature(torch.nn.Module):          # a loss with a parameter of its own
    def __init__(self):
        super().__init__()
        self.log_t = torch.nn.Parameter(torch.zeros(()))
    def forward(self, out, y):
        return torch.nn.functional.cross_entropy(out / self.log_t.exp(), y, reduction="none")
def tempered():
    return Temperature()
from PIL import Image
from mypkg.parts import Spirals, MLP

class Mapped(torch.utils.data.Dataset):
    def __init__(self, base, fn):
        self.base, self.fn = base, fn
    def __len__(self):
        return len(self.base)
    def __getitem__(self, i):
        return self.fn(*self.base[i])

# top-level functions: the datasets pickle, as data.workers needs (only `unpicklable` holds a lambda)
def same(x, y):
    return x, y
def as_pil(x, y):
    return Image.new("L", (8, 8)), y
def plus_7(x, y):
    return x, y + 7
def as_string(x, y):
    return x, "cat"
def doubled(x, y):
    return torch.cat([x, x]), y

def spirals(fn=same, test_fn=None):
    return {"train": Mapped(Spirals(120, 3, 0), fn), "test": Mapped(Spirals(40, 3, 1), test_fn or fn), "num_classes": 3}

def pil():
    return spirals(as_pil)
def labels_too_big():
    return spirals(plus_7)
def string_labels():
    return spirals(as_string)
def other_test_shape():
    return spirals(same, doubled)
def pair():
    d = spirals()
    return d["train"], d["test"]
def unpicklable():
    return spirals(lambda x, y: (x, y))
def two_outputs():
    return MLP(classes=2)
def no_parameters():
    return torch.nn.Flatten()
def wrong_input():
    return torch.nn.Linear(5, 3)

class WithSpare(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = MLP(classes=3), torch.nn.Linear(4, 4)
    def forward(self, x):
        return self.used(x)
def unused_layer():
    return WithSpare()

class Trap(torch.utils.data.Dataset):
    # sample `at` raises (a bad file in the middle of a dataset), or hangs after writing the reading
    # process's PID to $QHM_TEST_PIDS (a stuck network read)
    def __init__(self, base, at, hang=False):
        self.base, self.at, self.hang = base, at, hang
    def __len__(self):
        return len(self.base)
    def __getitem__(self, i):
        if i == self.at and self.hang:
            import os, time
            with open(os.environ["QHM_TEST_PIDS"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(300)
        if i == self.at:
            raise ValueError(f"cannot decode sample {i}")
        return self.base[i]

def bad_sample():
    d = spirals()
    return {**d, "train": Trap(d["train"], 77)}
def hangs():
    d = spirals()
    return {**d, "train": Trap(d["train"], 50, hang=True)}
def spawns():
    import os, subprocess
    child = subprocess.Popen(["sleep", "300"])
    with open(os.environ["QHM_TEST_PIDS"], "a") as f:
        f.write(f"{child.pid}\\n")
    return spirals()
"""


@pytest.mark.e2e
def test_a_user_package_trains_on_two_processes_over_three_stages(tmp_path):
    user_package(tmp_path)
    recipe = base_recipe(name="own", epochs=3, **{"data": {"factory": "mypkg.parts:build_data",
                                                            "kwargs": {"n": 300, "classes": 3}, "workers": 1},
                                                   "model": {"factory": "mypkg.parts:build_model", "kwargs": {"classes": 3}},
                                                   "loss": {"factory": "mypkg.parts:smoothed_cross_entropy"}})
    out = cli(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path, check=0)
    rows = metric_rows(tmp_path / "runs" / "own")
    assert [r["batch"] for r in rows] == [16, 32, 64] and rows[-1]["samples"] == 3 * 300
    assert all(0 <= r["train_acc"] <= 1 and r["grad_norm"] > 0 for r in rows)     # logits and classes: accuracy
    assert "run own complete" in out.stdout


@pytest.mark.e2e
def test_the_repository_example_runs_as_documented(tmp_path):
    out = cli(["run", "own.yaml", "--set", f"output={tmp_path}", "--set", "epochs=2"],
              cwd=ROOT / "recipes" / "examples", check=0)
    assert len(metric_rows(tmp_path / "own")) == 2 and "run own complete" in out.stdout


def test_a_loss_that_is_not_per_sample_is_refused_in_one_line():
    from launcher.errors import UserError
    from launcher.train.losses import Loss
    mean = Loss(lambda out, y: torch.nn.functional.cross_entropy(out, y), "mypkg.other:mean_loss")
    with pytest.raises(UserError, match=r"loss.factory: 'mypkg.other:mean_loss' gave \(\) for a batch of 4; allowed: "
                                        r"one loss per sample, shape \(4,\)"):
        mean(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_accuracy_is_left_out_when_outputs_are_not_class_logits(tmp_path):
    user_package(tmp_path)
    (tmp_path / "mypkg" / "other.py").write_text(
        "import torch\n"
        "from mypkg.parts import MLP\n"
        "class Score(MLP):\n    def forward(self, x):\n        return super().forward(x)[:, 0]\n"
        "def score():\n    return Score(classes=1)\n"
        "def squared():\n    return lambda out, y: (out - y.float()) ** 2\n")
    recipe = base_recipe(name="r", epochs=1, **{"distributed.nproc_per_node": 1,
                                                "data": {"factory": "mypkg.parts:build_data", "kwargs": {"n": 120}, "workers": 0},
                                                "model": {"factory": "mypkg.other:score"},
                                                "loss": {"factory": "mypkg.other:squared"}})
    row = metric_rows(train_ranks(recipe, tmp_path))[0]
    assert row["train_acc"] is None and row["test_acc"] is None and math.isfinite(row["train_loss"])


BAD = [
    ({"model": {"factory": "nope.mod:build"}}, "model.factory: 'nope.mod:build' is not valid; allowed: an importable module"),
    ({"model": {"factory": "mypkg.parts:missing"}}, "module 'mypkg.parts' has no attribute 'missing'"),
    ({"model": {"factory": "mypkg.parts:math"}}, "'math' is a module, not callable"),
    ({"model": {"factory": "mypkg.parts:build_data"}},
     "model.factory: 'mypkg.parts:build_data' returned dict; allowed: a torch.nn.Module"),
    ({"model": {"factory": "mypkg.parts"}}, "model.factory: 'mypkg.parts' is not valid; allowed: 'package.module:callable'"),
    ({"model": {"factory": "mypkg.parts:build_model", "kwargs": {"colours": 3}}},
     "model.factory: 'mypkg.parts:build_model' raised TypeError: build_model() got an unexpected keyword argument 'colours'"),
    ({"data": {"factory": "mypkg.parts:build_model"}}, "data.factory: 'mypkg.parts:build_model' returned train=method"),
    ({"data": {"factory": "mypkg.parts:build_data", "kwargs": {"n": -5}}}, "data.factory: 'mypkg.parts:build_data' raised"),
    ({"loss": {"factory": "mypkg.parts:build_data"}},
     "loss.factory: 'mypkg.parts:build_data' returned dict; allowed: a callable"),
    ({"loss": {"factory": "mypkg.edge:tempered"}}, "loss.factory: 'mypkg.edge:tempered' returned a module with 1 "
                                                   "trainable parameter(s) (log_t), which no engine sees"),
    ({"data": {"factory": "mypkg.parts:build_data", "dataset": "digits"}},
     "data.dataset: 'digits' is not valid with data.factory"),
    ({"model": {"factory": "mypkg.cli:build_model"}}, "model.factory: 'mypkg.cli:build_model' raised SystemExit(0) "
                                                      "instead of returning"),
    ({"data": {"factory": "mypkg.cli:build_data"}}, "data.factory: 'mypkg.cli:build_data' raised SystemExit(2)"),
    # what a step needs, checked on one training and one test sample before any worker starts
    ({"data": {"factory": "mypkg.edge:pil"}}, "data.factory: 'mypkg.edge:pil': train[0] input is a PIL.Image.Image; "
                                              "allowed: a tensor or array (add torchvision.transforms.ToTensor()"),
    ({"data": {"factory": "mypkg.edge:labels_too_big"}}, "train[0] target 7 is out of range for the model's 3 outputs; "
                                                          "allowed: class indices in [0, 3)"),
    ({"data": {"factory": "mypkg.edge:string_labels"}}, "train[0] target is 'cat' (str); allowed: a number or a tensor"),
    ({"data": {"factory": "mypkg.edge:other_test_shape"}}, "train[0] input has shape (2,) and test[0] (4,); allowed: "
                                                           "one input shape"),
    ({"model": {"factory": "mypkg.edge:two_outputs"}, "data": {"factory": "mypkg.parts:build_data",
                                                               "kwargs": {"classes": 4}}},
     "model.factory: the model gives 2 outputs and the data has 4 classes; allowed: a model with 4 outputs"),
    ({"model": {"factory": "mypkg.edge:no_parameters"}}, "model.factory: the model has no trainable parameters"),
    ({"model": {"factory": "mypkg.edge:unused_layer"}}, "model.factory: 2 trainable parameter(s) get no gradient from "
                                                        "the loss (spare.weight, spare.bias); allowed:"),
    ({"model": {"factory": "mypkg.edge:wrong_input"}}, "model.factory: the forward pass of train[0] and test[0] "
                                                        "(inputs (2,), torch.float32) raised RuntimeError"),
    # data workers get the dataset pickled (from the rank's fork server): a lambda inside cannot travel
    ({"data": {"factory": "mypkg.edge:unpicklable", "workers": 2}},
     "data.factory: 'mypkg.edge:unpicklable': the train dataset cannot be sent to the data.workers: 2 worker processes, "
     "it does not pickle (AttributeError: Can't pickle local object 'unpicklable.<locals>.<lambda>'); allowed: a "
     "dataset built from classes and functions defined at a module's top level"),
]


def test_a_factory_may_return_a_train_test_pair_and_without_workers_its_data_need_not_pickle(tmp_path, monkeypatch):
    from launcher import config, data
    from launcher.train import preflight
    user_package(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = config.from_dict(base_recipe(**{"data": {"factory": "mypkg.edge:pair"},
                                             "model": {"factory": "mypkg.parts:build_model"}}))
    read_in_ranks = config.from_dict(base_recipe(**{"data": {"factory": "mypkg.edge:unpicklable", "workers": 0},
                                                    "model": {"factory": "mypkg.parts:build_model"}}))
    try:
        assert data.sizes(recipe.data) == (120, 40)
        preflight.preflight(recipe, 2)
        preflight.preflight(read_in_ranks, 2)       # no worker processes: nothing needs to pickle
    finally:
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]


@pytest.mark.parametrize("over,expect", BAD, ids=[b[1][:40] for b in BAD])
def test_every_bad_factory_is_one_line_before_any_worker(tmp_path, over, expect):
    from launcher.cli.main import main
    user_package(tmp_path)
    recipe = base_recipe(name="bad", **{"data": {"factory": "mypkg.parts:build_data"},
                                        "model": {"factory": "mypkg.parts:build_model"}})
    recipe.update(over)
    path = write_recipe(tmp_path, recipe)
    import os
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        import sys
        import io
        err = io.StringIO()
        saved, sys.stderr = sys.stderr, err
        try:
            code = main(["run", str(path)])
        finally:
            sys.stderr = saved
    finally:
        os.chdir(here)
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and expect in lines[0], err.getvalue()
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_a_raising_factory_shows_the_user_s_traceback_with_debug(tmp_path):
    user_package(tmp_path)
    recipe = base_recipe(name="bad", **{"model": {"factory": "mypkg.parts:build_model", "kwargs": {"colours": 3}}})
    path = write_recipe(tmp_path, recipe)
    plain = cli(["run", str(path)], cwd=tmp_path)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = cli(["run", str(path), "--debug"], cwd=tmp_path)
    assert "Traceback" in debug.stderr and "build_model" in debug.stderr


# ------------------------------------------------------------------------------- a user's code failing

def _end(pids):
    """Clean up after a failing test: only the processes this test's factories recorded."""
    import os
    import signal
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 1])
def test_a_sample_that_raises_in_one_worker_is_one_line_with_its_traceback_in_the_run_folder(tmp_path, workers):
    """Sample 77 is read by one rank only; the other waits for it in a collective and is ended by the
    launcher. One line names the rank, the step and the user's message; the traceback is kept. Read by
    a data worker (workers: 1), the line names the worker too, and nothing else is said (no "leaked
    semaphore" warnings from the ended ranks' resource trackers)."""
    import json
    user_package(tmp_path)
    # lr.min > 0: the last epoch at learning rate 0 would add its warning line to stderr
    recipe = base_recipe(name="trap", **{"data": {"factory": "mypkg.edge:bad_sample", "workers": workers},
                                         "model": {"factory": "mypkg.parts:build_model", "kwargs": {"classes": 3}},
                                         "schedule.lr.min": 0.001})
    proc = cli(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and "ValueError: cannot decode sample 77" in lines[0], proc.stderr
    assert lines[0].startswith("qhm-launch: error: rank ") and " failed at global step " in lines[0]
    assert ("data worker 0: reading sample 77" in lines[0]) == (workers == 1), lines[0]
    run = tmp_path / "runs" / "trap"
    failed = json.loads((run / "failed.json").read_text())
    assert failed["error"] in lines[0] and failed["exit"] == 1
    log = (run / "failure.log").read_text()
    assert "Traceback" in log and "in __getitem__" in log and "cannot decode sample 77" in log
    status = cli(["status", str(run)], cwd=tmp_path, check=0)
    assert "failed" in status.stdout and "cannot decode sample 77" in status.stdout


@pytest.mark.e2e
def test_processes_a_factory_starts_end_with_the_run(tmp_path):
    """The factory runs in the launcher (its checks) and in each rank; its `sleep 300` children end too."""
    pids = tmp_path / "pids"
    user_package(tmp_path)
    recipe = base_recipe(name="spawn", epochs=1, **{"data": {"factory": "mypkg.edge:spawns", "workers": 1},
                                                   "model": {"factory": "mypkg.parts:build_model",
                                                             "kwargs": {"classes": 3}}})
    try:
        cli(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path, env={"QHM_TEST_PIDS": str(pids)}, check=0)
        started = [int(x) for x in pids.read_text().split()]
        assert len(started) == 3                   # the launcher's check and two ranks
        wait_for(lambda: not any(map(alive, started)), timeout=10, what="the factory's children to end")
    finally:
        _end([int(x) for x in pids.read_text().split()] if pids.exists() else [])


@pytest.mark.e2e
def test_processes_a_factory_starts_end_when_the_launcher_alone_is_killed_with_sigkill(tmp_path):
    """kill -9 of the launcher's PID (not its group): its check's `sleep 300` was its own child, each
    rank's is a child of a worker in a session of its own; death signals reach none of the three."""
    pids = tmp_path / "pids"
    user_package(tmp_path)
    recipe = base_recipe(name="spawn", epochs=3, **{"data": {"factory": "mypkg.edge:spawns", "workers": 0},
                                                   "model": {"factory": "mypkg.parts:build_model",
                                                             "kwargs": {"classes": 3}}})
    proc = start(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path,
                 env={"QHM_TEST_PIDS": str(pids), "QHM_TEST_STEP_DELAY": "0.2"})
    try:
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3, timeout=120, proc=proc,
                 what="the launcher's and both ranks' children")
        started = [int(x) for x in pids.read_text().split()]
        assert all(map(alive, started))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not any(map(alive, started)), timeout=15, what="the factory's children to end")
    finally:
        kill_group(proc)
        _end([int(x) for x in pids.read_text().split()] if pids.exists() else [])


@pytest.mark.e2e
def test_a_data_worker_stuck_in_getitem_dies_with_a_killed_run(tmp_path):
    pids = tmp_path / "pids"
    user_package(tmp_path)
    recipe = base_recipe(name="hang", **{"data": {"factory": "mypkg.edge:hangs", "workers": 1},
                                         "model": {"factory": "mypkg.parts:build_model", "kwargs": {"classes": 3}}})
    proc = start(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path, env={"QHM_TEST_PIDS": str(pids)})
    try:
        wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=120, proc=proc, what="a stuck read")
        stuck = [int(x) for x in pids.read_text().split()]
        kill_group(proc)
        wait_for(lambda: not any(map(alive, stuck)), timeout=20, what="the stuck data worker to end")
    finally:
        kill_group(proc)
        _end([int(x) for x in pids.read_text().split()] if pids.exists() else [])


@pytest.mark.e2e
@pytest.mark.serial
def test_a_preemption_that_meets_a_stuck_data_worker_ends_as_a_preemption_from_the_newest_checkpoint(tmp_path):
    """A data worker hangs in __getitem__: first a warning that a step takes far longer than the others;
    then SIGTERM: the stop it asks for can never come (no step ends), so the run ends as preempted (exit
    75) within the watchdog's time, without a new checkpoint, and resumes from the newest one."""
    import json
    import time
    pids = tmp_path / "pids"
    user_package(tmp_path)
    recipe = base_recipe(name="hang", **{"data": {"factory": "mypkg.edge:hangs", "workers": 1},
                                         "model": {"factory": "mypkg.parts:build_model", "kwargs": {"classes": 3}}})
    proc = start(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path,
                 env={"QHM_TEST_PIDS": str(pids), "QHM_TEST_STALL_S": "2", "QHM_TEST_STUCK_S": "5"})
    run = tmp_path / "runs" / "hang"
    try:
        wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=120, proc=proc, what="a stuck read")
        stuck = [int(x) for x in pids.read_text().split()]
        time.sleep(4)
        sent = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        took = time.time() - sent
    finally:
        kill_group(proc)
        _end([int(x) for x in pids.read_text().split()] if pids.exists() else [])
    newest = checkpoint_steps(run)[-1]
    assert proc.returncode == 75 and 5 <= took < 20, (proc.returncode, took, out[-3000:])
    assert "WARNING: rank" in out and "is a batch not coming" in out, out[-3000:]
    assert f"stopping without a new checkpoint; the run resumes from global step {newest}" in out, out[-3000:]
    assert json.loads((run / "preempted.json").read_text())["global_step"] == newest
    assert "Traceback" not in out and "error:" not in out, out[-3000:]
    wait_for(lambda: not any(map(alive, stuck)), timeout=20, what="the stuck data worker to end")


@pytest.mark.e2e
def test_a_data_worker_killed_with_sigkill_is_one_line_naming_the_worker_and_its_rank(tmp_path):
    """What the out-of-memory killer does to a data worker: DataLoader reports "exited unexpectedly" or,
    when the worker dies half-way through sending, a ConnectionResetError that names no worker."""
    import uuid
    from helpers import processes_with
    user_package(tmp_path)
    mark = uuid.uuid4().hex
    recipe = base_recipe(name="dw", epochs=4, **{"data": {"factory": "mypkg.parts:build_data",
                                                          "kwargs": {"n": 300, "classes": 3}, "workers": 1},
                                                 "model": {"factory": "mypkg.parts:build_model", "kwargs": {"classes": 3}},
                                                 "schedule.lr.min": 0.001})
    proc = start(["run", str(write_recipe(tmp_path, recipe))], cwd=tmp_path,
                 env={"QHM_TEST_STEP_DELAY": "0.1", "QHM_TEST_MARK": mark})
    try:
        wait_for(lambda: checkpoint_steps(tmp_path / "runs" / "dw"), proc=proc, what="a first checkpoint")
        servers = [p for p in processes_with(f"QHM_TEST_MARK={mark}", "RANK=1")
                   if b"forkserver" in open(f"/proc/{p}/cmdline", "rb").read()]
        parent = {p: int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) for p in servers}
        worker = [p for p in servers if parent[p] in servers][0]          # forked by rank 1's fork server
        os.kill(worker, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
    finally:
        kill_group(proc)
    errors = [x for x in out.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert proc.returncode == 1 and len(errors) == 1, out[-3000:]
    assert errors[0].startswith("qhm-launch: error: rank 1 failed at global step ") and \
        f"a data worker (pid {worker}) ended without a word" in errors[0] and "out-of-memory killer" in errors[0], errors


# ---------------------------------------------------------------------------------------------- images

def write_images(root, classes=3, per_class=(40, 12), size=32):
    """A folder of generated PNGs in ImageFolder's layout: class c is a bright square at its own place."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                img = (torch.rand(size, size, 3, generator=g) * 80).to(torch.uint8)
                x0 = 4 + 8 * c
                img[x0:x0 + 8, x0:x0 + 8] = 230
                Image.fromarray(img.numpy()).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_imagefolder_trains_evaluates_on_val_and_measures_the_gradient_on_unaugmented_images(tmp_path):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    from launcher.train import models
    from launcher.data.imagefolder import MEAN, STD
    root = write_images(tmp_path / "images")
    recipe = base_recipe(name="img", epochs=2, precision="fp64", **{
        "data": {"dataset": "imagefolder", "root": str(root), "image_size": 32, "workers": 1, "augment": True},
        "eval": {"full_grad_norm": True, "batch_size": 50}, "schedule.batch.initial": 8})
    rows = metric_rows(train_ranks(recipe, tmp_path))
    assert len(rows) == 2 and rows[0]["samples"] == 120 and rows[-1]["test_acc"] is not None
    # the last row's gradient norm, recomputed here over the un-augmented training images
    t = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    train = ImageFolder(str(root / "train"), transform=t)
    x = torch.stack([train[i][0] for i in range(len(train))]).double()
    y = torch.tensor([train[i][1] for i in range(len(train))])
    model = models.build("small_cnn", (3, 32, 32), 3, 0, torch.float64)
    model.load_state_dict(final_params(tmp_path / "runs" / "img"))
    model.eval()
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert rows[-1]["grad_norm"] == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-9)
    # and the test rows are over val/ (36 images)
    assert rows[-1]["test_acc"] * 36 == pytest.approx(round(rows[-1]["test_acc"] * 36))


# ---------------------------------------------------------------------------------------------- streamed order

def streamed(**over):
    return base_recipe(**{"precision": "fp64", "epochs": 3, "data.size": 201, "data.augment": True,
                          "checkpoint.every_steps": 0, **over})


def close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_the_streamed_order_is_the_keyed_order(tmp_path):
    """The same data in memory and streamed (augmentation on): the same parameters; and the streamed
    path on 1 process x micro 32 and 2 processes x micro 4 x accumulation 4."""
    one = {"distributed.nproc_per_node": 1, "distributed.max_micro_batch": 32, "schedule.batch.initial": 32}
    runs = {"mem": streamed(name="mem", **one),
            "one": streamed(name="one", **one, **{"data.stream": True, "data.workers": 2}),
            "two": streamed(name="two", **{"data.stream": True, "data.workers": 1, "distributed.max_micro_batch": 4,
                                           "schedule.batch.initial": 32})}
    for r in runs.values():
        train_ranks(r, tmp_path)
    run = lambda name: tmp_path / "runs" / name  # noqa: E731
    close(final_params(run("one")), final_params(run("mem")))          # streamed = in memory
    for a, b in zip(metric_rows(run("one")), metric_rows(run("mem"))):
        assert a["samples"] == b["samples"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)
    close(final_params(run("one")), final_params(run("two")))          # streamed on 1 x 32 = on 2 x 4 x 4
    assert [(r["micro_batch"], r["accum"]) for r in metric_rows(run("two"))] == [(4, 4), (4, 8), (4, 16)]


STREAMED_KILL = streamed(name="s", **{"data.stream": True, "data.workers": 1, "data.size": 400, "epochs": 4,
                                      "precision": "fp32", "checkpoint.every_steps": 3})


@pytest.fixture(scope="module")
def streamed_reference(tmp_path_factory):
    return train_ranks(STREAMED_KILL, tmp_path_factory.mktemp("streamed_ref"))


@pytest.mark.e2e
def test_streamed_kill_9_and_resume_is_bitwise(tmp_path, streamed_reference):
    """Killed in the middle of the second stage: the run went through a stage switch (new micro-batch
    shape for the workers) and resumes mid-epoch (the sampler starts at the saved step)."""
    path = write_recipe(tmp_path, STREAMED_KILL)
    run = tmp_path / "runs" / "s"
    proc = start(["run", str(path)], cwd=tmp_path, env={"QHM_TEST_STEP_DELAY": "0.04"})
    wait_for(lambda: any(25 < s < 38 for s in checkpoint_steps(run)), proc=proc, what="a checkpoint mid-stage 2")
    kill_group(proc)
    out = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert "resumed from" in out.stdout
    assert_bitwise(final_params(run), final_params(streamed_reference))
    assert metric_rows(run) == metric_rows(streamed_reference)


def test_a_slow_factory_is_named_while_it_is_awaited_and_a_missing_one_says_where_it_looked(tmp_path, monkeypatch, capsys):
    from launcher.config import factories
    from launcher.errors import UserError
    (tmp_path / "slowmod.py").write_text("import time\ndef build():\n    time.sleep(0.6)\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(factories, "WAIT_NOTE_S", 0.2)
    try:
        assert factories.call("data.factory", "slowmod:build", {}) == 7
    finally:
        sys.modules.pop("slowmod", None)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("qhm-launch: still waiting for data.factory 'slowmod:build'")
    with pytest.raises(UserError, match=f"looked in the working directory and PYTHONPATH: {tmp_path}"):
        factories.resolve("model.factory", "nowhere_here:build")


def test_a_sweep_s_points_check_the_user_s_factories_once(tmp_path, monkeypatch):
    """Points that differ in schedule and seed share one check of the data and model (a 10,000-point sweep
    must not call the user's factories 10,000 times); another data key is checked again."""
    from launcher import config
    from launcher.train import preflight
    user_package(tmp_path)
    calls = tmp_path / "calls"
    (tmp_path / "mypkg" / "counted.py").write_text(
        "from mypkg.parts import build_data\n"
        f"def data(**kw):\n    open({str(calls)!r}, 'a').write('x')\n    return build_data(**kw)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for lr, seed, n in [(0.1, 1, 300), (0.2, 2, 300), (0.3, 3, 300), (0.1, 1, 240)]:
            recipe = config.from_dict(base_recipe(**{"data": {"factory": "mypkg.counted:data", "kwargs": {"n": n, "classes": 3}},
                                                     "model": {"factory": "mypkg.parts:build_model", "kwargs": {"classes": 3}},
                                                     "schedule.lr.max": lr, "seed": seed}))
            preflight.preflight(recipe, 2)
    finally:
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]
    assert calls.read_text() == "xx"
