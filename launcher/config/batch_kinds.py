"""The kinds of ``schedule.batch``, each with everything that is its own: the keys it reads, its checks, the qhm
schedule the plan follows, whether its batches are decided while the run trains, and its words in a figure's
legend. Adding a kind is one :class:`BatchKind` here (its values, if new, in :mod:`qhm.schedules`).

``constant``, ``exponential`` and ``steps`` are qhm's schedules. ``warmup_from`` becomes ``steps`` when the
recipe is validated (the critical batch size its branches measured, written into the resolved recipe).
``adaptive`` grows at an interval's end when the measured noise scale says so: until a decision, the plan is
its initial batch throughout (:mod:`launcher.train.adaptive` decides; its decisions are a checkpoint part).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import qhm

from launcher.errors import RecipeError, schedule_error

if TYPE_CHECKING:
    from launcher.config.schema import Batch, Recipe


def _no_check(r: Recipe) -> None:
    pass


@dataclass(frozen=True)
class BatchKind:
    """``keys``: the schedule.batch keys it reads (any other set is refused: it would be ignored); ``size_key``:
    the key holding its first batch (None: its points do); ``check(recipe)``: its rules, one-line RecipeErrors;
    ``spec(recipe)``: the qhm.BatchSchedule a plan follows; ``describe(identity, unit)``: its words, from a
    run's dotted keys."""
    name: str
    keys: tuple[str, ...]
    size_key: str | None
    spec: Callable[[Recipe], qhm.BatchSchedule]
    describe: Callable[[dict, str], str]
    check: Callable[[Recipe], None] = _no_check
    decided_during_run: bool = False


# ---- constant and exponential: a size, and a growth every interval

def _grown(r: Recipe) -> qhm.BatchSchedule:
    b = r.schedule.batch
    size = getattr(b, KINDS[b.kind].size_key or "size")
    assert size is not None, "validated: the kind's size key is set"
    return qhm.BatchSchedule(b.kind, size, growth=b.growth, interval=r.interval())


def _describe_constant(identity: dict, unit: str) -> str:
    return f"constant batch {identity.get('schedule.batch.size')}"


def _every(identity: dict, unit: str) -> str:
    interval = identity.get("schedule.interval", 1)
    return f"every {unit}" if interval == 1 else f"every {interval} {unit}s"


def _describe_exponential(identity: dict, unit: str) -> str:
    initial, growth = identity.get("schedule.batch.initial", 1), identity.get("schedule.batch.growth", 2)
    if unit != "epoch":                  # the final batch depends on the run's length in that unit
        return f"exponential from {initial}, ×{growth:g} {_every(identity, unit)}"
    final = int(qhm.BatchSchedule("exponential", initial, growth=growth,
                                  interval=identity.get("schedule.interval", 1)).values(identity.get("epochs", 1) - 1))
    return f"increasing {initial}→{final}, ×{growth:g} {_every(identity, unit)}"


# ---- steps: a piecewise batch in the schedule's unit

def _check_points(r: Recipe) -> None:
    """[[position, batch], ...], the first at 0, positions in schedule.unit strictly increasing, batches
    integers >= 1."""
    from launcher.config import units
    points, unit = r.schedule.batch.points, r.schedule.unit
    if not points:
        raise RecipeError("schedule.batch.points: missing; allowed: [[0, b_0], [position, batch], ...] (required "
                          "for kind steps)")
    named = set()
    for i, point in enumerate(points):
        path = f"schedule.batch.points[{i}]"
        if not (isinstance(point, list) and len(point) == 2):
            raise RecipeError(f"{path}: {point!r} is not valid; allowed: a pair [position, batch]")
        named.add(units.parse(path, point[0], None, minimum=0)[0])
        if not (isinstance(point[1], int) and not isinstance(point[1], bool) and point[1] >= 1):
            raise RecipeError(f"{path}: {point!r} is not valid; allowed: [position, batch] with an integer batch >= 1 "
                              "(any integer splits over any world size)")
    named.discard(None)
    if len(named) > 1:
        raise RecipeError(f"schedule.batch.points: {points!r} mixes units ({', '.join(sorted(str(n) for n in named))}); "
                          f"allowed: positions in one unit, schedule.unit ({unit})")
    try:
        r.batch_spec()
    except qhm.ScheduleError as exc:
        raise schedule_error(exc) from None


