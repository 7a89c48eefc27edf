"""The GPU check: one script to run whenever a CUDA device is lent (under 5 minutes on one GPU), and in
``--smoke`` mode on any CPU (under 2 minutes; CI runs it, so the script cannot rot).

1. QHM's CUDA kernels (foreach, compiled) against the CPU loop (float64).
2. Host syncs in qhm-launch's steady-state steps of a default recipe (one process under accumulation, so
   the noise scale is measured; step rows every few steps; the stop checks): under
   torch.cuda.set_sync_debug_mode("warn") every "called a synchronizing CUDA operation" warning counted,
   and what that mode cannot see counted by wrapping it (Event and Stream synchronize, copies from
   pageable host memory with non_blocking) (target 0).
3. Steps/s side by side at batch 8 and 1,024, ResNet-18 (CIFAR stem) on CIFAR-shaped random data (3x32x32,
   100 classes), bf16, channels_last, eager: the paper-style loop (per-parameter Python QHM with two
   buffers; a DataLoader with 2 workers over uint8 images and torchvision's RandomCrop/Flip/Rotation),
   a bare torch loop (data on the GPU, QHM foreach) and qhm-launch; then one compiled qhm-launch run.
4. A bitwise resume with ``performance.deterministic: true``: a run stopped after its first epoch and
   resumed from the checkpoint ends on the same bits as one that was not.
5. Two processes asked on one GPU: refused in one line before anything starts.

Smoke mode: the same code on CPU, fp32, 3x16x16 images, a few steps, the compile backend ``eager``
(dynamo traces, nothing is built) and no DataLoader worker processes.

    python3 benchmarks/gpu_check.py [--smoke]
"""
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Before torch starts: torch reads CUBLAS_WORKSPACE_CONFIG once, at the first cuBLAS call, and section 4
# (performance.deterministic) needs it; set in the process after sections 2-3 ran cuBLAS, section 4's first
# gemm raised "Deterministic behavior was enabled ... CUBLAS_WORKSPACE_CONFIG".
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = "--smoke" in sys.argv
DEVICE = torch.device("cpu" if SMOKE else "cuda")
SIDE = 16 if SMOKE else 32
MEASURED = [8, 16] if SMOKE else [8, 1024]
PRECISION = "fp32" if SMOKE else "bf16"    # bf16 autocast on a CPU without native bf16 is ~7x slower
WORKERS = 0 if SMOKE else 2
if SMOKE:
    os.environ.setdefault("QHM_COMPILE_BACKEND", "eager")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16")


def resnet18():
    from launcher.train import models
    return models.build("resnet18", (3, SIDE, SIDE), 100, 0, torch.float32).to(DEVICE)


