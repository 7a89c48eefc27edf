"""What a scaling study is run for: when each run first reached a target (``report --target``), the
critical batch size fitted to steps-to-target over batch sizes, and throughput over world sizes
(``qhm-launch scaling``).

The fit is the trade-off of McCandlish et al. (2018) and Shallue et al. (2019),

    S(B) = S_min (1 + B_crit / B)       equivalently  E(B) = E_min (1 + B / B_crit),  E = S B,

linear in (S_min, S_min B_crit) over 1/B, fitted in relative error (exact when the points lie on such a
curve). E_min = S_min B_crit is the fewest samples (SFO) any batch can need. The trade-off assumes the
learning rate tuned per batch: runs of one study differ only in batch, seed and LR, each batch takes its
best LR, and the seeds' scatter gives an interval.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass

import numpy as np

from launcher.cli import analysis
from launcher.errors import UserError

TARGET_FORM = ("METRIC>=VALUE or METRIC<=VALUE, METRIC a field of the runs' metrics.jsonl or steps.jsonl rows "
               "(e.g. test_acc>=0.9, train_loss<=0.5)")


@dataclass(frozen=True)
class Target:
    metric: str
    op: str
    value: float

    def reached(self, v) -> bool:
        return v is not None and (v >= self.value if self.op == ">=" else v <= self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_target(text: str) -> Target:
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*(\S+)\s*", text or "")
    value = _number(m.group(3)) if m else None
    if value is None:
        raise UserError(f"--target: {text!r} is not valid; allowed: {TARGET_FORM}")
    return Target(m.group(1), m.group(2), value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


AT = {"steps_to_target": "step", "sfo_to_target": "samples", "tokens_to_target": "tokens",
      "seconds_to_target": "wall_time"}     # what a crossing reports, from which field of the rows


def crossing(run: dict, target: Target) -> dict:
    """Where ``run`` first reached ``target``: from its step rows if they carry the metric (finer), else its
    epoch rows with the evaluations inside epochs (eval.every, eval.every_steps). Between the last row
    that had not reached it and the first that had, the crossing is interpolated linearly in the metric
    (``interpolated``: True), so it is not rounded up to the next evaluation; at the first row, or where
    the two rows are consecutive steps (the first step that reached it is known exactly), it is that
    row's. Nulls when never reached; ``carried`` says whether any row had the metric at all."""
    rows = [r for r in run["step_rows"] if r.get(target.metric) is not None] or \
        [r for r in run["rows"] + run["mid_epoch_rows"] if r.get(target.metric) is not None]
    rows = sorted((r for r in rows if r.get("step") is not None), key=lambda r: r["step"])
    hit = next((i for i, r in enumerate(rows) if target.reached(r[target.metric])), None)
    out = {"run": str(run["dir"]), **{key: None for key in AT}, "interpolated": False, "carried": bool(rows)}
    if hit is None:
        return out
    after = rows[hit]
    before = rows[hit - 1] if hit > 0 and rows[hit]["step"] - rows[hit - 1]["step"] > 1 else None
    gap = None if before is None else after[target.metric] - before[target.metric]
    share = (target.value - before[target.metric]) / gap if before is not None and gap else 1.0
    for key, field in AT.items():
        if after.get(field) is None:
            continue
        start = before.get(field) if before is not None else None
        out[key] = after[field] if start is None or share == 1.0 else start + share * (after[field] - start)
    out["interpolated"] = before is not None and share != 1.0
    return out


def _check_carried(target: Target, found: list[dict]) -> None:
    if not any(f["carried"] for f in found):
        raise UserError(f"--target: {target.metric!r} is in none of the runs' rows; allowed: {TARGET_FORM}")


def _spread(values: list) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = f"{statistics.fmean(got):,.6g}"
    if len(got) > 1:
        text += f" ({min(got):,.6g}–{max(got):,.6g})"
    return text + ("" if len(got) == len(values) else f", {len(values) - len(got)} of {len(values)} not reached")


