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
from launcher.errors import RunFailed


@dataclass
class TrainState:
    """Where training stands, and what it has found so far; saved in every checkpoint."""
    epoch: int = 0                      # the epoch in progress
    step: int = 0                       # optimizer steps done in that epoch
    global_step: int = 0
    samples: int = 0                    # SFO: per-sample gradients computed so far
    tokens: int = 0                     # tokens trained on so far (counted where a sample's tokens are known)
    min_grad_norm: float = float("inf")
    best_test_acc: float = 0.0
    best_val_acc: float = 0.0
    wall_time: float = 0.0              # seconds trained so far, over all restarts
    wandb_id: str = ""                  # the W&B run this trajectory belongs to

    def advance(self, samples: int, tokens_per_sample: int) -> None:
        """One optimizer step of ``samples`` done."""
        self.step, self.global_step = self.step + 1, self.global_step + 1
        self.samples += samples
        self.tokens += samples * tokens_per_sample

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
    """This rank's sums over the epoch so far: loss and correct predictions (on the device), samples (a
    host integer: the loop knows it without asking), the gradient noise estimates
    (:mod:`launcher.train.noise`: the sums of each measured step's |G|^2 and tr(Sigma) estimates on the
    device, the count of those steps on the host), and ``finite_steps``: the epoch's steps after which
    the running loss sum was still finite (a non-finite loss stays in the sum, so the count stops there).
    ``has_accuracy`` turns False when the outputs are not class logits.

    The device sums live in one float64 vector laid out as :data:`FIELDS` (``loss``, ``correct`` and
    ``noise`` are views of it; the host counts are written into their places when it is read), so
    reading them is one copy. The sums since the last per-step log point (the *window*, which may span
    an epoch's end) are the current sums plus ``offset``: a log point sets it to minus the current sums,
    an epoch's end adds the epoch's sums to it before they are zeroed. All on the device, read only at
    log points.

    A step issues no kernel for its sums (on a small batch each kernel is host time the bare loop does
    not spend): its micro-batches' loss sums, predicted classes and targets, and a measured step's
    gradient norms (with their coefficients) wait in lists until the sums are read or
    :data:`FOLD_EVERY` steps wait. Then a few kernels add them all: the losses by one running sum in
    float64 (a cumulative sum, which on the CPU adds in order, as one addition per micro-batch would),
    whose values at the steps' ends give the finite count; the correct predictions by one comparison;
    the estimates by one product. Where that happens depends only on the steps taken, and a checkpoint
    holds what waits, so a resumed run adds in the same groups, bit for bit."""
    FIELDS = ("loss", "correct", "samples", "grad_sq", "trace_cov", "noise_steps", "tokens")   # as_tensor's layout
    SAMPLES, NOISE_STEPS, TOKENS = FIELDS.index("samples"), FIELDS.index("noise_steps"), FIELDS.index("tokens")
    FOLD_EVERY = 64        # steps whose sums may wait: bounds what they hold (2 norms per parameter each)

    def __init__(self, device: torch.device, count_tokens: bool = False):
        """``count_tokens``: a per-token loss, whose tokens are the field ``tokens``; without it the vector
        ends before that field (its length is what an all-reduce splits over ranks: on 3 gloo ranks another
        length sums in another order, so the paper's runs keep theirs)."""
        self.device = device
        self.width = len(self.FIELDS) if count_tokens else len(self.FIELDS) - 1
        self.values = torch.zeros(self.width, dtype=torch.float64, device=device)
        self.loss, self.correct, self.noise = self.values[0], self.values[1], self.values[3:5]
        self.offset = torch.zeros(self.width, dtype=torch.float64, device=device)
        # float64: it rides in a log point's window, whose sum over ranks is world x step while all is well
        self.finite_steps = torch.zeros(1, dtype=torch.float64, device=device)
        self.samples, self.noise_steps, self.has_accuracy = 0, 0, True
        # the tokens a per-token loss averages over: a host count (every position counts), or where a mask
        # may vary it, the steps' counts on the device (None until the first)
        self.tokens, self.token_counts = 0, None
        self._token_counts: list[torch.Tensor] = []   # waiting: each step's counted tokens, 0-d
        self._losses: list[torch.Tensor] = []       # waiting: each micro-batch's loss sum, 0-d, in order
        self._predicted: list[torch.Tensor] = []    # waiting: each micro-batch's predicted classes
        self._targets: list[torch.Tensor] = []      # waiting: and its targets
        self._ends: list[int] = []                  # waiting: len(_losses) at each waiting step's end
        self._norms: list[torch.Tensor] = []        # waiting: the measured steps' norms, 0-d, in order
        self._columns: list[torch.Tensor] = []      # waiting: each measured step's coefficients, 2 x its norms

    def start_epoch(self, step: int) -> None:
        """Epoch entered at ``step`` (a checkpoint holds only finite steps; a waiting one counts when added)."""
        self.finite_steps.fill_(step - len(self._ends))

    def add(self, loss_sum: torch.Tensor, predicted: torch.Tensor | None, target: torch.Tensor,
            samples: int, tokens=0) -> None:
        """One micro-batch's summed loss and predicted classes (None: outputs that are not class
        logits, so no accuracy) and the tokens its loss sums over (an int, or a 0-d count on the device):
        they wait (no kernel)."""
        self._losses.append(loss_sum.detach())
        if isinstance(tokens, torch.Tensor):
            self._token_counts.append(tokens)
        else:
            self.tokens += tokens
        if predicted is None:
            self.has_accuracy = False
        else:
            self._predicted.append(predicted)
            self._targets.append(target)
        self.samples += samples

    def step_done(self) -> None:
        """A step's micro-batches are all added (and its norms, if measured)."""
        self._ends.append(len(self._losses))
        if len(self._ends) == self.FOLD_EVERY:
            self._fold()

    def finite(self) -> torch.Tensor:
        """``finite_steps`` with the waiting steps counted: a read, what waits stays waiting (a save
        checks it, and a save where an uninterrupted run has none must not add in another group)."""
        if not self._ends:
            return self.finite_steps
        return self.finite_steps + self._finite_waiting(self._running())

    def raise_unless_finite(self, comm, state, last_saved: int | None) -> None:
        """Raise, naming the first step, if some rank's loss was not finite in this epoch (an all-reduce:
        every rank calls it at the same step)."""
        finite = int(comm.all_reduce_min(self.finite().clone()))
        if finite < state.step:
            first = state.global_step - state.step + finite + 1
            since = (f"nothing was saved after global step {last_saved}" if last_saved is not None else
                     "no checkpoint had been saved yet")
            raise RunFailed(f"the training loss is not finite at global step {first}; stopped, {since}; lower "
                            "schedule.lr.max (or check the data) and rerun"
                            + (" to resume from there" if last_saved is not None else ""))

    def add_noise(self, matrix: torch.Tensor, norms: tuple) -> None:
        """One measured step: its (|G|^2, tr(Sigma)) estimates are matrix @ norms^2 (:func:`estimates`),
        added with the other waiting steps' (no kernel here)."""
        self._norms.extend(norms)
        self._columns.append(matrix)
        self.noise_steps += 1

    def _fold(self) -> None:
        """What waits into the sums."""
        if self._losses:
            running = self._running()
            self.loss.copy_(running[-1])
            if self._ends:
                self.finite_steps += self._finite_waiting(running)
        if self._predicted:
            self.correct += self._waiting_correct()
        if self._columns:
            self.noise += estimates(self._columns, torch.stack(self._norms))
        if self._token_counts:
            counted = torch.stack(self._token_counts).to(torch.float64).sum()
            self.token_counts = counted if self.token_counts is None else self.token_counts + counted
        for waiting in self._waiting():
            waiting.clear()

    def _running(self) -> torch.Tensor:
        """The running loss sum before the first waiting micro-batch and after each, in float64."""
        return torch.cat([self.loss.view(1), torch.stack(self._losses).to(torch.float64)]).cumsum(0)

    def _finite_waiting(self, running: torch.Tensor) -> torch.Tensor:
        """The waiting steps after which the running sum was finite. The steps' ends go to the device
        without waiting for it (non_blocking; on the CPU no copy at all)."""
        ends = torch.tensor(self._ends).to(self.device, non_blocking=True)
        return torch.isfinite(running[ends]).sum()

    def _waiting_correct(self) -> torch.Tensor | int:
        """The waiting correct predictions, counted (0-d, on the device; 0 if none wait)."""
        if not self._predicted:
            return 0
        return torch.eq(torch.cat(self._predicted), torch.cat(self._targets)).sum()

    def zero(self) -> None:
        """The epoch ended: its sums restart at zero; the window keeps what was not logged yet."""
        self.offset += self._with_counts()
        self.values.zero_()
        self.samples = self.noise_steps = self.tokens = 0
        self.token_counts = None

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
        if self.width <= self.TOKENS:
            pass
        elif self.token_counts is None:
            self.values[self.TOKENS] = self.tokens
        else:
            self.values[self.TOKENS].copy_(self.token_counts + self.tokens)
        return self.values

    def snapshot(self) -> tuple:
        """The sums as they are, on the device (no copy to the host): for a step that may be redone
        (taken at its start; nothing is added up before it ends, so what waits is kept by its length and
        a redo drops what the abandoned try appended)."""
        return (self.values.clone(), self.offset.clone(), self.samples, self.noise_steps, self.has_accuracy,
                tuple(map(len, self._waiting())), self.tokens)

    def restore(self, snap: tuple) -> None:
        values, offset, self.samples, self.noise_steps, self.has_accuracy, lengths, self.tokens = snap
        self.values.copy_(values)
        self.offset.copy_(offset)
        for waiting, length in zip(self._waiting(), lengths):
            del waiting[length:]

    def _waiting(self) -> tuple[list, ...]:
        return self._losses, self._predicted, self._targets, self._ends, self._norms, self._columns, self._token_counts

    def state_dict(self) -> dict:
        """Copies (on the CPU ``.cpu()`` is the tensor itself, which the next read adds to). The waiting
        correct predictions are saved counted into ``values``: integers, so adding them now or at the
        next fold gives the same bits."""
        return {"values": torch.stack([self.loss, self.correct + self._waiting_correct()]).cpu(),
                "samples": self.samples,
                "noise": self.noise.cpu().clone(), "noise_steps": self.noise_steps,
                "offset": self.offset.cpu().clone(), "has_accuracy": self.has_accuracy,
                "noise_waiting": self._noise_pending(), "loss_waiting": self._loss_pending(),
                "tokens": self.tokens + self._tokens_counted()}

    def _tokens_counted(self) -> float:
        """The device-counted tokens so far (waiting ones added: integers, exact in float64)."""
        counted = float(self.token_counts) if self.token_counts is not None else 0.0
        return counted + sum(float(c) for c in self._token_counts)

    def _noise_pending(self) -> dict:
        """What waits, as it is (not added: the uninterrupted run adds it later, in its own group)."""
        if not self._columns:
            return {}
        return {"norms": torch.stack(self._norms).cpu(), "columns": [c.cpu() for c in self._columns]}

    def _loss_pending(self) -> dict:
        """The waiting losses as they are, and where their steps end."""
        if not self._losses:
            return {}
        return {"losses": torch.stack(self._losses).cpu(), "ends": list(self._ends)}

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints from before the noise estimates (an offset of 3) read as zero for them."""
        self.loss.copy_(state["values"][0])
        self.correct.copy_(state["values"][1])
        self.samples = int(state["samples"])
        self.noise.copy_(state.get("noise", torch.zeros(2, dtype=torch.float64)))
        self.noise_steps = int(state.get("noise_steps", 0))
        offset = state.get("offset", torch.zeros(3, dtype=torch.float64))[:self.width]
        self.offset.zero_()
        self.offset[:len(offset)].copy_(offset)
        self.has_accuracy = bool(state.get("has_accuracy", True))
        waiting = state.get("noise_waiting", {})
        self._columns = [c.to(self.device) for c in waiting.get("columns", [])]
        self._norms = list(waiting["norms"].to(self.device).unbind()) if self._columns else []
        waiting = state.get("loss_waiting", {})
        self._losses = list(waiting["losses"].to(self.device).unbind()) if waiting else []
        self._ends = list(waiting["ends"]) if waiting else []
        # counted tokens are integers: saved as one number, they resume as a host count, exactly
        self.tokens, self.token_counts, self._token_counts = int(state.get("tokens", 0)), None, []

    def reshard(self, saved: list[dict], rank: int, world: int, step: int) -> dict:
        """Another world size: rank 0 carries the epoch's (and the window's) totals, the others start at 0."""
        width, accuracy = self.width, all(s.get("has_accuracy", True) for s in saved)
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        padded = lambda t: torch.cat([t, zeros(width - len(t))])[:width]  # noqa: E731
        if rank == 0:
            return {"values": sum(s["values"] + waiting_sums(s) for s in saved),
                    "samples": sum(int(s["samples"]) for s in saved),
                    "noise": sum(s.get("noise", zeros(2)) + waiting_estimates(s) for s in saved),
                    "noise_steps": sum(int(s.get("noise_steps", 0)) for s in saved),
                    "offset": sum(padded(s.get("offset", zeros(3))) for s in saved), "has_accuracy": accuracy,
                    "tokens": sum(s.get("tokens", 0) for s in saved)}
        return {"values": zeros(2), "samples": 0, "noise": zeros(2), "noise_steps": 0, "offset": zeros(width),
                "has_accuracy": accuracy, "tokens": 0}


def estimates(columns: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """The (|G|^2, tr(Sigma)) estimates of some steps, added up: (their columns side by side) @ norms^2,
    squared in float64 (where a float32's square is exact)."""
    norms = norms.to(torch.float64)
    return torch.cat(columns, dim=1) @ (norms * norms)


def waiting_sums(saved: dict) -> torch.Tensor:
    """A saved :class:`EpochSums`' waiting losses, added up, as (loss, correct) with correct 0 (the
    waiting correct predictions are saved counted into its values)."""
    waiting = saved.get("loss_waiting", {})
    loss = waiting["losses"].to(torch.float64).sum() if waiting else torch.zeros((), dtype=torch.float64)
    return torch.stack([loss, torch.zeros((), dtype=torch.float64)])


def waiting_estimates(saved: dict) -> torch.Tensor:
    """A saved :class:`EpochSums`' waiting steps' estimates, added up (zeros if none)."""
    waiting = saved.get("noise_waiting", {})
    return estimates(waiting["columns"], waiting["norms"]) if waiting.get("columns") else torch.zeros(2, dtype=torch.float64)