def steps_for(batch: int) -> int:
    return 3 if SMOKE else max(20, min(200, 16_000 // batch))


def section(title: str):
    print(f"\n## {title}", flush=True)
    return time.time()


def done(t0: float):
    print(f"({time.time() - t0:.0f} s)", flush=True)


def recipe(folder, batch: int, n: int, epochs: int = 2, compile_mode: str = "off", **over):
    from launcher import config as R
    r = {"name": f"b{batch}", "output": str(folder), "epochs": epochs, "seed": 0, "precision": PRECISION,
         "model": "resnet18",
         "data": {"dataset": "synthetic", "size": n, "shape": [3, SIDE, SIDE], "classes": 100, "augment": True},
         "schedule": {"batch": {"kind": "constant", "size": batch}, "lr": {"max": 0.05}},
         "distributed": {"nproc_per_node": 1, "max_micro_batch": 4096},
         "performance": {"channels_last": True, "compile": compile_mode},
         "eval": {"every_epochs": 1000, "full_grad_norm": False, "batch_size": 1000},
         "checkpoint": {"every_steps": 0, "keep": 2},
         "tracking": {"wandb": {"mode": "disabled"}, "log_every_steps": 0}}
    from launcher import keys
    for key, value in over.items():
        keys.set_(r, key, value)
    return R.from_dict(r)


def trained(r, until_epoch=None):
    """Train recipe ``r`` in this process (resuming from its checkpoint if there is one); the trainer."""
    from launcher.train import comm as comm_mod
    from launcher.train import trainer
    return trainer.run(r, comm_mod.init(), log=lambda *a, **k: None, until_epoch=until_epoch)


# --------------------------------------------------------------------------------------- 1
def correctness():
    t0 = section("1. QHM's CUDA kernels against the CPU loop")
    if DEVICE.type != "cuda":
        print("skipped on CPU")
        return done(t0)
    sys.path.insert(0, str(ROOT / "tests" / "qhm"))
    import test_optimizer as t
    for kw in ({"foreach": True}, {"compiled": True}):
        t.test_cuda_kernels_match_the_cpu_loop(kw)
        print(f"QHM {kw} on CUDA matches the CPU loop (float64, 50 steps, 1e-12): ok")
    done(t0)


# --------------------------------------------------------------------------------------- 2
SYNC_WARNING = "called a synchronizing cuda operation"      # the text of each counted event


class Unseen:
    """What set_sync_debug_mode does not report, counted while ``on``: Event and Stream synchronize, and a
    non_blocking copy to the device from pageable (unpinned) host memory, which synchronises anyway."""

    def __init__(self):
        self.on, self.count, self.first = False, 0, None
        self._event, self._stream, self._to = torch.cuda.Event.synchronize, torch.cuda.Stream.synchronize, torch.Tensor.to
        unseen = self

        def event(self_, *a, **k):
            unseen.hit("Event.synchronize")
            return unseen._event(self_, *a, **k)

        def stream(self_, *a, **k):
            unseen.hit("Stream.synchronize")
            return unseen._stream(self_, *a, **k)

        def to(self_, *a, **k):
            target = next((x for x in a if isinstance(x, (torch.device, str))), k.get("device"))
            if (unseen.on and k.get("non_blocking") and self_.device.type == "cpu" and target is not None
                    and torch.device(target).type == "cuda" and not self_.is_pinned()):
                unseen.hit("a non_blocking copy from pageable memory")
            return unseen._to(self_, *a, **k)
        torch.cuda.Event.synchronize, torch.cuda.Stream.synchronize, torch.Tensor.to = event, stream, to

    def hit(self, what: str) -> None:
        if self.on:
            self.count += 1
            if self.first is None:
                import traceback
                frame = traceback.extract_stack()[-3]
                self.first = f"{what} at {frame.filename}:{frame.lineno}"

    def restore(self) -> None:
        torch.cuda.Event.synchronize, torch.cuda.Stream.synchronize, torch.Tensor.to = self._event, self._stream, self._to


def host_syncs():
    t0 = section("2. Host syncs per steady-state step of qhm-launch")
    steps, warm = (8, 2) if SMOKE else (120, 20)
    batch = 32 if SMOKE else 128               # smoke: a small batch keeps the CPU time low on a loaded host
    counted = {"steps": 0, "syncs": 0, "first": None}
    unseen = Unseen()
    with tempfile.TemporaryDirectory() as tmp:
        from launcher.train import comm as comm_mod
        from launcher.train.build import build
        from launcher.train.signals import PreemptionFlag
        from launcher.train.trainer import Trainer
        # the default per-step features on: noise scale (accumulation 2), step rows every 4 steps, stop checks
        r = recipe(tmp, batch, batch * steps, epochs=1, **{"distributed.max_micro_batch": batch // 2,
                                                            "tracking.log_every_steps": 4})
        trainer = Trainer(build(r, comm_mod.init(), log=lambda *a, **k: None), PreemptionFlag([]))
        original = trainer.train_step
        caught = warnings.catch_warnings(record=True)

        def watched(epoch, step):
            # the steady window: from step `warm` to the step before the epoch's last, whose end
            # (the epoch row, evaluation) synchronises by design; log points and stop checks inside it
            if step == warm and DEVICE.type == "cuda":
                counted["log"] = caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                unseen.on = True
            if step == steps - 1 and unseen.on:
                torch.cuda.set_sync_debug_mode("default")
                unseen.on = False
                caught.__exit__(None, None, None)
            if warm <= step < steps - 1:
                counted["steps"] += 1
            return original(epoch, step)
        trainer.train_step = watched
        try:
            trainer.close(trainer.train())
        finally:
            unseen.restore()
    syncs = [w for w in counted.get("log", []) if SYNC_WARNING in str(w.message).lower()]
    first = f"{syncs[0].filename}:{syncs[0].lineno}" if syncs else unseen.first
    where = f" (first: {first})" if first else ""
    print(f"host syncs in {counted['steps']} steady-state steps of the default path (batch {batch} = {batch // 2} x 2, noise "
          f"scale, step rows every 4 steps, {PRECISION}): {len(syncs)} seen by set_sync_debug_mode, "
          f"{unseen.count} it cannot see{where}" + (" [CPU: not counted]" if DEVICE.type != "cuda" else ""))
    done(t0)


# --------------------------------------------------------------------------------------- 3
def paper_style(batch: int, steps: int) -> float:
    """The paper's code, as REFERENCE.md describes it: per-parameter QHM with two buffers, a DataLoader
    over uint8 images with torchvision transforms."""
    import numpy as np
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    class Images(Dataset):
        def __init__(self, n):
            g = np.random.default_rng(0)
            self.x, self.y = g.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8), g.integers(0, 100, n)
            self.t = T.Compose([T.ToPILImage(), T.RandomCrop(SIDE, padding=4), T.RandomHorizontalFlip(),
                                T.RandomRotation(15), T.ToTensor(),
                                T.Normalize((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))])

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.t(self.x[i]), int(self.y[i])

    model = resnet18().to(memory_format=torch.channels_last)
    params = list(model.parameters())
    state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in params}
    lr, beta, gamma = 0.05, 0.9, 0.7
    loader = DataLoader(Images(batch * (steps + 3)), batch_size=batch, shuffle=True, num_workers=WORKERS)
    count, start = 0, None
    for x, y in loader:
        x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y.to(DEVICE))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in params:                       # the paper's per-parameter Python QHM, two buffers
                d, m = state[p]
                d.mul_(beta).add_(p.grad, alpha=1 - beta)
                m.copy_((1 - gamma) * p.grad + gamma * d)
                p.add_(m, alpha=-lr)
        count += 1
        if count == 3:
            sync()
            start = time.time()
        if count == steps + 3:
            break
    sync()
    return (count - 3) / (time.time() - start)


