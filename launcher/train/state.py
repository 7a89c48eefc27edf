"""The stateful parts of a run that are neither the engine nor the data order.

Each is a ``state_dict`` / ``load_state_dict`` pair registered with the checkpoint manager: the
train state is replicated (rank 0 writes it); the RNG and the epoch's running sums are per rank, and
know how to rebuild themselves when a checkpoint written by another number of ranks is loaded.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from launcher.data import order


@dataclass
class TrainState:
    """Where training stands, and what it has found so far; saved in every checkpoint."""
    epoch: int = 0                      # the epoch in progress
    step: int = 0                       # optimizer steps done in that epoch
    global_step: int = 0
    samples: int = 0                    # SFO: per-sample gradients computed so far
    min_grad_norm: float = float("inf")
    best_test_acc: float = 0.0
    best_val_acc: float = 0.0
    wall_time: float = 0.0              # seconds trained so far, over all restarts
    wandb_id: str = ""                  # the W&B run this trajectory belongs to

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:         # fields added later keep their defaults on older checkpoints
                setattr(self, f.name, state[f.name])


def own_device_state(saved, index: int):
    """This rank's CUDA RNG state from a checkpoint: saved as its own device's state, or (layout before)
    a list of every visible device's, of which it takes its device's (None if that device was not seen)."""
    if isinstance(saved, (list, tuple)):
        return saved[index] if index < len(saved) else None
    return saved


class RankRNG:
    """This rank's python, numpy, torch (and its own CUDA device's) RNG. A rank the checkpoint did not
    have derives its state from (seed, rank, global step), so an elastic resume is still a function of
    the checkpoint. Only the rank's own device is saved: a resume where other GPUs are visible (fewer
    per node, another CUDA_VISIBLE_DEVICES) restores the same state."""

    def __init__(self, seed: int, rank: int, device: torch.device | None = None):
        self.seed, self.rank = seed, rank
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        out = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_state_dict(self, state: dict) -> None:
        if "derive_from_step" in state:
            self.seed_from(state["derive_from_step"])
            return
        random.setstate(state["python"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            cuda = own_device_state(state["cuda"], self.device.index or 0)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)

    def reshard(self, saved: list[dict], rank: int, world: int, step: int) -> dict:
        return saved[rank] if rank < len(saved) else {"derive_from_step": step}

    def seed_from(self, step: int) -> None:
        g = order.keyed_generator(self.seed, "rank_rng", self.rank, step)
        s = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


class EpochSums:
    """This rank's sums over the epoch so far: loss and correct predictions (on the device, so adding to
    them never waits for it: one small kernel each), samples (a host integer: the loop knows it without
    asking), and the gradient noise estimates (:mod:`launcher.train.noise`: the sums of each measured
    step's |G|^2 and tr(Sigma) estimates on the device, the count of those steps on the host).
    ``has_accuracy`` turns False when the outputs are not class logits.

    The device sums live in one float64 vector laid out as :data:`FIELDS` (``loss``, ``correct`` and
    ``noise`` are views of it; the host counts are written into their places when it is read), so
    reading them is one copy. The sums since the last per-step log point (the *window*, which may span
    an epoch's end) are the current sums plus ``offset``: a log point sets it to minus the current sums,
    an epoch's end adds the epoch's sums to it before they are zeroed. All on the device, read only at
    log points.

    A measured step's gradient norms wait in ``pending`` (with their coefficients) until the sums are
    read or :data:`FOLD_EVERY` steps wait: then one product adds all their estimates. Where that happens
    depends only on the steps taken, and a checkpoint holds what waits, so a resumed run adds in the
    same groups, bit for bit."""
    FIELDS = ("loss", "correct", "samples", "grad_sq", "trace_cov", "noise_steps")   # as_tensor's layout
    SAMPLES, NOISE_STEPS = FIELDS.index("samples"), FIELDS.index("noise_steps")
    FOLD_EVERY = 64        # measured steps whose norms may wait: bounds what they hold (2 per parameter each)

    def __init__(self, device: torch.device):
        self.device = device
        self.values = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.loss, self.correct, self.noise = self.values[0], self.values[1], self.values[3:5]
        self.offset = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.samples, self.noise_steps, self.has_accuracy = 0, 0, True
        self._norms: list[torch.Tensor] = []        # pending: the waiting steps' norms, 0-d, in order
        self._columns: list[torch.Tensor] = []      # pending: each waiting step's coefficients, 2 x its norms

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor | None, samples: int) -> None:
        self.loss += loss_sum.detach()
        if correct is None:
            self.has_accuracy = False
        else:
            self.correct += correct
        self.samples += samples

    def add_noise(self, matrix: torch.Tensor, norms: tuple) -> None:
        """One measured step: its (|G|^2, tr(Sigma)) estimates are matrix @ norms^2 (:func:`estimates`),
        added with the other waiting steps' (no kernel here)."""
        self._norms.extend(norms)
        self._columns.append(matrix)
        self.noise_steps += 1
        if len(self._columns) == self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """The waiting steps' estimates into ``noise``: one product over all their norms."""
        if self._columns:
            self.noise += estimates(self._columns, torch.stack(self._norms))
            self._norms, self._columns = [], []

    def zero(self) -> None:
        """The epoch ended: its sums restart at zero; the window keeps what was not logged yet."""
        self.offset += self._with_counts()
        self.values.zero_()
        self.samples = self.noise_steps = 0

    def take_window(self) -> torch.Tensor:
        """:data:`FIELDS` since the last log point, on the device; the next window starts here."""
        current = self._with_counts()
        window = current + self.offset
        torch.neg(current, out=self.offset)
        return window

    def as_tensor(self) -> torch.Tensor:
        """:data:`FIELDS` as one float64 tensor on the device (a copy), ready to all-reduce."""
        return self._with_counts().clone()

    def _with_counts(self) -> torch.Tensor:
        """``values`` with the waiting estimates added and the host counts in their places (fills:
        nothing waits for the device)."""
        self._fold()
        self.values[self.SAMPLES] = self.samples
        self.values[self.NOISE_STEPS] = self.noise_steps
        return self.values

    def snapshot(self) -> tuple:
        """The sums as they are, on the device (no copy to the host): for a step that may be redone
        (which adds no noise estimate before it is agreed, so what waits is kept by its length)."""
        return (self.values.clone(), self.offset.clone(), self.samples, self.noise_steps, self.has_accuracy,
                len(self._norms), len(self._columns))

    def restore(self, snap: tuple) -> None:
        values, offset, self.samples, self.noise_steps, self.has_accuracy, norms, columns = snap
        self.values.copy_(values)
        self.offset.copy_(offset)
        del self._norms[norms:], self._columns[columns:]

    def state_dict(self) -> dict:
        """Copies (on the CPU ``.cpu()`` is the tensor itself, which the next read adds to)."""
        return {"values": torch.stack([self.loss, self.correct]).cpu(), "samples": self.samples,
                "noise": self.noise.cpu().clone(), "noise_steps": self.noise_steps,
                "offset": self.offset.cpu().clone(), "has_accuracy": self.has_accuracy,
                "noise_waiting": self._pending()}

    def _pending(self) -> dict:
        """What waits, as it is (not added: the uninterrupted run adds it later, in its own group)."""
        if not self._columns:
            return {}
        return {"norms": torch.stack(self._norms).cpu(), "columns": [c.cpu() for c in self._columns]}

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints from before the noise estimates (an offset of 3) read as zero for them."""
        self.loss.copy_(state["values"][0])
        self.correct.copy_(state["values"][1])
        self.samples = int(state["samples"])
        self.noise.copy_(state.get("noise", torch.zeros(2, dtype=torch.float64)))
        self.noise_steps = int(state.get("noise_steps", 0))
        offset = state.get("offset", torch.zeros(3, dtype=torch.float64))
        self.offset.zero_()
        self.offset[:len(offset)].copy_(offset)
        self.has_accuracy = bool(state.get("has_accuracy", True))
        waiting = state.get("noise_waiting", {})
        self._columns = [c.to(self.device) for c in waiting.get("columns", [])]
        self._norms = list(waiting["norms"].to(self.device).unbind()) if self._columns else []

    def reshard(self, saved: list[dict], rank: int, world: int, step: int) -> dict:
        """Another world size: rank 0 carries the epoch's (and the window's) totals, the others start at 0."""
        width, accuracy = len(self.FIELDS), all(s.get("has_accuracy", True) for s in saved)
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        padded = lambda t: torch.cat([t, zeros(width - len(t))])  # noqa: E731
        if rank == 0:
            return {"values": sum(s["values"] for s in saved), "samples": sum(int(s["samples"]) for s in saved),
                    "noise": sum(s.get("noise", zeros(2)) + waiting_estimates(s) for s in saved),
                    "noise_steps": sum(int(s.get("noise_steps", 0)) for s in saved),
                    "offset": sum(padded(s.get("offset", zeros(3))) for s in saved), "has_accuracy": accuracy}
        return {"values": zeros(2), "samples": 0, "noise": zeros(2), "noise_steps": 0, "offset": zeros(width),
                "has_accuracy": accuracy}


def estimates(columns: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """The (|G|^2, tr(Sigma)) estimates of some steps, added up: (their columns side by side) @ norms^2,
    squared in float64 (where a float32's square is exact)."""
    norms = norms.to(torch.float64)
    return torch.cat(columns, dim=1) @ (norms * norms)


def waiting_estimates(saved: dict) -> torch.Tensor:
    """A saved :class:`EpochSums`' waiting steps' estimates, added up (zeros if none)."""
    waiting = saved.get("noise_waiting", {})
    return estimates(waiting["columns"], waiting["norms"]) if waiting.get("columns") else torch.zeros(2, dtype=torch.float64)
