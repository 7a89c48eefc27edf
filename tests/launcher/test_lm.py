"""Language models: token files as windows in the keyed order, the built-in GPT, the per-token loss over
the global batch (masked positions left out), AdamW/QHAdam beside QHM, clipping, loss-first reports;
each against an independent reference (a plain loop, a hand computation)."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (VOCAB, T, assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, lm_recipe, metric_rows,
                     train_ranks, write_recipe)
from launcher import config
from launcher.cli.main import main
from launcher.data import tokens
from launcher.run.files import read_jsonl

def test_windows_are_the_files_tokens_shifted_by_one(token_files, tmp_path):
    ids = token_files["ids"][:20_000]
    windows = tokens.TokenWindows(token_files["train"], T, np.uint16)
    assert len(windows) == (20_000 - 1) // T
    for i in (0, 1, 777, len(windows) - 1):
        x, y = windows[i]
        assert x.dtype == torch.int64 and x.tolist() == ids[i * T:i * T + T].tolist()
        assert y.tolist() == ids[i * T + 1:i * T + T + 1].tolist()
    assert windows._ids is not None and pickle.loads(pickle.dumps(windows))._ids is None   # pickles as a path
    np.save(tmp_path / "t.npy", ids.astype(np.uint32))
    assert tokens.TokenWindows(tmp_path / "t.npy", T, tokens.dtype_of(tmp_path / "t.npy"))[5][0].tolist() == \
        windows[5][0].tolist()


def _stream(folder: Path, dtype=np.uint16) -> np.ndarray:
    """The token stream tokenize cut: its training and validation ids put back at their positions."""
    train = np.fromfile(folder / "train.bin", dtype=dtype)
    val = np.fromfile(folder / "val.bin", dtype=dtype)
    kept, held = tokens.validation_chunks(len(train) + len(val), 0.1)
    stream = np.empty(len(train) + len(val), dtype=dtype)
    stream[kept], stream[held] = train, val
    return stream, held


def test_tokenize_writes_bytes_or_a_local_bpe(tmp_path, capsys):
    """Each document ends in the end-of-document id (bytes: 256, vocabulary 257; BPE: <|endoftext|>); the
    validation share is chunks spread over the whole stream (from its first tenth to its last), not its tail."""
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    second.write_text("pack my box with five dozen liquor jugs\n" * 150)
    assert main(["tokenize", str(first), str(second), "--out", str(tmp_path / "b")]) == 0
    stream, held = _stream(tmp_path / "b")
    assert stream.tolist() == list(first.read_bytes()) + [256] + list(second.read_bytes()) + [256]
    assert len(held) == pytest.approx(0.1 * len(stream), rel=0.05)
    assert held.min() < len(stream) * 0.1 and held.max() > len(stream) * 0.9
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["vocab"] == 257 and meta["eod"] == 256
    assert main(["tokenize", str(first), str(second), "--out", str(tmp_path / "bpe"), "--vocab", "300"]) == 0
    meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    ids, _ = _stream(tmp_path / "bpe")
    assert meta["vocab"] <= 300 and ids.max() < meta["vocab"] and len(ids) < len(stream) / 2
    assert meta["eod"] == tok.token_to_id("<|endoftext|>") and ids[-1] == meta["eod"]
    docs = np.split(ids, np.flatnonzero(ids == meta["eod"]) + 1)[:-1]
    assert [tok.decode(d[:-1].tolist()) for d in docs] == [first.read_text(), second.read_text()]
    capsys.readouterr()
    assert main(["tokenize", str(tmp_path / "missing*.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "TEXT: " in capsys.readouterr().err


def test_one_process_micro16_equals_two_processes_micro4_accum2(token_files, tmp_path):
    over = {"precision": "fp64", "schedule.batch": {"kind": "constant", "size": 16}}
    one = train_ranks(lm_recipe(token_files, "one", **over, **{"distributed.nproc_per_node": 1,
                                                               "distributed.max_micro_batch": 16}), tmp_path)
    two = train_ranks(lm_recipe(token_files, "two", **over, **{"distributed.nproc_per_node": 2,
                                                               "distributed.max_micro_batch": 4,
                                                               "performance.peak_tflops": 0.5}), tmp_path)
    pa, pb = final_params(one), final_params(two)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    rows = metric_rows(two)
    assert {(r["micro_batch"], r["accum"]) for r in read_jsonl(two / "steps.jsonl")} == {(4, 2)}
    assert rows[-1]["tokens"] == 16 * T * 47 and rows[-1]["test_ppl"] == pytest.approx(np.exp(rows[-1]["test_loss"]))
    assert all("test_acc" not in r and r.get("train_acc") is None for r in rows)
    # the console, captured (not a terminal): a line per log point with loss, tokens/s, ms/step and TFLOP/s
    lines = [x for x in two.output.splitlines() if x.startswith("[qhm-launch] step ")]
    steps = read_jsonl(two / "steps.jsonl")
    assert len(lines) == len(steps) == 47, two.output[-2000:]
    for line, row in zip(lines, steps):
        assert line.startswith(f"[qhm-launch] step {row['step']} | ") and f"loss {row['train_loss']:.4f}" in line
        assert "tokens/s (" in line and "/device)" in line and " ms/step" in line and "TFLOP/s/device" in line
    assert all(r["ms_per_step"] > 0 and r["tflops_per_s"] > 0 for r in steps[1:])
    # MFU against the recipe's peak (0.5 TFLOP/s a device): one device's share of the FLOP/s over it
    assert all(r["mfu"] == pytest.approx(r["tflops_per_s"] / 2 / 0.5, abs=2e-4) for r in steps[1:])
    assert all(f"MFU {100 * row['mfu']:.1f}%" in line for line, row in zip(lines, steps))
    said = [x for x in two.output.splitlines() if x.startswith("[qhm-launch] evaluation at step ")]
    assert len(said) == len([r for r in rows if r.get("mid_epoch")]) > 0 and "test_loss" in said[0]


def test_the_gpts_flops_per_token_are_a_hand_count():
    """6 N + 12 L T d (PaLM's appendix B, nanoGPT's estimate_mfu), against a count of every matmul by hand:
    per token and layer q/k/v (3 d^2 multiply-adds), the attention output (d^2) and the two MLP matrices
    (8 d^2), 2 x 12 d^2 FLOPs; the two attention products over T positions (2 x 2 T d); the output projection
    (2 d V); the backward twice the forward. Biases and norms are the N it also counts (under 1% here)."""
    from launcher.models.gpt import GPT, flops_per_token
    L, d, V, seq = 2, 256, 256, 64
    model = GPT(vocab=V, seq_len=seq, layers=L, heads=4, width=d)
    forward = L * (2 * 12 * d * d + 2 * 2 * seq * d) + 2 * d * V
    assert flops_per_token(model) == pytest.approx(3 * forward, rel=0.01)


def test_a_resume_mid_epoch_is_bitwise(token_files, tmp_path):
    recipe = lm_recipe(token_files, **{"checkpoint.every": "3K tokens", "checkpoint.keep": 100})
    run = train_ranks(recipe, tmp_path)
    reference = final_params(run), metric_rows(run)
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    kept = checkpoint_steps(run)[0]
    for step in checkpoint_steps(run)[1:]:
        shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    resumed = train_ranks(recipe, tmp_path)
    assert f"step-{kept:09d}" in resumed.output
    assert_bitwise(final_params(resumed), reference[0])
    assert metric_rows(resumed) == reference[1]


@pytest.mark.slow
def test_a_resume_onto_changed_token_files_is_refused(token_files, tmp_path):
    """kill -9 after a checkpoint, new text tokenized into the same files, the same command: refused in one
    line naming the file (it went on over the new text, reporting complete)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        shutil.copy(Path(token_files["train"]).parent / name, data / name)
    recipe = lm_recipe({"train": str(data / "train.bin"), "validation": str(data / "val.bin")},
                       **{"checkpoint.every": "3K tokens", "checkpoint.keep": 100})
    run = train_ranks(recipe, tmp_path)
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    ids[5000:5100] = (ids[5000:5100] + 1) % VOCAB                       # the same size, other contents
    ids.tofile(data / "train.bin")
    with pytest.raises(AssertionError, match="exit statuses \\[2, 2\\]") as failed:
        train_ranks(recipe, tmp_path)
    assert "qhm-launch: error: data.train: the token file changed since the checkpoint was written" in str(failed.value)
    assert not (run / "final_model.pt").exists() and not (run / "complete.json").exists()