def _piecewise(r: Recipe) -> qhm.BatchSchedule:
    from launcher.config import units
    s = r.schedule
    points = tuple((units.in_unit(f"schedule.batch.points[{i}]", p[0], s.unit, minimum=0), p[1])
                   for i, p in enumerate(s.batch.points))
    return qhm.BatchSchedule("steps", points=points)


def _describe_steps(identity: dict, unit: str) -> str:
    """"batch 8→16→64 at 60K, 150K tokens"."""
    points = identity.get("schedule.batch.points") or []
    sizes = "→".join(str(size) for _, size in points)
    if len(points) < 2:
        return f"constant batch {sizes}"
    return f"batch {sizes} at {', '.join(str(at) for at, _ in points[1:])} {unit}s"


# ---- warmup_from: the critical batch size a pilot's branches measured, as kind steps

def _resolve_warmup(r: Recipe) -> None:
    """The CBS its branches measured becomes a piecewise schedule (kind steps), written into the resolved
    recipe, so the run is exact and resumable whatever happens to the branches later."""
    from launcher.run import branches
    b = r.schedule.batch
    if not b.branches:
        raise RecipeError("schedule.batch.branches: missing; allowed: the folder of a pilot's branches "
                          "(qhm-launch branch writes <output>/<parent>.branches; required for kind warmup_from)")
    if not branches.folders([b.branches]):
        raise RecipeError(f"schedule.batch.branches: {b.branches!r} holds no branch folders; allowed: the folder "
                          "qhm-launch branch wrote (<output>/<parent>.branches)")
    unit, points = branches.warmup_points([b.branches], b.tolerance)
    if r.schedule.unit != unit:
        raise RecipeError(f"schedule.unit: {r.schedule.unit!r} is not valid with schedule.batch.kind warmup_from: its "
                          f"branches count {unit}s; allowed: schedule.unit {unit}")
    b.kind, b.points = "steps", points
    _check_points(r)


def _unresolved(r: Recipe) -> qhm.BatchSchedule:
    raise AssertionError("warmup_from is kind steps once validated")


# ---- adaptive: grows when the measured noise scale says so

def _check_adaptive(r: Recipe) -> None:
    b, s = r.schedule.batch, r.schedule
    if isinstance(b.initial, bool) or not isinstance(b.initial, int):
        return                         # not a batch: qhm's check of the schedule says so, naming the key
    if b.growth * b.initial > qhm.schedules.MAX_BATCH:
        raise RecipeError(f"schedule.batch.growth: {b.growth!r} is not valid; allowed: small enough that "
                          f"{b.initial} x growth stays below 2^62")
    if b.max is not None and (isinstance(b.max, bool) or not isinstance(b.max, int) or b.max < b.initial):
        raise RecipeError(f"schedule.batch.max: {b.max!r} is not valid; allowed: an integer >= schedule.batch.initial "
                          f"({b.initial}), or null for the training set's size")
    if not b.factor > 0:
        raise RecipeError(f"schedule.batch.factor: {b.factor!r} is not valid; allowed: > 0")
    unit = s.unit
    if unit != "epoch" and s.lr.kind in ("cosine", "polynomial", "wsd") and r.duration()[0] != unit:
        raise RecipeError(f"schedule.lr.kind: {s.lr.kind!r} is not valid with an adaptive batch in {unit}s and a "
                          f"duration in {r.duration()[0]}s (the run's length in {unit}s follows decisions made while "
                          f"it trains); allowed: train.{unit}s, or constant, sqrt_decay or decay")


def _before_any_decision(r: Recipe) -> qhm.BatchSchedule:
    b = r.schedule.batch
    assert isinstance(b.initial, int), "validated"
    return qhm.BatchSchedule("constant", b.initial, interval=r.interval())


def _describe_adaptive(identity: dict, unit: str) -> str:
    initial, growth = identity.get("schedule.batch.initial"), identity.get("schedule.batch.growth", 2)
    if unit != "epoch":
        return f"adaptive from {initial}, ×{growth:g} {_every(identity, unit)}"
    return (f"adaptive from {initial}, ×{growth:g} when noise scale ≥ {identity.get('schedule.batch.factor', 1):g} × "
            f"batch, {_every(identity, unit)}")


