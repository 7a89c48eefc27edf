"""Hand-edited and broken run folders against every reader (report, status, plot, scaling, bounds): a
bad row is skipped with one warning naming the file and line; a folder that cannot be read is one line,
exit 2; never a traceback."""
import json
import os

import pytest
import yaml

from helpers import base_recipe
from launcher import config
from launcher.cli.main import main

ROW = {"epoch": 0, "step": 10, "samples": 160, "batch": 16, "world_size": 1, "train_loss": 1.0, "train_acc": 0.5,
       "test_loss": 1.1, "test_acc": 0.4, "grad_norm": 0.5, "min_grad_norm": 0.5, "noise_scale": 12.0,
       "wall_time": 1.0, "samples_per_s": 100.0}


def make_run(root, rows=None, steps=None, recipe=True):
    run = root / "r"
    run.mkdir(parents=True)
    if recipe:
        (run / "recipe.yaml").write_text(yaml.safe_dump(config.from_dict(base_recipe(name="r")).to_dict()))
    good = [dict(ROW, epoch=e, step=10 * (e + 1), samples=160 * (e + 1)) for e in range(3)]
    lines = [json.dumps(r) for r in good] if rows is None else rows
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if steps is not None:
        (run / "steps.jsonl").write_text("".join(line + "\n" for line in steps))
    return run


BAD_ROWS = {
    "a number": "42", "null": "null", "a list": "[1, 2]", "no epoch": json.dumps({k: v for k, v in ROW.items() if k != "epoch"}),
    "test_acc text": json.dumps(dict(ROW, test_acc="abc")),
    "epoch text": json.dumps(dict(ROW, epoch="1")), "world_size text": json.dumps(dict(ROW, world_size="two")),
    "samples_per_s text": json.dumps(dict(ROW, samples_per_s="fast")), "wall_time text": json.dumps(dict(ROW, wall_time="x")),
    "batch 0": json.dumps(dict(ROW, batch=0)),
    "epoch true": json.dumps(dict(ROW, epoch=True)),
}
COMMANDS = {"report": lambda r, o: ["report", r], "status": lambda r, o: ["status", r],
            "plot": lambda r, o: ["plot", r, "--out", o], "scaling": lambda r, o: ["scaling", r],
            "bounds": lambda r, o: ["bounds", r], "target": lambda r, o: ["report", r, "--target", "test_acc>=0.3"]}