def test_tokenize_never_writes_onto_token_files_a_device_or_a_file(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("some text to tokenize\n" * 50)
    assert main(["tokenize", str(text), "--out", str(tmp_path / "t")]) == 0
    before = (tmp_path / "t" / "train.bin").read_bytes()
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for out, expect in ((tmp_path / "t", "already holds train.bin, val.bin, meta.json"), (text, "is not a folder"),
                        (Path("/dev/null"), "is not a folder")):
        assert main(["tokenize", str(text), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err, err
    assert main(["tokenize", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "hold no text (0 bytes)" in capsys.readouterr().err
    assert (tmp_path / "t" / "train.bin").read_bytes() == before and text.read_text().startswith("some text")


MASKED = """
import numpy as np
import torch
from launcher.data.tokens import TokenWindows


class MaskedWindows(torch.utils.data.Dataset):
    def __init__(self, path):
        self.base = TokenWindows(path, {T}, np.uint16)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        x, y = self.base[i]
        y = y.clone()
        y[:(i * 5) % {T}] = -100                 # window i masks its first (5 i mod T) targets
        return x, y


def build():
    return {{"train": MaskedWindows({train!r}), "test": MaskedWindows({validation!r}), "num_classes": {vocab}}}
"""


def test_the_loss_of_masked_tokens_is_their_mean_over_the_global_batch(token_files, tmp_path, monkeypatch):
    """A data factory's windows with masked targets (-100), a different share in every window, so ranks
    and micro-batches hold different numbers of tokens that count. A hand computation: the first step's
    train_loss is the cross-entropy over the global batch's unmasked targets at the initial weights; 1
    process and 2 (uneven counts per rank) update alike."""
    (tmp_path / "masked_lm.py").write_text(MASKED.format(T=T, vocab=VOCAB, train=token_files["train"],
                                                         validation=token_files["validation"]))
    monkeypatch.syspath_prepend(str(tmp_path))
    over = {"data": {"factory": "masked_lm:build", "workers": 0}, "precision": "fp64", "train": {"steps": 4},
            "schedule.unit": "step", "schedule.batch": {"kind": "constant", "size": 16},
            "schedule.lr": {"kind": "constant", "max": 1e-2}, "eval.every": None}
    one = train_ranks(lm_recipe(token_files, "m1", **over, **{"distributed.nproc_per_node": 1}), tmp_path)
    two = train_ranks(lm_recipe(token_files, "m2", **over, **{"distributed.nproc_per_node": 2,
                                                              "distributed.max_micro_batch": 3}), tmp_path)
    import masked_lm
    from launcher.data import order
    from launcher.train import models
    first = order.GlobalBatchSampler(64, 3).permutation(0)[:16].tolist()       # the run's first global batch
    data = masked_lm.build()["train"]
    x = torch.stack([data[i][0] for i in first])
    y = torch.stack([data[i][1] for i in first])
    model = models.build(config.from_dict(lm_recipe(token_files, **over)).model, (T,), VOCAB, 3, torch.float64)
    expect = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)      # mean over counted ones
    assert int((y != -100).sum()) < 16 * T
    for run in (one, two):
        assert read_jsonl(run / "steps.jsonl")[0]["train_loss"] == pytest.approx(float(expect), rel=1e-12)
    pa, pb = final_params(one), final_params(two)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)


def test_adamw_with_clipping_is_torchs_adamw_on_a_plain_loop(token_files, tmp_path):
    """One process, constant batch and lr: the launcher's run equals a plain loop over the same windows
    (the keyed order read by hand) with torch.optim.AdamW on the same groups (decay on matrices only)
    and clip_grad_norm_ of the whole batch's gradient."""
    over = {"precision": "fp64", "distributed.nproc_per_node": 1, "train": {"steps": 12}, "schedule.unit": "step",
            "schedule.batch": {"kind": "constant", "size": 16}, "schedule.lr": {"kind": "constant", "max": 3e-3},
            "optimizer.clip_grad_norm": 0.05}
    recipe = lm_recipe(token_files, "plain", **over)
    run = train_ranks(recipe, tmp_path)
    from launcher.data import order
    from launcher.train import models
    resolved = config.from_dict(recipe)
    model = models.build(resolved.model, (T,), VOCAB, 3, torch.float64)
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("tokens", "positions"))]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("tokens", "positions")))]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.999), eps=1e-8)
    windows = tokens.TokenWindows(token_files["train"], T, np.uint16)
    perm = order.GlobalBatchSampler(len(windows), 3).permutation(0)
    clipped = []
    for k in range(12):
        idx = perm[16 * k:16 * (k + 1)].tolist()
        x, y = torch.stack([windows[i][0] for i in idx]), torch.stack([windows[i][1] for i in idx])
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        opt.step()
    mine = final_params(run)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(mine[name], p, rtol=1e-10, atol=1e-12)
    rows = read_jsonl(run / "steps.jsonl")
    assert [r["minibatch_grad_norm"] for r in rows] == pytest.approx(clipped, rel=1e-10)
    assert all(c > 0.05 for c in clipped[:3])              # the clipping did act