KINDS = {kind.name: kind for kind in (
    BatchKind("constant", ("size",), "size", _grown, _describe_constant),
    BatchKind("exponential", ("initial", "growth"), "initial", _grown, _describe_exponential),
    BatchKind("steps", ("points", "branches", "tolerance"), None, _piecewise, _describe_steps, _check_points),
    BatchKind("adaptive", ("initial", "growth", "max", "factor"), "initial", _before_any_decision, _describe_adaptive,
              _check_adaptive, decided_during_run=True),
    # checked (resolved into kind steps) before the size check: its size is in the points it reads
    BatchKind("warmup_from", ("branches", "tolerance"), None, _unresolved, _describe_steps, _resolve_warmup),
)}
NAMES = tuple(KINDS)


def in_samples(path: str, value, tokens_per_sample: int | None):
    """A batch as samples: an integer, or text naming samples or tokens ("512K tokens" is 512K / seq_len
    samples, refused where it does not divide); anything else is left for the kind's checks to refuse."""
    from launcher.config import units
    if not isinstance(value, str):
        return value
    unit, count = units.parse(path, value, "sample")
    if unit == "token":
        if not tokens_per_sample:
            raise RecipeError(f"{path}: {value!r} is not valid: the samples' tokens are not known; allowed: a batch in "
                              "samples, or data.tokens_per_sample (data.dataset tokens sets it)")
        if count % tokens_per_sample:
            low = count // tokens_per_sample * tokens_per_sample
            raise RecipeError(f"{path}: {value!r} is not valid: {count:,} tokens is no whole number of "
                              f"{tokens_per_sample}-token samples; allowed: a multiple of {tokens_per_sample} "
                              f"(e.g. {low or tokens_per_sample:,} or {low + tokens_per_sample:,} tokens)")
        return count // tokens_per_sample
    if unit != "sample":
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: a batch in samples or tokens (256, '2K samples', "
                          "'512K tokens')")
    return count


def check(r: Recipe) -> None:
    """schedule.batch: its kind, the keys that kind reads (no other), its first batch, its own rules. Batches
    given in tokens become samples here (the resolved recipe holds samples)."""
    from launcher.errors import one_of
    b = r.schedule.batch
    tokens = r.data.tokens_per_sample
    for key in ("size", "initial", "max"):
        setattr(b, key, in_samples(f"schedule.batch.{key}", getattr(b, key), tokens))
    if isinstance(b.points, list):
        b.points = [[p[0], in_samples(f"schedule.batch.points[{i}]", p[1], tokens)]
                    if isinstance(p, list) and len(p) == 2 else p for i, p in enumerate(b.points)]
    one_of("schedule.batch.kind", b.kind, NAMES)
    kind = KINDS[b.kind]
    if kind.size_key is not None and getattr(b, kind.size_key) is None:
        raise RecipeError(f"schedule.batch.{kind.size_key}: missing; allowed: an integer >= 1 "
                          f"(required for kind {b.kind})")
    check_keys(b)
    kind.check(r)


def check_keys(b: Batch) -> None:
    """A schedule.batch key its kind does not read, set to anything but its default, is refused (it was
    silently ignored: kind constant with points)."""
    defaults = type(b)()
    for key in ("size", "initial", "growth", "max", "factor", "points", "branches", "tolerance"):
        if key not in KINDS[b.kind].keys and getattr(b, key) != getattr(defaults, key):
            owners = [k.name for k in KINDS.values() if key in k.keys and (k.name != "steps" or key == "points")]
            default = getattr(defaults, key)
            allowed = "null" if default is None else repr(default)
            raise RecipeError(f"schedule.batch.{key}: {getattr(b, key)!r} is not valid with kind {b.kind}; allowed: "
                              f"{allowed} (it would be ignored; {key} is read by kind {' and '.join(owners)})")


def describe(identity: dict) -> str:
    """The batch schedule in words, from a run's dotted keys: "constant batch 64", "increasing 8→64, ×2 every
    3 epochs"."""
    kind = KINDS.get(identity.get("schedule.batch.kind", "constant"), KINDS["constant"])
    return kind.describe(identity, identity.get("schedule.unit") or "epoch")