def target_report(run_dirs: list, target_text: str, as_json: bool = False) -> str:
    """Per run, and per group of runs that differ only by seed (mean, min–max): the global step, SFO,
    tokens (where counted) and training seconds at which the target was first reached, interpolated
    between the two evaluations around the crossing (marked ~)."""
    target = parse_target(target_text)
    curves = analysis.group(analysis.load_runs(run_dirs))
    per_curve = [(c, [crossing(run, target) for run in c["runs"]]) for c in curves]
    found_all = [f for _, found in per_curve for f in found]
    _check_carried(target, found_all)
    counts_tokens = any(r.get("tokens") is not None for c in curves for run in c["runs"] for r in run["rows"][-1:])
    keys = [k for k in AT if k != "tokens_to_target" or counts_tokens]     # a column whether reached or not
    if as_json:
        return json.dumps([{k: v for k, v in f.items() if k != "carried"} | {"group": c["label"]}
                           for c, found in per_curve for f in found], indent=1)
    names = {"steps_to_target": "steps", "sfo_to_target": "SFO", "tokens_to_target": "tokens",
             "seconds_to_target": "seconds"}
    head = " | ".join(f"{names[k]} to target" for k in keys)
    lines = [f"target {target}", "", f"| run | {head} |", "|---|" + "---|" * len(keys)]
    def fmt(v, f, key):             # steps, SFO and tokens are counts: whole numbers, even interpolated
        if v is None:
            return "not reached"
        return ("~" if f["interpolated"] else "") + (f"{v:,.4g}" if key == "seconds_to_target" else f"{round(v):,}")
    for _, found in per_curve:
        for f in found:
            lines.append(f"| {f['run']} | " + " | ".join(fmt(f[k], f, k) for k in keys) + " |")
    if any(f["interpolated"] for f in found_all):
        lines += ["", "~: interpolated between the last evaluation before the crossing and the first at or past it"]
    if any(len(found) > 1 for _, found in per_curve):
        lines += ["", f"| group (seeds: mean, min–max) | runs | {head} |", "|---|---|" + "---|" * len(keys)]
        for c, found in per_curve:
            lines.append(f"| {c['label']} | {len(found)} | " + " | ".join(
                _spread([f[k] for f in found]) for k in keys) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The critical batch size

def constant_batch(recipe: dict) -> int | None:
    batch = recipe.get("schedule", {}).get("batch", {})
    return batch.get("size") if batch.get("kind", "constant") == "constant" else None


def fit_tradeoff(batches, steps) -> dict:
    """S = S_min + (S_min B_crit) / B fitted in relative error (least squares of (S_i - S(B_i)) / S_i: the
    small batches, with the most steps, do not outweigh the rest, as they do in plain least squares);
    exact on points that lie on such a curve. B_crit and E_min null, and ``degenerate`` saying why, when
    the points do not fall on one (S_min or S_min B_crit not positive)."""
    x = 1.0 / np.asarray(batches, dtype=float)
    y = np.asarray(steps, dtype=float)
    design = np.stack([np.ones_like(x), x], axis=1) / y[:, None]
    (s_min, slope), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    ok = s_min > 0 and slope > 0
    out = {"s_min": float(s_min), "b_crit": float(slope / s_min) if ok else None, "e_min": float(slope) if ok else None}
    if slope <= 0:
        out["degenerate"] = ("steps do not fall as the batch grows (every batch past B_crit, or an LR not tuned per "
                             "batch): runs at smaller batches, where steps halve as the batch doubles, would fit it")
    elif s_min <= 0:
        out["degenerate"] = ("steps fall as fast as 1/B or faster (every batch below B_crit, perfect scaling): runs "
                             "at larger batches, where steps stop falling, would fit it")
    return out


PROFILE_GRID = 4001          # B_crit values the profile is evaluated at, log-spaced over 6 decades either side


def interval(batches, seeds_steps: list[list[float]], level: float = 0.9) -> dict | None:
    """A ``level`` interval for B_crit, S_min and E_min from every seed's steps: the profile likelihood
    of log S = log S_min + log(1 + B_crit / B) + e, e normal with one variance for all (the seeds' scatter,
    pooled, and any lack of fit with it). For each B_crit (0, a log-spaced grid from a thousandth of the
    smallest batch to a thousand times the largest, and the limit B_crit -> infinity: perfect scaling,
    S = E_min / B) the best S_min is the mean residual; B_crit is inside where the residual sum of squares
    is within RSS_min (1 + F(1, N - 2; level) / (N - 2)), N the runs, the F test of a linear model, so few
    seeds give wide intervals. S_min and E_min: their range over every (B_crit, S_min) inside that region
    (the profile interval of each). B_crit's lower end is 0 where the data cannot tell it from no scaling
    at all; its upper end None (unbounded) where they cannot tell it from perfect scaling. None with one
    seed per batch (no scatter to go on)."""
    from scipy.stats import f as f_dist
    steps = [np.asarray(v, dtype=float) for v in seeds_steps]
    if all(len(v) < 2 for v in steps):
        return None
    y = np.log(np.concatenate(steps))
    batch = np.repeat(np.asarray(batches, dtype=float), [len(v) for v in steps])
    dof = len(y) - 2
    grid = np.geomspace(batch.min() * 1e-3, batch.max() * 1e3, PROFILE_GRID)
    # rows: B_crit = 0, the grid, infinity; the model's shape log(1 + B_crit/B) (at infinity: -log B, and
    # the level it leaves is log E_min rather than log S_min)
    shape = np.vstack([np.zeros_like(batch), np.log1p(grid[:, None] / batch), -np.log(batch)])
    level_hat = (y - shape).mean(1)
    rss = ((y - shape - level_hat[:, None]) ** 2).sum(1)
    threshold = rss.min() * (1 + f_dist.ppf(level, 1, dof) / dof)
    inside = rss <= threshold
    half = np.sqrt(np.maximum(threshold - rss, 0) / len(y))      # the level's range at each B_crit inside
    b_crit = np.concatenate([[0.0], grid, [np.inf]])
    log_b = np.log(np.where((b_crit > 0) & np.isfinite(b_crit), b_crit, 1.0))
    finite = inside & np.isfinite(b_crit)
    log_s = level_hat[finite]                                   # S_min (finite B_crit): the level itself
    log_e = (level_hat + log_b)[finite]                         # E_min = S_min B_crit
    s_min = [float(np.exp((log_s - half[finite]).min())) if finite.any() else 0.0,
             float(np.exp((log_s + half[finite]).max())) if finite.any() else 0.0]
    e_min = [0.0 if inside[0] else float(np.exp((log_e - half[finite]).min())),
             float(np.exp((log_e + half[finite]).max()))]
    if inside[-1]:                         # perfect scaling fits: S_min down to 0, E_min the level's range
        s_min[0] = 0.0
        e_min = [min(e_min[0], float(np.exp(level_hat[-1] - half[-1]))),
                 max(e_min[1], float(np.exp(level_hat[-1] + half[-1])))]
    chosen = b_crit[inside]
    return {"level": level, "b_crit": [float(chosen.min()), None if inside[-1] else float(chosen.max())],
            "s_min": s_min, "e_min": e_min, "runs": len(y), "dof": dof,
            "relative_scatter": float(np.sqrt(rss.min() / dof)) if dof else None,
            "method": "profile likelihood (F test) of log steps"}


def interval_text(iv: dict, unit: str = "", times: int = 1) -> str:
    """B_crit's interval as a person reads it: "a–b", "> a" where it is unbounded above (``times``: in
    another unit, e.g. tokens per sample)."""
    g = lambda v: f"{v * times:,.4g}"  # noqa: E731
    lo, hi = iv["b_crit"]
    return f"> {g(lo)}{unit}" if hi is None else f"{g(lo)}–{g(hi)}{unit}"


def lr_settings(runs: list[dict]) -> tuple[list[str], list[str]]:
    """Each run's learning-rate setting, every ``schedule.lr`` key (runs that differ in any of them are
    different settings, never seeds of one), as (keys for grouping, labels naming the keys that vary:
    the peak LR alone where only it does)."""
    lrs = [run["recipe"].get("schedule", {}).get("lr", {}) for run in runs]
    keys = [json.dumps(lr, sort_keys=True, default=str) for lr in lrs]
    varying = sorted(k for k in set().union(*lrs) if len({json.dumps(lr.get(k), default=str) for lr in lrs}) > 1)
    g = lambda v: f"{v:,.4g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    if set(varying) <= {"max"}:
        return keys, [g(lr.get("max")) for lr in lrs]
    return keys, [", ".join(f"{k} {g(lr.get(k))}" for k in varying) for lr in lrs]


def _points(runs: list[dict], crossings: list[dict]) -> tuple[list[dict], list[str]]:
    """Constant-batch runs by batch size: per batch, the runs at each learning-rate setting (every
    schedule.lr key), and the setting whose seeds reach the target in the fewest steps on average (every
    seed of it must reach it: a seed that misses is shown, and a setting with one is not the winner). The
    runs that never reached it, listed."""
    by_batch: dict[int, dict] = {}
    never = []
    keys, labels = lr_settings(runs)
    label_of = dict(zip(keys, labels))
    peak_of = {key: run["recipe"].get("schedule", {}).get("lr", {}).get("max") for key, run in zip(keys, runs)}
    for run, hit, key in zip(runs, crossings, keys):
        b = constant_batch(run["recipe"])
        if b is None:
            continue
        by_batch.setdefault(b, {}).setdefault(key, []).append(hit)
        if hit["steps_to_target"] is None:
            never.append(str(run["dir"]))
    points = []
    for b, by_lr in sorted(by_batch.items()):
        tried = sorted(by_lr, key=lambda k: (peak_of[k] if isinstance(peak_of[k], (int, float)) else 0, label_of[k]))
        complete = {lr: hits for lr, hits in by_lr.items() if all(h["steps_to_target"] is not None for h in hits)}
        missed = sum(h["steps_to_target"] is None for hits in by_lr.values() for h in hits)
        common = {"batch": b, "lrs_tried": [label_of[k] for k in tried], "missed": missed}
        if not complete:
            points.append({**common, "lr": None, "lr_setting": None,
                           "runs": [h["run"] for hits in by_lr.values() for h in hits], "fitted": False})
            continue
        lr, hits = min(complete.items(), key=lambda item: statistics.fmean(h["steps_to_target"] for h in item[1]))
        points.append({**common, "lr": peak_of[lr], "lr_setting": label_of[lr],
                       "runs": [h["run"] for h in hits], "fitted": True,
                       "seeds_steps": [h["steps_to_target"] for h in hits],
                       "steps": statistics.fmean(h["steps_to_target"] for h in hits),
                       "sfo": statistics.fmean(h["sfo_to_target"] for h in hits),
                       **({"tokens": statistics.fmean(h["tokens_to_target"] for h in hits)}
                          if all(h["tokens_to_target"] is not None for h in hits) else {})})
    return points, never


X_FIELDS = {"samples": "samples", "tokens": "tokens", "steps": "step"}    # scaling --x: the rows' field


def check_x(x: str, runs: list[dict]) -> None:
    """--x: one of X_FIELDS, and tokens only where the runs counted them."""
    if x not in X_FIELDS:
        raise UserError(f"--x: {x!r} is not valid; allowed: {' | '.join(X_FIELDS)}")
    if x == "tokens" and not any(r.get("tokens") is not None for run in runs for r in run["rows"]):
        raise UserError("--x: 'tokens' is not valid for these runs: none counted tokens; allowed: samples or steps "
                        "(or runs with data.tokens_per_sample, or token data)")


IDENTITY_FREE = ("schedule.batch.", "schedule.lr.")   # what a scaling study may vary


def check_one_study(runs: list[dict]) -> None:
    """Runs that differ in anything but the batch, the seed, the learning rate and the resources answer
    more than one question: refused, naming the keys."""
    ids = [{k: v for k, v in analysis._identity(run).items() if not k.startswith(IDENTITY_FREE)} for run in runs]
    differing = sorted(k for k in set().union(*ids) if len({json.dumps(i.get(k), default=str) for i in ids}) > 1)
    if differing:
        raise UserError(f"--target: the runs differ in {', '.join(differing)}; allowed: runs that differ only in the "
                        "batch, the seed and the learning rate (any schedule.lr key) and resources (one scaling "
                        "question per call)")


def throughput(runs: list[dict]) -> list[dict]:
    """Per world size: samples/s per process (each run's steady median, averaged over runs) and the
    scaling efficiency against the smallest world size (per-process rate over its per-process rate)."""
    by_world: dict[int, list] = {}
    for run in runs:
        rate = analysis.steady_throughput(run)
        world = analysis.world_size(run)
        if rate is not None and world:
            by_world.setdefault(int(world), []).append((rate, str(run["dir"])))
    out = []
    for world, rates in sorted(by_world.items()):
        per_gpu = statistics.fmean(r for r, _ in rates) / world
        out.append({"world_size": world, "runs": [d for _, d in rates], "samples_per_s": per_gpu * world,
                    "samples_per_s_per_process": per_gpu})
    for o in out:
        o["efficiency"] = o["samples_per_s_per_process"] / out[0]["samples_per_s_per_process"]
    return out


def scaling(run_dirs: list, target_text: str | None = None, out: str | None = None, as_json: bool = False,
            x: str = "samples") -> str:
    target = parse_target(target_text) if target_text is not None else None
    if out is not None:
        analysis.check_out(out)
    runs = analysis.load_runs(run_dirs)
    check_x(x, runs)
    result: dict = {}
    if target is not None:
        check_one_study(runs)
        crossings = [crossing(run, target) for run in runs]
        _check_carried(target, crossings)
        table, never = _points(runs, crossings)
        points = [p for p in table if p["fitted"]]
        if len(points) < 3:
            raise UserError(f"--target: {target} was reached by constant-batch runs of {len(points)} batch size(s) "
                            f"({', '.join(str(p['batch']) for p in points) or 'none'}); allowed: runs of at least 3 "
                            "batch sizes (schedule.batch.kind constant) that reach it")
        fit = fit_tradeoff([p["batch"] for p in points], [p["steps"] for p in points])
        result = {"target": str(target), **fit, "sfo_best_batch": min(points, key=lambda p: p["sfo"])["batch"],
                  "points": points, "batches": table, "not_reached": never,
                  "interval": interval([p["batch"] for p in points], [p["seeds_steps"] for p in points])}
    if x == "tokens":
        result["tokens_per_sample"] = tokens_per_sample(runs)
    result["throughput"] = throughput(runs)
    if out is not None:
        from launcher.cli import figures
        figures.scaling_figure(runs, result, out, x)
    return json.dumps(result, indent=1) if as_json else _scaling_text(result)


def tokens_text(v: float) -> str:
    """A count of tokens as a person reads it: whole numbers with separators (1,565), 4 digits below 1,000."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.4g}"


def tokens_per_sample(runs: list[dict]) -> int | None:
    """The runs' tokens per sample (--x tokens prints every batch and size in tokens too), from a row that
    counts both."""
    for run in runs:
        for r in run["rows"] + run["step_rows"]:
            if r.get("tokens") and r.get("samples"):
                return r["tokens"] // r["samples"]
    return None


def _scaling_text(result: dict) -> str:
    lines = []
    g = lambda v: "-" if v is None else f"{v:,.4g}"  # noqa: E731
    tps = result.get("tokens_per_sample")
    t = (lambda v: "" if v is None or not tps else f" ({tokens_text(v * tps)} tokens)")  # noqa: E731
    if "points" in result:
        lines += [f"target {result['target']}" + (f"; batches in samples of {tps} tokens" if tps else ""), "",
                  "| batch | LR (best of those tried) | seeds | steps to target | SFO to target | not reaching it |",
                  "|---|---|---|---|---|---|"]
        for p in result["batches"]:
            sep = "; " if any(" " in t for t in p["lrs_tried"]) else ", "       # settings of several keys
            tried = (f"{p['lr_setting'] or '-'} (of {sep.join(p['lrs_tried'])})" if len(p["lrs_tried"]) > 1
                     else p["lr_setting"])
            if p["fitted"]:
                spread = f"{p['steps']:,.1f}" + (f" ({min(p['seeds_steps']):,.1f}–{max(p['seeds_steps']):,.1f})"
                                                 if len(p["seeds_steps"]) > 1 else "")
                lines.append(f"| {p['batch']}{t(p['batch'])} | {tried} | {len(p['seeds_steps'])} | {spread} | "
                             f"{p['sfo']:,.0f}{t(p['sfo'])} | "
                             f"{p['missed'] or '-'} |")
            else:
                lines.append(f"| {p['batch']}{t(p['batch'])} | {tried} | {len(p['runs'])} | "
                             f"not fitted: no LR with every seed reaching it | - | {p['missed']} |")
        lines += ["", f"fit S = S_min (1 + B_crit / B), in relative error: S_min {g(result['s_min'])} steps, "
                      f"B_crit {g(result['b_crit'])}{t(result['b_crit'])}, E_min {g(result['e_min'])} samples"
                      f"{t(result['e_min'])}"
                  + (f" (degenerate: {result['degenerate']})" if result.get("degenerate") else "")]
        iv = result["interval"]
        if iv is not None:
            lines.append(f"{iv['level']:.0%} interval ({iv['method']}, {iv['runs']} runs, scatter "
                         f"{iv['relative_scatter']:.1%} in steps): B_crit {interval_text(iv)}"
                         + (f" ({interval_text(iv, ' tokens', tps)})" if tps else "")
                         + f", S_min {g(iv['s_min'][0])}–{g(iv['s_min'][1])}, E_min {g(iv['e_min'][0])}–"
                           f"{g(iv['e_min'][1])}{' samples' if tps else ''}"
                         + (f" ({tokens_text(iv['e_min'][0] * tps)}–{tokens_text(iv['e_min'][1] * tps)} tokens)"
                            if tps else "")
                         + ("; unbounded above: the runs cannot tell it from perfect scaling (larger batches bound "
                            "it)" if iv["b_crit"][1] is None else "")
                         + ("; down to 0: the runs cannot tell it from no gain with the batch (smaller batches bound "
                            "it)" if iv["b_crit"][0] == 0 else ""))
        elif result["b_crit"] is not None:
            lines.append("no interval: one seed per batch (more seeds give one)")
        lines.append(f"fewest samples among the runs: batch {result['sfo_best_batch']}{t(result['sfo_best_batch'])} "
                     "(the SFO-minimising batch)")
        if result["not_reached"]:
            lines.append(f"never reached the target: {', '.join(result['not_reached'])}")
        lines.append("")
    lines += ["| world size | runs | samples/s | samples/s per process | scaling efficiency |", "|---|---|---|---|---|"]
    lines += [f"| {t['world_size']} | {len(t['runs'])} | {t['samples_per_s']:,.0f} | {t['samples_per_s_per_process']:,.0f} "
              f"| {t['efficiency']:.2f} |" for t in result["throughput"]]
    return "\n".join(lines)