def bare_loop(batch: int, steps: int) -> float:
    """A bare hand-written loop with the same options: data on the device, random crop and flip there,
    channels_last, QHM foreach."""
    import qhm
    model = resnet18().to(memory_format=torch.channels_last)
    opt = qhm.QHM(model.parameters(), lr=0.05, beta=0.9, gamma=0.7, foreach=True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x_all = torch.randn(batch * 4, 3, SIDE, SIDE, device=DEVICE, generator=g)
    y_all = torch.randint(0, 100, (batch * 4,), device=DEVICE, generator=g)
    for k in range(steps + 3):
        if k == 3:
            sync()
            t0 = time.time()
        idx = torch.randint(0, len(y_all), (batch,), device=DEVICE, generator=g)
        x = torch.nn.functional.pad(x_all[idx], (4, 4, 4, 4))
        dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=torch.Generator().manual_seed(k)))
        x = x[:, :, dy:dy + SIDE, dx:dx + SIDE]
        x = torch.where(torch.rand(batch, 1, 1, 1, device=DEVICE, generator=g) < 0.5, x.flip(-1), x)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y_all[idx], reduction="sum") / batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return steps / (time.time() - t0)


def ours(batch: int, steps: int, compile_mode: str = "off") -> float:
    """qhm-launch's own samples/s of its second epoch (warm; compiled in the first), as steps/s."""
    from launcher.run.files import read_jsonl
    with tempfile.TemporaryDirectory() as tmp:
        trained(recipe(tmp, batch, batch * steps, compile_mode=compile_mode))
        rows = read_jsonl(Path(tmp) / f"b{batch}" / "metrics.jsonl")
    return rows[-1]["samples_per_s"] / batch


