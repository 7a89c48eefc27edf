"""``qhm-launch plan`` (the stage table, an elastic chain's segments and GPU-hours) and ``qhm-launch
bounds`` (Theorem 2 / 4 terms and the verdict): printing only; the arithmetic lives in
:mod:`launcher.train.planning` and :mod:`qhm`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from launcher import config as recipe_mod
from launcher.config.schema import ADAM_FAMILY
from launcher.errors import UserError

if TYPE_CHECKING:
    from launcher.config import Recipe


def _training_set_size(recipe: Recipe, override) -> int:
    from launcher import data
    return override if override is not None else data.sizes(recipe.data)[0]


def cmd_plan(args) -> int:
    from launcher.train import planning
    recipe = recipe_mod.load(args.recipe, args.set)
    from launcher.train import preflight
    nproc = args.nproc if args.nproc is not None else preflight.resolve_nproc(
        recipe, preflight.visible_gpus(), log=lambda line: print(line.replace("[qhm-launch] ", "note: ")))
    n = _training_set_size(recipe, args.n)
    preflight.check_adaptive(recipe, nproc * args.nnodes)     # what run would refuse, plan refuses too
    planned = planning.plan(recipe, n, nproc * args.nnodes)
    if args.elastic:
        print(elastic_report(recipe, n, nproc, args.nnodes, args.rate))
        return 0
    if recipe.schedule.batch.decided_during_run:
        print(adaptive_plan(recipe, planned, n, args.json))
    else:
        print(json.dumps(planning.plan_json(planned), indent=1) if args.json else
              planning.format_table(planned, momentum=recipe.optimizer.name not in ADAM_FAMILY))
    if recipe.distributed.max_micro_batch == "auto" and not args.json:
        print(f"note: max_micro_batch auto: each stage's micro x accum is chosen when it starts, by probing device "
              f"memory (the log and metrics rows say what); shown with the CPU cap, "
              f"cpu_micro_batch = {recipe.distributed.cpu_micro_batch}")
    return 0


def adaptive_plan(recipe: Recipe, planned, n: int, as_json: bool) -> str:
    """An adaptive batch: its first interval as planned, then what is decided at run time and the fewest
    and most steps the run can take."""
    from launcher.train import adaptive, planning
    b, E, unit = recipe.schedule.batch, recipe.interval(), recipe.schedule.unit
    position = lambda s: {"epoch": s.epoch, "step": s.global_step, "sample": s.samples,  # noqa: E731
                          "token": s.samples * (recipe.data.tokens_per_sample or 1)}[unit]
    first = [s for s in planned.stages if position(s) < E]
    fewest, most = adaptive.step_range(recipe, n, planned.world)
    cap = adaptive.largest_batch(recipe, n)
    rule = (f"at the end of every {E} {unit}(s), x{b.growth:g} when the noise scale measured "
            f"over them is >= {b.factor:g} x the batch, up to {cap}; otherwise it stays")
    shown = dataclasses.replace(planned, stages=first)
    if as_json:
        return json.dumps({**planning.plan_json(shown), "total_steps": None, "total_samples": planned.total_samples,
                           "decided_at_run_time": {"first_epoch": len(first) if unit == "epoch" else None,
                                                   "rule": rule, "fewest_steps": fewest, "most_steps": most,
                                                   "max_batch": cap}}, indent=1)
    table = planning.format_table(shown, momentum=recipe.optimizer.name not in ADAM_FAMILY).splitlines()
    table[0] = (f"n = {n} training samples, {planned.epochs} epochs, {fewest} to {most} optimizer steps (growing at "
                f"every chance, or never), {planned.total_samples} samples (SFO)")
    if unit == "epoch" and len(first) < planned.epochs:
        table.append(f"{len(first):>5}-{planned.epochs - 1:<5} decided at run time: {rule}")
    elif unit != "epoch":
        table.append(f"from {unit} {E:,} on, decided at run time: {rule}")
    return "\n".join(table)


def elastic_report(recipe: Recipe, n: int, per_node: int, max_nodes: int, rate: float) -> str:
    """The segments of an elastic chain, each one's plan, and the GPU-hours next to a fixed allocation."""
    from launcher.train import planning
    segments = planning.elastic_segments(recipe, n, per_node, max_nodes)
    by = segments[0].by
    key = (lambda s: s.epoch) if by == "epoch" else (lambda s: s.global_step)
    stages = []
    for seg in segments:
        stages += [s for s in planning.plan(recipe, n, seg.nodes * per_node).stages if seg.first <= key(s) <= seg.last]
    nodes_of = [next(seg.nodes for seg in segments if seg.first <= key(s) <= seg.last) for s in stages]
    floor = recipe.distributed.min_rank_batch
    worlds = {id(s): w * per_node for s, w in zip(stages, nodes_of)}
    elastic = planning.gpu_hours(stages, lambda s: worlds[id(s)], rate, floor)
    fixed = planning.gpu_hours(planning.split_epochs(recipe, n, max_nodes * per_node), lambda s: max_nodes * per_node,
                             rate, floor)
    lines = [f"elastic chain of {len(segments)} jobs (distributed.min_rank_batch = {floor} samples per rank):"]
    what, flag = ("epochs", "--until-epoch") if by == "epoch" else ("global steps", "--until-step")
    for k, seg in enumerate(segments):
        inside = [s for s in stages if seg.first <= key(s) <= seg.last]
        lines.append(f"  job {k + 1}: {what} {seg.first}-{seg.last} on {seg.nodes} node(s) x {per_node} = "
                     f"{seg.nodes * per_node} ranks, batch {inside[0].batch}..{inside[-1].batch}"
                     + (f", then {flag} {seg.last + 1}" if k < len(segments) - 1 else ""))
    lines.append(f"estimate at {rate:g} samples/s per GPU (a rank with fewer than {floor} samples is no faster): "
                 f"elastic {elastic[0]:.1f} GPU-hours ({elastic[1]:.1f} h), fixed {max_nodes} node(s) "
                 f"{fixed[0]:.1f} GPU-hours ({fixed[1]:.1f} h): {elastic[0] / fixed[0]:.2f}x the GPU-hours")
    return "\n".join(lines)


