"""The checkpoint manager on its own: registered parts round-trip, scopes, versions, the manifest's
schema, fallback on anything that fails to load, pruning that never loses the newest valid checkpoint,
and the v1 -> v2 upgrade. Two-rank cases run in real processes (gloo)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_ranks
from launcher.run.checkpoint import VERSION, CheckpointManager
from launcher.train.comm import Comm
from launcher.errors import UserError
from launcher.run.folder import RunFolder


def solo() -> Comm:
    return Comm(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


class Box:
    """A replicated part: some tensors and numbers."""

    def __init__(self, value=0.0):
        self.t = torch.full((3,), float(value))
        self.n = int(value)

    def state_dict(self):
        return {"t": self.t.clone(), "n": self.n}

    def load_state_dict(self, state):
        self.t.copy_(state["t"])
        self.n = state["n"]


class PerRank(Box):
    """A per-rank part that records how it was resharded."""

    def reshard(self, saved, rank, world, step):
        return {"t": sum(s["t"] for s in saved), "n": 1000 * len(saved) + rank}


class Files:
    """A part that writes its own files (as DeepSpeed's engine does)."""

    def __init__(self, text=""):
        self.text = text

    def save_files(self, folder: Path):
        (folder / "own").mkdir()
        (folder / "own" / "data.txt").write_text(self.text)

    def check_files(self, folder: Path):
        (folder / "own" / "data.txt").read_text()

    def load_files(self, folder: Path):
        self.text = (folder / "own" / "data.txt").read_text()


def manager(tmp_path, comm=None, keep=3, parts=None, logs=None):
    m = CheckpointManager(RunFolder(tmp_path / "run"), comm or solo(), keep,
                          log=(logs.append if logs is not None else lambda *a: None))
    for name, (part, scope) in (parts or {}).items():
        m.register(name, part, scope)
    return m


def save(m, step, **extra):
    return m.save(step, {"position": {"global_step": step}, "recipe": {"seed": 0}, **extra})


def test_registered_parts_round_trip_with_their_scopes(tmp_path):
    a, b, c = Box(7), PerRank(3), Files("hello")
    m = manager(tmp_path, parts={"a": (a, "replicated"), "b": (b, "per_rank"), "c": (c, "files")})
    path = save(m, 12)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == VERSION and manifest["parts"] == {"a": "replicated", "b": "per_rank", "c": "files"}
    assert set(manifest["files"]) == {"state.pt", "rank-00000.pt", "own/data.txt"}
    assert set(torch.load(path / "state.pt", weights_only=True)) == {"a"}             # replicated parts only
    assert set(torch.load(path / "rank-00000.pt", weights_only=True)) == {"b"}        # per-rank parts only
    assert oct(path.stat().st_mode & 0o777) == oct(0o700)
    assert oct((path / "state.pt").stat().st_mode & 0o777) == oct(0o600)
    a2, b2, c2 = Box(), PerRank(), Files()
    back = manager(tmp_path, parts={"a": (a2, "replicated"), "b": (b2, "per_rank"), "c": (c2, "files")})
    assert back.resume()["step"] == 12
    assert torch.equal(a2.t, a.t) and a2.n == 7 and torch.equal(b2.t, b.t) and b2.n == 3 and c2.text == "hello"


def test_a_part_lacking_its_methods_is_refused_at_registration(tmp_path):
    with pytest.raises(TypeError, match="lacks reshard"):
        manager(tmp_path).register("x", Box(), "per_rank")
    with pytest.raises(TypeError, match="lacks save_files, check_files, load_files"):
        manager(tmp_path).register("x", Box(), "files")


def test_unknown_version_is_refused_in_one_line_and_the_previous_one_is_used(tmp_path):
    m = manager(tmp_path, parts={"a": (Box(1), "replicated")})
    save(m, 1)
    m._of("replicated")[0].obj.n = 2
    newest = save(m, 2)
    manifest = json.loads((newest / "manifest.json").read_text())
    (newest / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    logs, a = [], Box()
    assert manager(tmp_path, parts={"a": (a, "replicated")}, logs=logs).resume()["step"] == 1 and a.n == 1
    assert logs == ["checkpoint step-000000002 is not valid (manifest: version 99 (this launcher reads 1, 2)); "
                    "trying the previous one"]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000000001")
    with pytest.raises(UserError) as info:
        manager(tmp_path, parts={"a": (Box(), "replicated")}).resume()
    assert "version 99" in str(info.value) and "nothing was deleted" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["list", "no_recipe", "bad_file_entry", "escaping_name", "planted_pickle",
                                    "other_step"])
def test_corrupt_but_parseable_checkpoints_fall_back(tmp_path, damage):
    m = manager(tmp_path, parts={"a": (Box(1), "replicated")})
    save(m, 1)
    m._of("replicated")[0].obj.n = 2
    newest = save(m, 2)
    manifest = json.loads((newest / "manifest.json").read_text())
    if damage == "list":
        manifest = []
    elif damage == "no_recipe":
        del manifest["recipe"]
    elif damage == "bad_file_entry":
        manifest["files"]["state.pt"] = "x"
    elif damage == "escaping_name":
        manifest["files"]["../../x"] = manifest["files"].pop("rank-00000.pt")
    elif damage == "other_step":                 # a folder copied or renamed under another step's name
        manifest["step"] = 7
    else:                        # a pickle that would run code, with a manifest that vouches for it
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'PWNED'}",))
        torch.save({"a": Evil()}, newest / "state.pt")          # a real torch file, but with code in it
        from launcher.run.checkpoint import describe
        manifest["files"]["state.pt"] = describe(newest / "state.pt")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    a, logs = Box(), []
    assert manager(tmp_path, parts={"a": (a, "replicated")}, logs=logs).resume()["step"] == 1
    assert a.n == 1 and len(logs) == 1 and "step-000000002 is not valid" in logs[0]
    assert not (tmp_path / "PWNED").exists()