def test_qhadam_trains_through_the_launcher_as_qhm_qhadam(token_files, tmp_path):
    import qhm
    over = {"precision": "fp64", "distributed.nproc_per_node": 1, "train": {"steps": 6}, "schedule.unit": "step",
            "schedule.batch": {"kind": "constant", "size": 8}, "schedule.lr": {"kind": "constant", "max": 1e-3},
            "optimizer": {"name": "qhadam", "nus": [0.7, 1.0], "betas": [0.995, 0.999], "weight_decay": 0.0}}
    run = train_ranks(lm_recipe(token_files, "qha", **over), tmp_path)
    from launcher.data import order
    from launcher.train import models
    model = models.build(config.from_dict(lm_recipe(token_files, **over)).model, (T,), VOCAB, 3, torch.float64)
    opt = qhm.QHAdam(model.parameters(), lr=1e-3, betas=(0.995, 0.999), nus=(0.7, 1.0))
    windows = tokens.TokenWindows(token_files["train"], T, np.uint16)
    perm = order.GlobalBatchSampler(len(windows), 3).permutation(0)
    for k in range(6):
        idx = perm[8 * k:8 * (k + 1)].tolist()
        opt.zero_grad()
        F.cross_entropy(model(torch.stack([windows[i][0] for i in idx])).flatten(0, 1),
                        torch.stack([windows[i][1] for i in idx]).flatten()).backward()
        opt.step()
    mine = final_params(run)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(mine[name], p, rtol=1e-10, atol=1e-12)