MAX_BOUND_STEPS = 10 ** 7      # bounds over steps holds a few float64 arrays of the run's length (~1 GB here)


def cmd_bounds(args) -> int:
    """For a recipe: the terms of its schedule. For a run folder: of the batches the run actually used, over
    the epochs it trained (an adaptive batch's decisions included)."""
    import qhm
    from launcher.run.folder import RunFolder
    used = None
    if Path(args.recipe).is_dir():
        folder = RunFolder(Path(args.recipe))
        rows = folder.metric_rows() if folder.recipe.exists() else []
        if not rows:
            raise UserError(f"bounds: {args.recipe!r} is a folder without a recipe.yaml and epoch rows; allowed: a "
                            "recipe file, or a run folder that trained at least one epoch")
        recipe = recipe_mod.load(folder.recipe, args.set)
        by_epoch = {r["epoch"]: r.get("batch") for r in rows}          # the last row of each epoch
        used = [by_epoch.get(m) for m in range(len(by_epoch))]
        if None in used or (recipe.epochs and len(used) > recipe.epochs):
            raise UserError(f"bounds: {args.recipe!r} has epoch rows that are not one per epoch with its batch (epochs "
                            f"{sorted(by_epoch)[:6]}); allowed: a run folder whose metrics.jsonl the launcher wrote")
    else:
        recipe = recipe_mod.load(args.recipe, args.set)
    if used is None and recipe.schedule.batch.decided_during_run:
        raise UserError("bounds: schedule.batch.kind adaptive decides its batches at run time; allowed: the run's "
                        "folder (qhm-launch bounds RUN_DIR), whose batches are known")
    n = _training_set_size(recipe, args.n)
    constants = qhm.Constants(L=args.L, sigma2=args.sigma2, G=args.G, f_gap=args.f_gap)
    if recipe.schedule.unit == "epoch" and recipe.duration()[0] == "epoch":
        out = qhm.summary(recipe.schedule_spec(), n, constants, batches=used)
    else:                            # schedules that move inside epochs: the theorems' sums over the steps
        from launcher.train import planning
        planned = planning.plan(recipe, n, 1, decisions=_decisions(folder, recipe) if used is not None else None)
        if planned.total_steps > MAX_BOUND_STEPS:
            raise UserError(f"bounds: the run has {planned.total_steps:,} steps, whose sums the theorems take one by one; "
                            f"allowed: at most {MAX_BOUND_STEPS:,} (bound a shorter run: --set "
                            f"train.{recipe.duration()[0]}s=...)")
        out = qhm.summary(planned.schedule, n, constants, plan=planned.steps)
        out["unit"] = recipe.schedule.unit
    if used is not None:
        out["batches"] = used
    if recipe.optimizer.name in ADAM_FAMILY:
        out["optimizer_note"] = (f"the theorems are QHM's (Algorithm 1); this recipe trains with {recipe.optimizer.name}, "
                                 "which they do not cover: the terms are those of its schedules, as if QHM ran them")
    if recipe.schedule.batch.decided_during_run:       # its growth is not known in advance: read as constant
        out["verdict"] += "; the verdict reads an adaptive batch as constant (the terms are the run's own)"
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    t2, t4 = out["theorem2"], out["theorem4"]
    g = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
    b4, c4, d4 = t4["B'_K"], t4["C'_K"], t4["D'_K"]
    lines = [f"K = {out['K']} steps over n = {n} samples; {out['verdict']}",
             *([f"schedules in {out['unit']}s: the terms sum over the K steps as scheduled, each at its own "
                "alpha_k, beta_k, gamma_k and b_k; the corollaries (closed forms per epoch) left out"]
               if "unit" in out else []),
             *([f"batches as the run used them, epochs 0-{len(used) - 1}: {_runs_of(used)}; the corollaries "
                "(closed forms for eqs. 1 and 2) left out"] if used is not None else []),
             f"Theorem 2: A_K={g(t2['A_K'])} B_K={g(t2['B_K'])} C_K={g(t2['C_K'])} "
             f"(sup gamma*beta={g(t2['sup_gamma_beta'])}) bound={g(t2['bound'])} {t2['note']}".rstrip(),
             "  Corollary 3: " + (", ".join(f"{k}_K<={g(v)}" for k, v in t2["corollary3"].items()) or "not covered"),
             f"Theorem 4: A_K={g(t4['A_K'])} B'_K={g(b4)} C'_K={g(c4)} D'_K={g(d4)} "
             f"condition={'holds' if t4['condition_holds'] else 'fails'} bound={g(t4['bound'])} {t4['note']}".rstrip(),
             "  Corollary 5: " + (", ".join(f"{k}_K<={g(v)}" for k, v in t4["corollary5"].items()) or "not covered")]
    pb = out["partial_batches"]
    if pb["excess"] > 0:
        lines.append(f"note: the last batch of an epoch is partial where n is not a multiple of the batch, while "
                     f"B_K and B'_K take b_k = b'_m: the run's sum of 1/b_k is {100 * pb['excess']:.3g}% above "
                     f"theirs (worst epoch {pb['worst_epoch']}: {100 * pb['worst_excess']:.3g}% at batch "
                     f"{pb['worst_batch']})")
    lines.append("note: grad_norm is the norm of the unregularised training loss's gradient (weight decay "
                 "is not in f)")
    if "optimizer_note" in out:
        lines.append("note: " + out["optimizer_note"])
    print("\n".join(lines))
    return 0


def _decisions(folder, recipe: Recipe) -> list[int] | None:
    """An adaptive run's decisions, from its newest checkpoint (None: none, or not adaptive)."""
    if not recipe.schedule.batch.decided_during_run:
        return None
    from launcher.run.checkpoint import CheckpointManager, read_file
    found = CheckpointManager(folder, log=lambda *a: None).find_latest_valid()
    if found is None:
        return None
    return [int(b) for b in read_file(found.path / "state.pt")["batch_growth"]["batches"]]


def _runs_of(batches: list[int]) -> str:
    """``8 x2, 16 x3``: each batch and how many epochs in a row used it."""
    out: list[list[int]] = []
    for b in batches:
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return ", ".join(f"{b} x{k}" for b, k in out)
