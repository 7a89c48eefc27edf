"""``qhm-launch plan`` (the stage table, an elastic chain's segments and GPU-hours) and ``qhm-launch
bounds`` (Theorem 2 / 4 terms and the verdict): printing only; the arithmetic lives in
:mod:`launcher.train.splits` and :mod:`qhm`."""
from __future__ import annotations

import json
from pathlib import Path

from launcher import config as recipe_mod
from launcher.errors import UserError


def _training_set_size(recipe, override) -> int:
    from launcher import data
    return override if override is not None else data.sizes(recipe.data)[0]


def cmd_plan(args) -> int:
    from launcher.train import splits
    recipe = recipe_mod.load(args.recipe, args.set)
    from launcher.train import preflight
    nproc = args.nproc if args.nproc is not None else preflight.resolve_nproc(
        recipe, preflight.visible_gpus(), log=lambda line: print(line.replace("[qhm-launch] ", "note: ")))
    n = _training_set_size(recipe, args.n)
    epochs = splits.split_epochs(recipe, n, nproc * args.nnodes)
    if args.elastic:
        print(elastic_report(recipe, n, nproc, args.nnodes, args.rate))
        return 0
    if recipe.schedule.batch.kind == "adaptive":
        print(adaptive_plan(recipe, epochs, n, args.json))
    else:
        print(json.dumps(splits.plan_json(epochs, n), indent=1) if args.json else splits.format_table(epochs, n))
    if recipe.distributed.max_micro_batch == "auto" and not args.json:
        print(f"note: max_micro_batch auto: each stage's micro x accum is chosen when it starts, by probing device "
              f"memory (the log and metrics rows say what); shown with the CPU cap, "
              f"cpu_micro_batch = {recipe.distributed.cpu_micro_batch}")
    return 0


def adaptive_plan(recipe, epochs: list, n: int, as_json: bool) -> str:
    """An adaptive batch: its first interval as planned, then what is decided at run time and the fewest
    and most steps the run can take."""
    from launcher.train import adaptive, splits
    b, first = recipe.schedule.batch, epochs[:recipe.schedule.interval]
    fewest, most = adaptive.step_range(recipe, n)
    cap = adaptive.largest_batch(recipe, n)
    rule = (f"at the end of every {recipe.schedule.interval} epoch(s), x{b.growth:g} when the noise scale measured "
            f"over them is >= {b.factor:g} x the batch, up to {cap}; otherwise it stays")
    if as_json:
        return json.dumps({**splits.plan_json(first, n), "total_steps": None, "total_samples": n * len(epochs),
                           "decided_at_run_time": {"first_epoch": len(first), "rule": rule, "fewest_steps": fewest,
                                                   "most_steps": most, "max_batch": cap}}, indent=1)
    table = splits.format_table(first, n).splitlines()
    table[0] = (f"n = {n} training samples, {len(epochs)} epochs, {fewest} to {most} optimizer steps (growing at "
                f"every chance, or never), {n * len(epochs)} samples (SFO)")
    if len(first) < len(epochs):
        table.append(f"{len(first):>5}-{len(epochs) - 1:<5} decided at run time: {rule}")
    return "\n".join(table)


def elastic_report(recipe, n: int, per_node: int, max_nodes: int, rate: float) -> str:
    """The segments of an elastic chain, each one's plan, and the GPU-hours next to a fixed allocation."""
    from launcher.train import splits
    segments = splits.elastic_segments(recipe, n, per_node, max_nodes)
    nodes_of = {m: s.nodes for s in segments for m in range(s.first, s.last + 1)}
    epochs = [e for s in segments for e in splits.split_epochs(recipe, n, s.nodes * per_node)[s.first:s.last + 1]]
    floor = recipe.distributed.min_rank_batch
    elastic = splits.gpu_hours(epochs, lambda m: nodes_of[m] * per_node, rate, floor)
    fixed = splits.gpu_hours(splits.split_epochs(recipe, n, max_nodes * per_node), lambda m: max_nodes * per_node,
                               rate, floor)
    lines = [f"elastic chain of {len(segments)} jobs (distributed.min_rank_batch = {floor} samples per rank):"]
    for k, s in enumerate(segments):
        first = epochs[s.first]
        lines.append(f"  job {k + 1}: epochs {s.first}-{s.last} on {s.nodes} node(s) x {per_node} = {s.nodes * per_node} "
                     f"ranks, batch {first.batch}..{epochs[s.last].batch}"
                     + (f", then --until-epoch {s.last + 1}" if k < len(segments) - 1 else ""))
    lines.append(f"estimate at {rate:g} samples/s per GPU (a rank with fewer than {floor} samples is no faster): "
                 f"elastic {elastic[0]:.1f} GPU-hours ({elastic[1]:.1f} h), fixed {max_nodes} node(s) "
                 f"{fixed[0]:.1f} GPU-hours ({fixed[1]:.1f} h): {elastic[0] / fixed[0]:.2f}x the GPU-hours")
    return "\n".join(lines)


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
        used = [r["batch"] for r in rows]
    else:
        recipe = recipe_mod.load(args.recipe, args.set)
    if used is None and recipe.schedule.batch.kind == "adaptive":
        raise UserError("bounds: schedule.batch.kind adaptive decides its batches at run time; allowed: the run's "
                        "folder (qhm-launch bounds RUN_DIR), whose batches are known")
    n = _training_set_size(recipe, args.n)
    out = qhm.summary(recipe.schedule_spec(), n, qhm.Constants(L=args.L, sigma2=args.sigma2, G=args.G,
                                                               f_gap=args.f_gap), batches=used)
    if used is not None:
        out["batches"] = used
    if recipe.schedule.batch.kind == "adaptive":       # its growth is not known in advance: read as constant
        out["verdict"] += "; the verdict reads an adaptive batch as constant (the terms are the run's own)"
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    t2, t4 = out["theorem2"], out["theorem4"]
    g = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
    b4, c4, d4 = t4["B'_K"], t4["C'_K"], t4["D'_K"]
    lines = [f"K = {out['K']} steps over n = {n} samples; {out['verdict']}",
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
    print("\n".join(lines))
    return 0


def _runs_of(batches: list[int]) -> str:
    """``8 x2, 16 x3``: each batch and how many epochs in a row used it."""
    out: list[list[int]] = []
    for b in batches:
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return ", ".join(f"{b} x{k}" for b, k in out)
