"""``qhm-launch``: the parser and the dispatch to each command (run, plan/bounds, submit/sweep, plot,
report, status: each in its own module).

Exit status: 0 done; 2 bad input (one line on stderr, ``--debug`` for the traceback); 75 preempted
after saving a checkpoint (run the same command again to resume); anything else: a failure.
"""
from __future__ import annotations

import argparse
import os
import sys

from launcher.cli.args import (Parser, add_debug, endpoint, node_count, node_range, nonnegative_float, nonnegative_int,
                               positive_float, positive_int, rdzv_conf, sample_count, text)
from launcher.errors import BAD_INPUT, FAILED, DiskFull, RunFailed, UserError, disk_full, one_line



def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="qhm-launch", description="QHM with increasing batch size, data-parallel: torchrun, "
               "DeepSpeed, Slurm, W&B.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    p.add_argument("--version", action="version", version=f"qhm-launch {version()}")
    # the `deepspeed` launcher passes --local_rank=N before the command (it also sets LOCAL_RANK)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, help):
        sp = sub.add_parser(name, help=help, description=help)
        add_debug(sp)
        return sp

    def recipe_args(sp):
        sp.add_argument("recipe", help="YAML recipe")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. schedule.lr.max=0.05 (repeatable)")

    r = command("run", "train (or resume) a recipe; starts torchrun itself when needed")
    recipe_args(r)
    r.add_argument("--force-resume", action="store_true",
                   help="resume even if trajectory-changing recipe fields differ from the checkpoint's")
    r.add_argument("--nnodes", type=node_range, default=(1, 1), metavar="N|MIN:MAX",
                   help="nodes of a multi-node run: run this command once on each (a Slurm script does); MIN:MAX: "
                        "elastic membership, the run goes on in place while at least MIN nodes are left")
    r.add_argument("--max-restarts", type=nonnegative_int, default=None,
                   help="times torchrun restarts the workers after a node is lost (with --nnodes MIN:MAX; default 3): "
                        "they resume from the newest checkpoint on the nodes left")
    r.add_argument("--rdzv-conf", type=rdzv_conf, metavar="KEY=VALUE,...",
                   help="torchrun's rendezvous settings, e.g. last_call_timeout=10 (how long a re-rendezvous waits "
                        "for more than MIN nodes; torchrun's default 30 s)")
    r.add_argument("--rdzv-endpoint", type=endpoint, help="HOST:PORT of the rendezvous (multi-node; the first node)")
    r.add_argument("--rdzv-id", type=text, help="the rendezvous id, the same on every node (multi-node)")
    r.add_argument("--until-epoch", type=positive_int,
                   help="stop after this many epochs with a checkpoint (a segment of an elastic chain)")
    r.add_argument("--until-step", type=positive_int,
                   help="stop after this global step with a checkpoint (a segment of an elastic chain whose "
                        "schedules are in steps, samples or tokens)")

    pl = command("plan", "the stage table: batch, steps, micro-batch x accumulation x world")
    recipe_args(pl)
    pl.add_argument("--nproc", type=positive_int, help="processes per node (default: distributed.nproc_per_node)")
    pl.add_argument("--nnodes", type=node_count, default=1, help="nodes (default 1)")
    pl.add_argument("--n", type=sample_count, help="training-set size (default: the dataset's)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--elastic", action="store_true",
                    help="the segments of an elastic chain on up to --nnodes nodes of --nproc GPUs, and its GPU-hours "
                         "next to a fixed allocation")
    pl.add_argument("--rate", type=positive_float, default=2000.0,
                    help="samples/s one GPU trains, for the GPU-hour estimate (default 2000)")

    b = command("bounds", "Theorem 2 / Theorem 4 terms at the end of training, and the verdict")
    recipe_args(b)
    b.add_argument("--n", type=sample_count, help="training-set size (default: the dataset's)")
    b.add_argument("--L", type=positive_float, help="smoothness constant L of f (with all four: the bound itself)")
    b.add_argument("--sigma2", type=nonnegative_float, help="variance bound sigma^2 of the stochastic gradient")
    b.add_argument("--G", type=nonnegative_float, help="bound G on every per-sample gradient norm")
    b.add_argument("--f-gap", type=nonnegative_float, dest="f_gap", help="f(x_0) - f_star")
    b.add_argument("--json", action="store_true", help="print the terms as JSON")
    slurm_commands(command)

    from launcher.cli.analysis import METRICS, RANKS, XS
    pt = command("plot", "curves of several runs: mean and min-max band over seeds")
    pt.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (those without metrics are listed)")
    pt.add_argument("--metric", help=f"what to draw: {' | '.join(METRICS)} (default test_acc, or test_loss for "
                    "runs without an accuracy)")
    pt.add_argument("--x", default="epoch", help=f"x axis: {' | '.join(XS)} (default epoch)")
    pt.add_argument("--out", default="plot.png", help="FILE.png or FILE.pdf (default plot.png)")
    pt.add_argument("--rows", default="epochs", help="epochs (metrics.jsonl) | steps (steps.jsonl) (default epochs)")
    rp = command("report", "a markdown table: one row per run")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep folders (those without metrics are listed)")
    rp.add_argument("--rank", help=f"sort by: {' | '.join(RANKS)} (best first)")
    rp.add_argument("--target", metavar="METRIC>=VALUE", help="when each run first reached it: global step, SFO "
                    "and seconds (METRIC>=VALUE or METRIC<=VALUE, any field of the epoch or step rows)")
    rp.add_argument("--json", action="store_true", help="with --target: one JSON object per run")
    sc = command("scaling", "the critical batch size fitted to steps-to-target, and throughput per world size")
    sc.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or sweep folders: constant batches of at least "
                    "3 sizes for the fit (seeds averaged)")
    sc.add_argument("--target", metavar="METRIC>=VALUE", help="METRIC>=VALUE or METRIC<=VALUE; without it, "
                    "throughput only")
    sc.add_argument("--out", help="FILE.png or FILE.pdf: steps and SFO to target vs batch with the fit, and the "
                    "measured noise scale over training")
    sc.add_argument("--json", action="store_true", help="print the result as JSON")
    sc.add_argument("--cbs", action="store_true", help="the critical batch size measured by branches (qhm-launch "
                    "branch): the largest batch whose loss recovers the control's")
    sc.add_argument("--tolerance", default=None, help="with --cbs: how close to the control's loss, absolute "
                    "(0.01) or relative (2%%); default 2%% (as schedule.batch.kind warmup_from's)")
    sc.add_argument("--confidence", type=float, default=0.9, help="with --cbs: the level of the gaps' intervals over "
                    "seeds (default 0.9)")
    sc.add_argument("--loss", default="test", help="with --cbs: test (the final evaluation) | train (the mean over "
                    "the last tenth of the branch)")
    sc.add_argument("--x", default="samples", help="what the data used is counted in: samples | tokens | steps "
                    "(the second panel and the noise scale's x axis; default samples)")
    tk = command("tokenize", "text files -> token files (train.bin, val.bin, meta.json) for data.dataset tokens")
    tk.add_argument("text", nargs="+", metavar="TEXT", help="text files or globs, or 'stdlib' (the Python standard "
                    "library's own sources: text every machine has)")
    tk.add_argument("--out", required=True, type=text, help="the folder to write into")
    tk.add_argument("--vocab", type=positive_int, help="a byte-level BPE of this many ids, trained here with the "
                    "tokenizers library (default: byte-level ids and an end-of-document id, vocabulary 257)")
    tk.add_argument("--validation", type=positive_float, default=0.1,
                    help="the share of the tokens written as val.bin, chunks spread over the text (default 0.1)")
    tk.add_argument("--max-bytes", type=positive_int, help="read at most this many bytes of text (default: all; "
                    "stdlib: 4,000,000)")
    ex = command("export", "a run's model in another library's format: --format hf, a folder transformers loads")
    ex.add_argument("run", metavar="RUN_DIR", help="the run folder")
    ex.add_argument("--step", type=nonnegative_int, help="the checkpoint of this global step (default: final_model.pt, "
                    "else the newest checkpoint)")
    ex.add_argument("--format", required=True, choices=["hf"], help="hf: safetensors and config.json that "
                    "transformers loads (GPT2LMHeadModel, LlamaForCausalLM), with the run's tokenizer files")
    ex.add_argument("--out", required=True, type=text, help="a new folder to write into (never one with files)")
    st = command("status", "one row per run: done / running / preempted / failed / interrupted / not started")
    st.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or sweep folders (their points)")
    return p