def run(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_row_is_skipped_with_one_warning(tmp_path, capsys, case, command):
    good = [json.dumps(dict(ROW, epoch=e, step=10 * (e + 1), samples=160 * (e + 1))) for e in range(3)]
    folder = make_run(tmp_path, good[:1] + [BAD_ROWS[case]] + good[1:],
                      steps=[json.dumps(dict(ROW, step=s)) for s in (5, 10)] + [BAD_ROWS[case]])
    code, out = run(COMMANDS[command](str(folder), str(tmp_path / "p.png")), capsys)
    assert code == 0, out.err
    warned = [x for x in out.err.splitlines() if "warning:" in x]
    assert warned and all("skipped" in x for x in warned)
    assert f"{folder / 'metrics.jsonl'} line 2: skipped" in out.err or command == "status"


LEAN_ROWS = {"no step": {k: v for k, v in ROW.items() if k != "step"},
             "no batch": {k: v for k, v in ROW.items() if k != "batch"}}


@pytest.mark.parametrize("case", sorted(LEAN_ROWS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_rows_without_a_step_or_a_batch_are_read_without_a_traceback(tmp_path, capsys, case, command):
    """Rows an earlier version wrote (no step: it wrote global_step) are rows: every reader takes them."""
    good = [json.dumps(dict(ROW, epoch=e, step=10 * (e + 1), samples=160 * (e + 1))) for e in range(3)]
    folder = make_run(tmp_path, good[:1] + [json.dumps(LEAN_ROWS[case])] + good[1:])
    code, out = run(COMMANDS[command](str(folder), str(tmp_path / "p.png")), capsys)
    lines = [x for x in out.err.splitlines() if x.startswith("qhm-launch: error:")]
    # bounds needs one row with a batch per epoch: without, one line (the others read them)
    assert code == 0 or (command == "bounds" and code == 2 and len(lines) == 1), out.err


def test_rows_not_utf8_are_skipped_too(tmp_path, capsys):
    folder = make_run(tmp_path)
    with open(folder / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 3, "step": 40, "batch": 16, "x": "\xff\xfe"}\n')
    code, out = run(["report", str(folder)], capsys)
    assert code == 0 and "line 4: skipped (not UTF-8)" in out.err


BROKEN = {
    "metrics a directory": lambda run: (os.remove(run / "metrics.jsonl"), os.mkdir(run / "metrics.jsonl")),
    "recipe not YAML": lambda run: (run / "recipe.yaml").write_text("a: [1,\n"),
    "recipe a list": lambda run: (run / "recipe.yaml").write_text("- 1\n- 2\n"),
    "metrics unreadable": lambda run: os.chmod(run / "metrics.jsonl", 0),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_that_cannot_be_read_is_one_line(tmp_path, capsys, case, command):
    folder = make_run(tmp_path)
    BROKEN[case](folder)
    if case == "metrics unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    code, out = run(COMMANDS[command](str(folder), str(tmp_path / "p.png")), capsys)
    lines = [x for x in out.err.splitlines() if x.strip()]
    if command == "status" and code == 0:   # status reports the folder's state, where its files allow
        return
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qhm-launch: error: "), out.err


def test_a_folder_without_a_recipe_is_not_said_to_lack_metrics(tmp_path, capsys):
    folder = make_run(tmp_path, recipe=False)
    code, out = run(["report", str(folder)], capsys)
    assert code == 2 and "without metrics yet" not in out.err


@pytest.mark.parametrize("metric,rows", [("noise_scale", "epochs"), ("train_loss", "steps"), ("test_loss", "epochs")])
def test_plot_of_values_never_logged_or_not_positive_is_one_line_or_a_linear_axis(tmp_path, capsys, metric, rows):
    folder = make_run(tmp_path, [json.dumps(dict(ROW, epoch=e, step=10 * (e + 1), noise_scale=None,
                                                 test_loss=-0.5 + e)) for e in range(3)])
    code, out = run(["plot", str(folder), "--metric", metric, "--rows", rows, "--out", str(tmp_path / "p.png")], capsys)
    if metric == "test_loss":
        assert code == 0                                     # values <= 0: drawn on a linear axis
    else:
        assert code == 2 and "has no value in any run's" in out.err


def test_plan_into_a_closed_pipe_is_quiet(tmp_path):
    import subprocess
    import sys
    from helpers import ROOT, write_recipe
    path = write_recipe(tmp_path, base_recipe())
    out = subprocess.run(f"{sys.executable} -m launcher plan {path} --json | head -1", shell=True, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "{" and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


def test_a_folder_whose_recipe_does_not_read_is_left_out_of_many_with_one_warning(tmp_path, capsys):
    good = make_run(tmp_path / "a")
    bad = make_run(tmp_path / "b")
    BROKEN["recipe not YAML"](bad)
    for command in ("report", "plot"):
        args = [command, str(good), str(bad)] + (["--out", str(tmp_path / "p.png")] if command == "plot" else [])
        code, out = run(args, capsys)
        lines = [x for x in out.err.splitlines() if x.strip() and "figure" not in x]
        assert code == 0 and lines == [f"qhm-launch: left out 1 run(s) whose recipe.yaml does not read: {bad}"], out.err


def test_run_folders_come_in_natural_order_numbers_as_numbers(tmp_path):
    """A branch study's x1, x2, x4, x16 (and a sweep's point_9 before point_10) in that order, not as text."""
    from launcher.cli.status import run_folders
    study = tmp_path / "p.branches"
    for name in ("p_x16", "p_x2", "p_x1", "p_x4"):
        (study / name).mkdir(parents=True)
        (study / name / "recipe.yaml").write_text("name: x\n")
    for name in ("s_10", "s_9", "s_100"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.yaml").write_text("name: x\n")
    assert [p.name for p in run_folders([study])] == ["p_x1", "p_x2", "p_x4", "p_x16"]
    assert [p.name for p in run_folders([tmp_path / "s"])] == ["s_9", "s_10", "s_100"]