def test_reports_of_a_language_model_lead_with_the_loss(token_files, tmp_path, capsys):
    run = train_ranks(lm_recipe(token_files, "rep"), tmp_path)
    assert "best test acc" not in run.output and "final test perplexity" in run.output
    # what the ids mean leaves with the model: the data folder's meta.json, copied into the run folder
    assert (run / "tokenizer" / "meta.json").read_bytes() == (Path(token_files["train"]).parent / "meta.json").read_bytes()
    # the final train loss is where the run ended (the last log window), the epoch's mean beside it, named
    window, mean = read_jsonl(run / "steps.jsonl")[-1]["train_loss"], metric_rows(run)[-1]["train_loss"]
    assert window != mean
    said = dict(line.strip().rsplit("  ", 1) for line in run.output.splitlines()
                if line.strip().startswith(("final train loss", "mean train loss, last epoch")))
    said = {k.strip(): v for k, v in said.items()}
    assert float(said["final train loss"]) == pytest.approx(window, rel=1e-4)
    assert float(said["mean train loss, last epoch"]) == pytest.approx(mean, rel=1e-4)
    assert "test_ppl" in run.output and "test_acc" not in run.output
    out = tmp_path / "p.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "1 curve(s) of test_loss from 1 run(s)" in said and out.stat().st_size > 10_000
    assert main(["plot", str(run), "--metric", "test_acc", "--out", str(out)]) == 2
    assert "--metric: 'test_acc' has no value in any run's epochs rows; allowed: a metric they carry" in \
        capsys.readouterr().err
    assert main(["report", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| final train loss | final test loss | best test loss | final test ppl |" in table
    assert "acc" not in table and "total tokens" in table
    assert f"| {window:.4f} |" in table.splitlines()[2]
    assert main(["report", str(run), "--target", "test_loss<=10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["tokens_to_target"] is not None
    # counts are whole numbers (an interpolated crossing too); the tokens column stays when none reached it
    for target in ("test_loss<=10", "test_loss<=3.7", "test_loss<=0.001"):
        assert main(["report", str(run), "--target", target]) == 0
        table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        assert table[0] == "| run | steps to target | SFO to target | tokens to target | seconds to target |"
        steps, sfo, tokens = (cell.strip().lstrip("~").replace(",", "") for cell in table[-1].split("|")[2:5])
        assert all(v == "not reached" for v in (steps, sfo, tokens)) if target.endswith("0.001") else \
            all(v.isdigit() for v in (steps, sfo, tokens)), table[-1]


def test_bounds_say_the_theory_is_qhms(token_files, tmp_path, capsys):
    path = write_recipe(tmp_path, lm_recipe(token_files))
    assert main(["bounds", str(path)]) == 0
    assert "note: the theorems are QHM's (Algorithm 1); this recipe trains with adamw" in capsys.readouterr().out


@pytest.mark.parametrize("over,expect", [
    ({"data.seq_len": None}, "data.seq_len: missing; allowed: an integer >= 1"),
    ({"data.train": "nowhere.bin"}, "data.train: 'nowhere.bin' is not a file"),
    ({"data.train": "x.txt"}, "data.train: 'x.txt' is not valid; allowed: a .bin"),
    ({"model.width": 30, "model.heads": 4}, "model.width: 30 is not valid; allowed: a multiple of model.heads (4)"),
    ({"optimizer.betas": [0.9, 1.0]}, "optimizer.betas: [0.9, 1.0] is not valid; allowed: two numbers in [0, 1)"),
    ({"optimizer.clip_grad_norm": 0}, "optimizer.clip_grad_norm: 0.0 is not valid; allowed: a number > 0"),
    ({"optimizer": {"name": "qhm", "nus": [0.5, 1.0]}}, "optimizer.nus: [0.5, 1.0] is not valid with optimizer.name 'qhm'"),
    ({"optimizer.decouple_weight_decay": False}, "optimizer.decouple_weight_decay: False is not valid with "
                                                 "optimizer.name adamw"),
    ({"loss.factory": "x:y"}, "loss.factory: 'x:y' is not valid with the built-in GPT"),
    ({"model.vocab": 10}, "is out of range for the model's vocabulary of 10"),
])
def test_bad_language_model_recipes_are_one_line(token_files, tmp_path, capsys, over, expect):
    from test_bad_input import one_clean_line, run_main
    path = write_recipe(tmp_path, lm_recipe(token_files, **over))
    one_clean_line(*run_main(["run", str(path)] if "vocabulary of" in expect or "not a file" in expect
                             else ["plan", str(path)], capsys), expect)


def test_a_gpt_on_image_data_is_refused(capsys):
    from test_bad_input import SMOKE, one_clean_line, run_main
    one_clean_line(*run_main(["plan", SMOKE, "--set", "model={name: gpt}"], capsys),
                   "model.name: 'gpt' is not valid with data.dataset 'digits'")


@pytest.mark.e2e
def test_deepspeed_clips_with_its_own_gradient_clipping_as_ddp_does(token_files, tmp_path):
    pytest.importorskip("deepspeed")
    over = {"precision": "fp64", "train": {"steps": 8}, "schedule.unit": "step",
            "schedule.batch": {"kind": "constant", "size": 16}, "schedule.lr": {"kind": "constant", "max": 3e-3},
            "optimizer": {"name": "qhm", "clip_grad_norm": 0.05}, "eval.every": None}
    ddp = train_ranks(lm_recipe(token_files, "cd", **over), tmp_path)
    path = write_recipe(tmp_path, lm_recipe(token_files, "cz", **over, **{"distributed.engine": "deepspeed",
                                                                          "distributed.zero_stage": 2}))
    cli(["run", str(path)], cwd=tmp_path, check=0)                 # DeepSpeed through the real launcher
    unclipped = train_ranks(lm_recipe(token_files, "cu", **{**over, "optimizer": {"name": "qhm"}}), tmp_path)
    pa, pb, pc = final_params(ddp), final_params(tmp_path / "runs" / "cz"), final_params(unclipped)
    # DeepSpeed measures its global norm in float32: the runs agree to its rounding, not to float64's
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-7)
    assert max(float((pb[k] - pc[k]).abs().max()) for k in pa) > 1e-4      # and clipping changed the run


@pytest.mark.e2e
def test_the_embedded_demo_runs_offline_from_the_repository(tmp_path, capsys):
    """recipes/lm/demo.yaml as `make demo-lm` runs it (shortened): the standard library tokenized into the
    working folder, a GPT trained through torchrun on 2 processes, its loss figure drawn."""
    from helpers import ROOT
    done = cli(["run", str(ROOT / "recipes" / "lm" / "demo.yaml"), "--set", "train.tokens=60K", "--set",
                "schedule.batch.points=[[0, 8], [20K, 16]]", "--set", "schedule.lr.decay=20K", "--set",
                "eval.every=20K tokens", "--set", "schedule.lr.warmup=5K"], cwd=tmp_path, check=0)
    assert "tokenized" in done.stderr and (tmp_path / "runs" / "lm-data" / "train.bin").stat().st_size > 1_000_000
    run = tmp_path / "runs" / "lm-demo"
    assert (run / "final_model.pt").exists() and "final test perplexity" in done.stdout
    assert main(["plot", str(run), "--x", "tokens", "--out", str(tmp_path / "loss.png")]) == 0
    assert "curve(s) of test_loss" in capsys.readouterr().out


def _hostile(folder: Path, case: str) -> Path:
    """A token folder made hostile one way; returns the train file the recipe names."""
    folder.mkdir()
    ids = np.arange(2_000, dtype=np.uint16) % 40
    ids.tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab": 40, "dtype": "uint16"}))
    train = folder / "train.bin"
    if case == "empty":
        train.write_bytes(b"")
    elif case == "odd length":
        train.write_bytes(ids.tobytes() + b"\x01")
    elif case in ("float npy", "object npy", "truncated npy", "int32 npy past vocab"):
        train = folder / "train.npy"
        if case == "float npy":
            np.save(train, ids.astype(np.float32))
        elif case == "object npy":
            np.save(train, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
        elif case == "truncated npy":
            np.save(train, ids.astype(np.int32))
            train.write_bytes(train.read_bytes()[:40])
        else:
            np.save(train, (ids.astype(np.int32) + 1000))
    elif case == "bogus dtype":
        ids.tofile(train)
        (folder / "meta.json").write_text(json.dumps({"vocab": 40, "dtype": "uint17"}))
    elif case == "float dtype":
        ids.tofile(train)
        (folder / "meta.json").write_text(json.dumps({"vocab": 40, "dtype": "float32"}))
    elif case == "text vocab":
        ids.tofile(train)
        (folder / "meta.json").write_text(json.dumps({"vocab": "forty", "dtype": "uint16"}))
    elif case == "meta a list":
        ids.tofile(train)
        (folder / "meta.json").write_text("[]")
    elif case == "id past vocab":
        bad = ids.copy()
        bad[1_500] = 41
        bad.tofile(train)
    return train


HOSTILE = {"empty": "holds 0 bytes, not a whole number of uint16 ids",
           "odd length": "holds 4,001 bytes, not a whole number of uint16 ids",
           "float npy": "its array is float32; allowed: integer token ids",
           "object npy": "is not a readable .npy array of token ids",
           "truncated npy": "is not a readable .npy array of token ids",
           "int32 npy past vocab": "holds the id 1,039 (or a negative one), outside the vocabulary of 40",
           "bogus dtype": "meta.json's dtype is 'uint17'", "float dtype": "meta.json's dtype is float32",
           "text vocab": "vocab 'forty' is not valid", "meta a list": "holds a list; allowed: an object",
           "id past vocab": "holds the id 41 (or a negative one), outside the vocabulary of 40"}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_token_data_is_one_line_before_any_worker(tmp_path, capsys, case):
    train = _hostile(tmp_path / "data", case)
    recipe = lm_recipe({"train": str(train), "validation": str(tmp_path / "data" / "val.bin")})
    recipe["model"]["vocab"] = None
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert HOSTILE[case] in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt"))


def test_without_metadata_the_vocabulary_is_the_largest_id_plus_one_said_once(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    ids = np.arange(4_000, dtype=np.uint16) % 238            # nanoGPT's char-level layout, no meta.json
    ids.tofile(folder / "train.bin")
    ids[:1_000].tofile(folder / "val.bin")
    cfg = config.from_dict(lm_recipe({"train": str(folder / "train.bin"),
                                      "validation": str(folder / "val.bin")})).data
    said = []
    assert tokens.vocabulary(cfg, say=said.append) == 238
    assert len(said) == 1 and "the vocabulary is 238, the files' largest id + 1" in said[0]
    link = tmp_path / "elsewhere" / "train.bin"                # a link: meta.json is read beside its target
    link.parent.mkdir()
    link.symlink_to(folder / "train.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab": 256, "dtype": "uint16"}))
    cfg = config.from_dict(lm_recipe({"train": str(link), "validation": str(folder / "val.bin")})).data
    assert tokens.vocabulary(cfg) == 256


@pytest.mark.parametrize("budget", [{"eval.max_batches": 2}, {"eval.max_tokens": "256 tokens"}])
def test_an_evaluation_reads_at_most_its_budget_the_same_spread_windows(token_files, tmp_path, monkeypatch, budget):
    """A validation file 50x the budget (2 batches of 8 windows, or 256 tokens: 16 windows): the pass reads
    those 16 windows and no other, spread over the file (window floor(i * 800 / 16)), the same every time; its
    loss is the mean over their tokens, computed here by hand."""
    from types import SimpleNamespace

    from launcher.train import build, evaluation, losses, models
    monkeypatch.chdir(tmp_path)                    # the run folder (its tokenizer/ copy) goes here
    rng = np.random.default_rng(1)
    big = Path(token_files["train"]).parent / "val_big.bin"
    rng.integers(0, VOCAB, 800 * T + 1).astype(np.uint16).tofile(big)
    recipe = config.from_dict(lm_recipe(token_files, **{"data.validation": str(big), "eval.batch_size": 8}, **budget))
    comm = SimpleNamespace(is_main=True, barrier=lambda: None, device=torch.device("cpu"), rank=0, world=1,
                           all_reduce_sum=lambda t: t)
    dataset = build.load_data(recipe, comm, torch.float32)
    assert len(dataset.test) == 16
    model = models.build(recipe.model, dataset.shape, dataset.num_classes, 0, torch.float32)
    read: list[int] = []
    original = tokens.TokenWindows.__getitem__
    monkeypatch.setattr(tokens.TokenWindows, "__getitem__", lambda self, i: (read.append(int(i)), original(self, i))[1])
    loss_fn = losses.from_recipe(recipe.loss, per_token=True)
    passes = [evaluation.evaluate(model, dataset.test, comm, 8, torch.autocast("cpu", enabled=False), loss_fn)[0]
              for _ in range(2)]
    spread = [i * 800 // 16 for i in range(16)]
    assert read == spread * 2 and passes[0] == passes[1]
    ids = torch.from_numpy(np.fromfile(big, dtype=np.uint16).astype(np.int64))
    x = torch.stack([ids[i * T:(i + 1) * T] for i in spread])
    y = torch.stack([ids[i * T + 1:(i + 1) * T + 1] for i in spread])
    with torch.no_grad():
        by_hand = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).item()
    assert passes[0] == pytest.approx(by_hand, rel=1e-6)


def test_eval_budget_keys_are_one_line(token_files, capsys):
    for over, expect in [({"eval.max_batches": 0}, "eval.max_batches: 0"),
                         ({"eval.max_batches": 1, "eval.max_tokens": "1K"}, "eval.max_tokens: '1K' is not valid with"),
                         ({"eval.max_tokens": "1K samples"}, "eval.max_tokens: '1K samples'")]:
        with pytest.raises(Exception) as info:
            config.from_dict(lm_recipe(token_files, **over))
        assert str(info.value).startswith(expect), str(info.value)
    with pytest.raises(Exception) as info:
        config.from_dict(base_recipe(**{"eval.max_tokens": "1K"}))
    assert "eval.max_tokens: '1K' is not valid: the samples' tokens are not known" in str(info.value)


def test_the_peak_for_mfu_is_the_recipes_or_a_known_gpus_16_bit_dense_peak():
    from launcher.train.report import peak_tflops
    bf16 = config.from_dict(base_recipe(precision="bf16"))
    cuda = torch.device("cuda")
    assert peak_tflops(bf16, cuda, "NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops(bf16, cuda, "NVIDIA H100 PCIe") == 756.0
    assert peak_tflops(bf16, cuda, "NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops(bf16, cuda, "Some Future GPU") is None
    assert peak_tflops(config.from_dict(base_recipe(precision="fp32")), cuda, "NVIDIA H100 80GB HBM3") is None
    assert peak_tflops(bf16, torch.device("cpu")) is None
    assert peak_tflops(config.from_dict(base_recipe(**{"performance.peak_tflops": 3.5})), torch.device("cpu")) == 3.5
    with pytest.raises(Exception, match=r"performance.peak_tflops: -1.0 is not valid"):
        config.from_dict(base_recipe(**{"performance.peak_tflops": -1}))


def test_batches_given_in_tokens_are_that_many_seq_len_windows(token_files):
    """"1024 tokens" at seq_len 16 is a batch of 64 windows: the recipe resolves to the same schedule as one that
    says 64; a count that is no whole number of windows, or tokens without a seq_len, is one line."""
    in_tokens = config.from_dict(lm_recipe(token_files, **{
        "schedule.batch": {"kind": "steps", "points": [[0, "256 tokens"], ["6K", "512 tokens"]]}}))
    assert in_tokens.schedule.batch.points == [[0, 16], ["6K", 32]]
    assert config.from_dict(lm_recipe(token_files, **{"schedule.batch": {"kind": "constant", "size": "1024 tokens"}})
                            ).schedule.batch.size == 64
    grown = config.from_dict(lm_recipe(token_files, **{"schedule.batch": {"kind": "exponential", "initial": "256 tokens",
                                                                          "growth": 2}}))
    assert grown.schedule.batch.initial == 16 and grown.batch_spec()(0) == 16
    for batch, expect in [({"kind": "constant", "size": "1000 tokens"},
                           "schedule.batch.size: '1000 tokens' is not valid: 1,000 tokens is no whole number of 16-token"),
                          ({"kind": "constant", "size": "3 steps"}, "schedule.batch.size: '3 steps' is not valid; allowed: "
                                                                    "a batch in samples or tokens")]:
        with pytest.raises(Exception) as info:
            config.from_dict(lm_recipe(token_files, **{"schedule.batch": batch}))
        assert str(info.value).startswith(expect), str(info.value)
    with pytest.raises(Exception, match="the samples' tokens are not known"):
        config.from_dict(base_recipe(**{"schedule.batch": {"kind": "constant", "size": "1K tokens"}}))


def test_plan_speaks_the_runs_unit_and_optimizer(token_files, tmp_path, capsys):
    """AdamW reads no beta or gamma: the table has no such columns; each batch's tokens beside it; a batch that
    leaves ranks idle is named by its steps (the batch changes inside an epoch), not by "epochs 0-0"."""
    path = write_recipe(tmp_path, lm_recipe(token_files, **{"schedule.batch": {"kind": "steps",
                                                                               "points": [[0, 2], ["6K", 32]]}}))
    assert main(["plan", str(path), "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.strip().startswith("steps"))
    assert "beta" not in head and "gamma" not in head and "tokens" in head, head
    assert " 512 " in out                      # batch 32 at seq_len 16
    assert "warning: steps 0-" in out and "epochs 0-0" not in out, out
    qhm_recipe = write_recipe(tmp_path, lm_recipe(token_files, **{"optimizer": {"name": "qhm"}}), "q.yaml")
    assert main(["plan", str(qhm_recipe)]) == 0
    assert "beta" in capsys.readouterr().out


def _shards(folder: Path, parity: int, files: int, tokens: int) -> None:
    """``files`` shards of ids of one parity (even: source A, odd: source B), so a window says its source."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(parity)
    for k in range(files):
        ids = (rng.integers(0, VOCAB // 2, tokens) * 2 + parity).astype(np.uint16)
        ids.tofile(folder / f"part-{k:02d}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab": VOCAB, "dtype": "uint16"}))


def mixed_recipe(tmp_path, token_files, name="mix", **over) -> dict:
    _shards(tmp_path / "a", 0, 3, 2_000)
    _shards(tmp_path / "b", 1, 2, 1_500)
    return lm_recipe(token_files, name, **{
        "data.train": {str(tmp_path / "a" / "part-*.bin"): 0.75, str(tmp_path / "b" / "part-*.bin"): 0.25},
        "train": {"tokens": "4K"}, "schedule.lr": {"kind": "constant", "max": 3e-3}, **over})


def test_two_sources_weighted_three_to_one_give_that_mixture_of_the_windows_trained_on(token_files, tmp_path):
    """Source A (3 shards, even ids, 372 windows) and B (2 shards, odd ids, 186 windows), weights 0.75/0.25: an
    epoch of 558 windows holds round(0.75 x 558) = 418 of A (all of them, 46 twice) and 140 of B (a fixed subset,
    none twice), counted by reading every window the epoch trains on."""
    from launcher.data import order
    cfg = config.from_dict(mixed_recipe(tmp_path, token_files)).data
    train, _, vocab = tokens.load(cfg)
    assert vocab == VOCAB and len(train) == 3 * (1_999 // T) + 2 * (1_499 // T)
    n = len(train)
    epoch = order.GlobalBatchSampler(n, 3, torch.device("cpu")).permutation(0).tolist()
    assert sorted(epoch) == list(range(n))                     # the keyed order: each window of the epoch once
    sources = [int(train[i][0][0]) % 2 for i in epoch]
    assert sources.count(0) == round(0.75 * n) and sources.count(1) == n - round(0.75 * n)
    a = [tuple(train[i][0].tolist()) for i in range(n) if int(train[i][0][0]) % 2 == 0]
    b = [tuple(train[i][0].tolist()) for i in range(n) if int(train[i][0][0]) % 2 == 1]
    assert len(set(a)) == 372 and len(a) == 418            # A grown: every window, some twice
    assert len(set(b)) == len(b) == 140                    # B cut to a subset: no window twice
    assert tokens.windows(cfg, "train").picks.tolist() == train.picks.tolist()     # the same every time


def test_a_weighted_mixture_of_shards_trains_alike_on_one_and_two_processes(token_files, tmp_path):
    over = {"precision": "fp64", "schedule.batch": {"kind": "constant", "size": 16}}
    one = train_ranks(mixed_recipe(tmp_path, token_files, "one", **over, **{
        "distributed.nproc_per_node": 1, "distributed.max_micro_batch": 16}), tmp_path)
    two = train_ranks(mixed_recipe(tmp_path, token_files, "two", **over, **{
        "distributed.nproc_per_node": 2, "distributed.max_micro_batch": 4}), tmp_path)
    pa, pb = final_params(one), final_params(two)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)


def test_a_nanogpt_char_folder_reads_its_vocabulary_from_meta_pkl_and_only_a_plain_one(tmp_path, capsys):
    """nanoGPT's shakespeare_char: uint16 train.bin/val.bin and meta.pkl {vocab_size: 65, itos, stoi}, no
    meta.json: the vocabulary is 65 (not 65,536, not the largest id + 1); a meta.pkl that names a class is
    one line and is never run."""
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\nABCDEFGHIJKLMNOPQRSTUVWXYZ!?$&';-3"))
    chars = (chars + [chr(c) for c in range(0x100, 0x100 + 65)])[:65]
    ids = np.random.default_rng(0).integers(0, 60, 3_000).astype(np.uint16)     # the largest id 59: not 65
    ids[:2_500].tofile(folder / "train.bin")
    ids[2_500:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    recipe = lm_recipe({"train": str(folder / "train.bin"), "validation": str(folder / "val.bin")})
    cfg = config.from_dict(recipe).data
    assert tokens.vocabulary(cfg) == 65
    recipe["train"], recipe["schedule"]["lr"] = {"tokens": "2K"}, {"kind": "constant", "max": 3e-3}
    run = train_ranks(recipe, tmp_path)                 # it trains, with an embedding of 65 ids
    embeddings = [v for k, v in final_params(run).items() if v.dim() == 2 and v.shape[0] == 65]
    assert embeddings and not [k for k, v in final_params(run).items() if v.dim() == 2 and v.shape[0] in (60, 65_536)]
    assert (run / "tokenizer" / "meta.pkl").is_file()
    path = write_recipe(tmp_path, recipe)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": Evil()}, f)
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert len(lines) == 1 and "meta.pkl' is not a pickle of plain values (it names builtins.print)" in lines[0], lines
    assert "ran" not in captured.out


def test_a_headerless_npy_reads_with_its_declared_dtype_and_without_one_is_one_line(token_files, tmp_path, capsys):
    """OLMo's token files: raw ids named .npy, no numpy header: with data.dtype they are those ids; without
    anything that says the dtype, one line."""
    folder = tmp_path / "olmo"
    folder.mkdir()
    ids = np.fromfile(token_files["train"], dtype=np.uint16).astype(np.uint32)
    ids.tofile(folder / "part-0.npy")
    np.fromfile(token_files["validation"], dtype=np.uint16).astype(np.uint32).tofile(folder / "val.npy")
    recipe = lm_recipe(token_files, **{"data.train": str(folder / "part-*.npy"), "data.validation": str(folder / "val.npy"),
                                       "data.dtype": "uint32", "data.vocab": VOCAB})
    train, _, _ = tokens.load(config.from_dict(recipe).data)
    reference = tokens.TokenWindows(token_files["train"], T, np.uint16)
    assert len(train) == len(reference) and all(torch.equal(train[i][0], reference[i][0]) for i in (0, 7, 400))
    path = write_recipe(tmp_path, recipe)
    assert main(["plan", str(path)]) == 0                  # a glob in plan: it reads the shards
    capsys.readouterr()
    recipe["data"]["dtype"] = None
    assert main(["run", str(write_recipe(tmp_path, recipe, "r2.yaml"))]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "is a .npy without numpy's header" in err[0] and "allowed: data.dtype" in err[0], err
    recipe["data"]["train"] = str(folder / "nothing-*.npy")
    assert main(["plan", str(write_recipe(tmp_path, recipe, "r3.yaml"))]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "matches no file" in err[0], err


def test_a_factorys_model_may_say_its_own_flops_per_token():
    from launcher import models
    from launcher.config import ModelSpec

    class Counted(torch.nn.Linear):
        flops_per_token = 1.5e9

    class Counting(torch.nn.Linear):
        def flops_per_token(self):
            return 6.0e6
    spec = ModelSpec(factory="pkg:fn")
    assert models.flops_per_token(spec, Counted(2, 2)) == 1.5e9
    assert models.flops_per_token(spec, Counting(2, 2)) == 6.0e6
    assert models.flops_per_token(spec, torch.nn.Linear(2, 2)) is None


@pytest.mark.e2e
def test_kill_9_of_a_run_on_a_weighted_mixture_of_shards_resumes_bitwise(token_files, tmp_path):
    """torchrun on 2 processes over two weighted sources of shards, killed with SIGKILL once its first
    checkpoint exists: the same command resumes it bitwise the run that never stopped (in-process)."""
    from helpers import assert_kill_9_resumes_bitwise
    assert_kill_9_resumes_bitwise(tmp_path, mixed_recipe(tmp_path, token_files, **{"checkpoint.every": "1K tokens",
                                                                                   "checkpoint.keep": 100}))