def slurm_commands(command) -> None:
    from launcher.cluster import slurm
    """The ``submit`` and ``sweep`` subcommands (``command(name, help)`` makes a subparser)."""
    def slurm_args(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. schedule.lr.max=0.05 (repeatable)")
        sp.add_argument("--nodes", type=node_count, help="nodes per job (default: the recipe's slurm.nodes, 1)")
        sp.add_argument("--gpus-per-node", type=nonnegative_int,
                        help="GPUs (= processes) per node; 0: CPU, processes from distributed.nproc_per_node "
                             "(default: the recipe's slurm.gpus_per_node, 0)")
        sp.add_argument("--time", type=text, default="01:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
        sp.add_argument("--partition", type=text, help="Slurm partition")
        sp.add_argument("--account", type=text, help="Slurm account")
        sp.add_argument("--cpus-per-task", type=positive_int,
                        help="CPUs per node's task (default: processes x (data.workers + 1))")
        sp.add_argument("--signal", default="USR2", choices=slurm.SIGNALS,
                        help="preemption warning signal (default USR2: NCCL does not use it)")
        sp.add_argument("--signal-seconds", type=positive_int, default=120,
                        help="how long before the time limit the warning comes (default 120)")
        sp.add_argument("--sbatch-arg", type=text, action="append", default=[], metavar="ARG",
                        help="extra sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
        sp.add_argument("--setup", type=text, action="append", default=None, metavar="LINE",
                        help="a line the job runs before training, e.g. --setup 'module load cuda/12.4' "
                             "(repeatable; default: the recipe's slurm.setup)")
        sp.add_argument("--python", type=text, help="the Python the job runs (default: this one, "
                                                    f"{sys.executable})")
        sp.add_argument("--elastic", action="store_true",
                        help="grow the allocation with the batch: one job per segment of stages, each on the "
                             "nodes its batch can use (distributed.min_rank_batch per rank), chained afterok")
        sp.add_argument("--min-nodes", type=node_count,
                        help="keep the job going while at least this many of its nodes are left (torchrun's elastic "
                             "membership, sbatch --no-kill): the workers restart on the nodes left, from the newest "
                             "checkpoint")
        sp.add_argument("--rdzv-conf", type=rdzv_conf, metavar="KEY=VALUE,...",
                        help="torchrun's rendezvous settings for a multi-node job, e.g. last_call_timeout=10")
        sp.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")

    s = command("submit", "write an sbatch script into the run folder and submit it")
    s.add_argument("recipe", help="YAML recipe")
    slurm_args(s)
    w = command("sweep", "expand a grid into one recipe per point and one Slurm job array")
    w.add_argument("sweep", help="YAML sweep: recipe, name, grid, seeds, set")
    w.add_argument("--max-parallel", type=positive_int, default=4, help="P in --array=0-N%%P (default 4)")
    w.add_argument("--local", action="store_true", help="run the points one after another here, no Slurm")
    slurm_args(w)
    br = command("branch", "short runs from a run's exact checkpoints at larger batches (the critical batch size)")
    br.add_argument("run", metavar="RUN_DIR", help="the parent run's folder (never written)")
    br.add_argument("--at", required=True, help="positions, e.g. 20,40 or 10M,50M: each branch starts at the parent's "
                    "newest checkpoint at or before it (0: the start)")
    br.add_argument("--batch", required=True, help="integer factors of the parent's batch, e.g. 1,2,4,8 (1 is always run)")
    br.add_argument("--for", dest="for_", required=True, help="how long each branch trains, e.g. 30 or 5M")
    br.add_argument("--unit", help="steps | samples | tokens: what --at and --for count (default: the parent's "
                    "schedule.unit; steps for epochs)")
    br.add_argument("--lr-rule", default=None, choices=("none", "linear", "sqrt"),
                    help="the branch's learning rate: the parent's x factor^(0 | 1 | 1/2); default sqrt for adamw and "
                    "qhadam (Merrill et al. 2025's rule for AdamW), linear for qhm, sgd and nshb")
    br.add_argument("--seeds", type=positive_int, default=1, help="continuations per factor that differ only in the "
                    "data order after the branch point (the first is the parent's order); 3 or more give the CBS an "
                    "interval (default 1)")
    br.add_argument("--max-parallel", type=positive_int, default=4, help="P in --array=0-N%%P (default 4)")
    br.add_argument("--local", action="store_true", help="run the branches one after another here, no Slurm")
    slurm_args(br)



def version() -> str:
    try:
        from importlib.metadata import version as installed
        return installed("qhm-launch")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "unknown"


def cmd_plot(args) -> int:
    from launcher.cli import analysis
    drawn = analysis.plot(args.runs, args.metric, args.x, args.out, args.rows)
    print(f"qhm-launch: {len(drawn)} curve(s) of {drawn[0]['metric']} from {sum(len(d['runs']) for d in drawn)} "
          f"run(s) -> {args.out}")
    return 0


def cmd_report(args) -> int:
    from launcher.cli import analysis, scaling
    if args.target is not None:
        print(scaling.target_report(args.runs, args.target, args.json))
    elif args.json:
        raise UserError("--json: given without --target; allowed: report --target METRIC>=VALUE --json")
    else:
        print(analysis.report(args.runs, args.rank))
    return 0


def cmd_tokenize(args) -> int:
    from launcher.data import tokens
    return tokens.cmd_tokenize(args)


def cmd_export(args) -> int:
    from launcher.train import export
    out = export.export(args.run, args.step, args.out)
    print(f"qhm-launch: exported {out['source']} of {args.run} as {out['model']} to {args.out}"
          + (f" (with {', '.join(out['tokenizer'])})" if out["tokenizer"] else ""))
    return 0


def cmd_scaling(args) -> int:
    from launcher.cli import scaling
    if args.cbs:
        from launcher.cli import cbs
        if args.target is not None:
            raise UserError("--cbs: not valid with --target; allowed: one of the two (branches, or runs to a target)")
        print(cbs.cbs(args.runs, args.tolerance, args.loss, args.out, args.json, args.confidence))
    else:
        print(scaling.scaling(args.runs, args.target, args.out, args.json, args.x))
    if args.out and not args.json:
        print(f"qhm-launch: figure -> {args.out}")
    return 0


def cmd_sweep(args) -> int:
    from launcher.cluster import slurm
    # --local: each point through the run command, in this process (no start-up of its own per point)
    return slurm.cmd_sweep(args, run_point=lambda recipe: main(["run", recipe]))


def cmd_branch(args) -> int:
    from launcher.cli import branch
    return branch.cmd_branch(args, run_point=lambda recipe: main(["run", recipe]))


def cmd_status(args) -> int:
    from launcher.cli import status
    print(status.table(args.runs))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from launcher.cluster import slurm
    from launcher.env import early_signals
    if args.command != "run" and not (args.command == "sweep" and args.local):
        early_signals([])                   # only a run (and a local sweep's runs) checkpoints on a signal
    from launcher.cli.plan import cmd_bounds, cmd_plan
    from launcher.cli.run import cmd_run
    commands = {"run": cmd_run, "plan": cmd_plan, "bounds": cmd_bounds, "submit": slurm.cmd_submit,
                "sweep": cmd_sweep, "plot": cmd_plot, "report": cmd_report, "scaling": cmd_scaling,
                "tokenize": cmd_tokenize, "branch": cmd_branch, "export": cmd_export,
                "status": cmd_status}
    try:
        return commands[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"qhm-launch: error: {one_line(exc)}", file=sys.stderr)
        return BAD_INPUT
    except (RunFailed, OSError) as exc:     # here: a write of the launcher's own found the disk full
        if args.debug or not (isinstance(exc, RunFailed) or disk_full(exc)):
            raise
        failure = exc if isinstance(exc, RunFailed) else DiskFull(exc.filename or ".", None)
        print(f"qhm-launch: error: {one_line(failure)}", file=sys.stderr)
        return FAILED
    except BrokenPipeError:                 # `qhm-launch report ... | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        return 0