def speed():
    t0 = section("3. Steps/s: the paper-style loop, a bare loop and qhm-launch (eager, channels_last)")
    print("| batch | paper-style loop | bare torch loop | qhm-launch | vs paper-style | vs bare |\n"
          "|---|---|---|---|---|---|", flush=True)
    for b in MEASURED:
        p, bare, mine = paper_style(b, steps_for(b)), bare_loop(b, steps_for(b)), ours(b, steps_for(b))
        print(f"| {b} | {p:.1f} | {bare:.1f} | {mine:.1f} | {mine / p:.2f}x | {mine / bare:.2f}x |", flush=True)
    b = MEASURED[0]
    compiled = ours(b, steps_for(b), compile_mode="default")
    print(f"qhm-launch with performance.compile default at batch {b} "
          f"({os.environ.get('QHM_COMPILE_BACKEND', 'inductor')}): {compiled:.1f} steps/s", flush=True)
    done(t0)


# --------------------------------------------------------------------------------------- 4
def bitwise_resume():
    t0 = section("4. Resume with performance.deterministic: true")
    batch, steps = 16, 3 if SMOKE else 20
    with tempfile.TemporaryDirectory() as tmp:
        whole = trained(recipe(Path(tmp) / "a", batch, batch * steps, **{"performance.deterministic": True}))
        resumed = recipe(Path(tmp) / "b", batch, batch * steps, **{"performance.deterministic": True})
        trained(resumed, until_epoch=1)                         # stops after epoch 0, checkpoint written
        again = trained(resumed)                                # resumes from it
        a, b = whole.parts.module.state_dict(), again.parts.module.state_dict()
        same = all(torch.equal(a[k], b[k]) for k in a)
        print(f"2 epochs of {steps} steps, stopped after the first and resumed (resumed at global step "
              f"{steps}: {again.state.global_step == 2 * steps}): bitwise equal to the run not stopped: {same}")
    torch.use_deterministic_algorithms(False)
    done(t0)


# --------------------------------------------------------------------------------------- 5
def refused_on_one_gpu():
    t0 = section("5. Two processes on one GPU")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        from launcher import config as R
        r = recipe(tmp, 8, 64, **{"distributed.nproc_per_node": 2})
        path.write_text(R.dump(r))
        # the project importable wherever it is (installed or not): a bare "No module named launcher" exit 1
        # must not read as a refusal
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="0",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if DEVICE.type != "cuda":                  # on CPU: the check itself, as if one GPU were visible
            from launcher.errors import UserError
            from launcher.train.preflight import check_devices
            try:
                check_devices(r, 2, has_cuda=True, visible=1)
                print("NOT refused")
            except UserError as exc:
                print(f"refused: {exc}")
            return done(t0)
        out = subprocess.run([sys.executable, "-m", "launcher", "run", str(path)], cwd=tmp, env=env,
                             capture_output=True, text=True, timeout=120)
        lines = [x for x in out.stderr.splitlines() if x.strip()]
        words = "distributed.nproc_per_node: 2 processes asked, 1 GPU visible here"
        ok = out.returncode == 2 and len(lines) == 1 and words in lines[0]
        print(f"exit {out.returncode}, {len(lines)} line(s) on stderr: {lines[-1] if lines else ''}")
        print(f"refused as it should be (exit 2, one line with the refusal's words): {ok}")
    done(t0)


if __name__ == "__main__":
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device (python3 benchmarks/gpu_check.py --smoke runs the same code on CPU)")
        sys.exit(0)
    start = time.time()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU (smoke)'}",
          flush=True)
    correctness()
    host_syncs()
    speed()
    bitwise_resume()
    refused_on_one_gpu()
    print(f"\ngpu check done in {time.time() - start:.0f} s", flush=True)