def test_pruning_counts_only_valid_checkpoints_and_never_deletes_the_newest(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-999999999").mkdir(parents=True)                  # garbage that sorts last
    (ckpts / "step-999999999" / "manifest.json").write_text("{}")
    m = manager(tmp_path, keep=1, parts={"a": (Box(1), "replicated")})
    for step in (3, 6, 9):
        save(m, step)
        m.wait()
    names = sorted(p.name for p in ckpts.glob("step-*"))
    assert names == ["step-000000009", "step-999999999"], names
    a = Box()
    back = manager(tmp_path, keep=1, parts={"a": (a, "replicated")})
    assert back.resume()["step"] == 9                                # after falling back from the garbage
    save(back, 12)
    back.wait()
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000000012", "step-999999999"]


def _two_ranks_save(comm, root):
    m = manager(Path(root), comm, parts={"a": (Box(5), "replicated"), "b": (PerRank(10 + comm.rank), "per_rank")})
    m.save(4, {"position": {}, "recipe": {}})
    return comm.rank


def _resume_on(comm, root):
    a, b = Box(), PerRank()
    m = manager(Path(root), comm, parts={"a": (a, "replicated"), "b": (b, "per_rank")})
    m.resume()
    return a.n, b.t.tolist(), b.n


def test_per_rank_parts_are_per_rank_and_reshard_on_another_world_size(tmp_path):
    assert run_ranks(_two_ranks_save, 2, str(tmp_path)) == [0, 1]
    path = tmp_path / "run" / "checkpoints" / "step-000000004"
    assert torch.load(path / "rank-00000.pt", weights_only=True)["b"]["n"] == 10
    assert torch.load(path / "rank-00001.pt", weights_only=True)["b"]["n"] == 11
    assert json.loads((path / "manifest.json").read_text())["world_size"] == 2
    # the same world size: each rank its own state; another: the part reshards what all ranks saved
    assert run_ranks(_resume_on, 2, str(tmp_path)) == [(5, [10.0] * 3, 10), (5, [11.0] * 3, 11)]
    assert _resume_on(solo(), str(tmp_path)) == (5, [21.0] * 3, 2000)
    assert run_ranks(_resume_on, 3, str(tmp_path))[2] == (5, [21.0] * 3, 2002)


def test_a_v1_checkpoint_is_upgraded(tmp_path):
    """A checkpoint in the first layout (state.pt: engine/train/wandb_id/running_total; rank files:
    rng/running) loads into the current parts."""
    from launcher.run.checkpoint import describe
    from launcher.train.state import EpochSums, RankRNG, TrainState
    from launcher.train.build import upgrade_v1
    from launcher.data.order import GlobalBatchSampler
    path = tmp_path / "run" / "checkpoints" / "step-000000005"
    path.mkdir(parents=True)
    rng = RankRNG(0, 0).state_dict()
    torch.save({"engine": {"model": {"w": torch.ones(2)}}, "train": {"epoch": 1, "step": 2, "global_step": 5,
                "samples": 40, "min_grad_norm": 0.5, "best_test_acc": 0.25, "wall_time": 3.0},
                "wandb_id": "abc", "running_total": torch.tensor([4.0, 3.0, 8.0])}, path / "state.pt")
    torch.save({"rng": rng, "running": torch.tensor([4.0, 3.0, 8.0], dtype=torch.float64)}, path / "rank-00000.pt")
    (path / "manifest.json").write_text(json.dumps({
        "version": 1, "step": 5, "world_size": 1, "position": {}, "recipe": {},
        "files": {n: describe(path / n) for n in ("state.pt", "rank-00000.pt")}}))

    class Engine(Box):
        def load_state_dict(self, state):
            self.loaded = state

    engine, state, sums = Engine(), TrainState(), EpochSums(torch.device("cpu"))
    sampler = GlobalBatchSampler(100, 0)
    m = manager(tmp_path, parts={"engine": (engine, "replicated"), "train": (state, "replicated"),
                                 "order": (sampler, "replicated"), "rng": (RankRNG(0, 0), "per_rank"),
                                 "epoch_sums": (sums, "per_rank")})
    m.register_upgrade(1, upgrade_v1)
    assert m.resume()["step"] == 5
    assert torch.equal(engine.loaded["model"]["w"], torch.ones(2))
    assert (state.epoch, state.step, state.global_step, state.samples, state.wandb_id) == (1, 2, 5, 40, "abc")
    assert (float(sums.loss), float(sums.correct), sums.samples) == (4.0, 3.0, 8)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_twice(comm, root):
    a, b = Box(1), PerRank(comm.rank)
    m = manager(Path(root), comm, parts={"a": (a, "replicated"), "b": (b, "per_rank")})
    m.save(1, {"position": {}, "recipe": {}})
    a.n = 2
    m.save(2, {"position": {}, "recipe": {}})


def _resume_and_report(comm, root):
    a, b = Box(), PerRank()
    logs = []
    m = manager(Path(root), comm, parts={"a": (a, "replicated"), "b": (b, "per_rank")}, logs=logs)
    return m.resume()["step"], a.n, logs


def test_a_planted_pickle_on_one_rank_s_file_makes_every_rank_fall_back(tmp_path):
    from launcher.run.checkpoint import describe
    run_ranks(_save_twice, 2, str(tmp_path))
    newest = tmp_path / "run" / "checkpoints" / "step-000000002"
    torch.save({"b": _Evil(str(tmp_path / "PWNED"))}, newest / "rank-00001.pt")     # a real torch file
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["rank-00001.pt"] = describe(newest / "rank-00001.pt")      # the hash vouches for it
    (newest / "manifest.json").write_text(json.dumps(manifest))
    out = run_ranks(_resume_and_report, 2, str(tmp_path))
    assert [(step, n) for step, n, _ in out] == [(1, 1), (1, 1)]                  # both ranks, the same one
    assert "step-000000002 is not valid (fails to load (UnpicklingError" in out[0][2][0]
    assert not (tmp_path / "PWNED").exists()
