"""The built-in Llama-style model: its FLOPs against a hand count, equivalence across process counts and
engines (float64), activation checkpointing that changes no bit, and a resume that is bitwise; each against
an independent reference (a hand computation, another world size, the same run without the feature)."""
import pytest
import torch

from helpers import (VOCAB, T, assert_bitwise, assert_kill_9_resumes_bitwise, cli, final_params, lm_recipe,
                     metric_rows, train_ranks, write_recipe)
from launcher import config
from launcher.cli.main import main

LLAMA = {"name": "llama", "layers": 2, "heads": 4, "kv_heads": 2, "width": 32, "ffn_width": 48}


def llama_recipe(token_files, name="llama", **over) -> dict:
    return lm_recipe(token_files, name, **{"model": dict(LLAMA), **over})


def test_the_llamas_flops_per_token_are_a_hand_count():
    """Per token and layer, forward: 2 x (q, k, v, o and the three SwiGLU matrices) multiply-adds, plus 2 x 2
    T d for the scores and the weighted sum over every query head (grouped keys change only k and v's size);
    then the head, 2 d V; backward twice the forward."""
    from launcher.models import llama
    L, d, heads, kv, f, V, seq = 3, 64, 8, 2, 160, 1000, 128
    model = llama.Llama(vocab=V, seq_len=seq, layers=L, heads=heads, kv_heads=kv, width=d, ffn_width=f)
    hd = d // heads
    per_layer = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f) + 2 * 2 * seq * d
    forward = L * per_layer + 2 * d * V
    assert llama.flops_per_token(model) == pytest.approx(3 * forward, rel=0.01)
    tied = llama.Llama(vocab=V, seq_len=seq, layers=L, heads=heads, kv_heads=kv, width=d, ffn_width=f,
                       tie_embeddings=True)
    assert llama.flops_per_token(tied) == pytest.approx(3 * forward, rel=0.01)     # the tied matrix counts once


def test_one_process_micro16_equals_two_processes_micro4_accum2_and_checkpointing_changes_no_bit(token_files, tmp_path):
    over = {"precision": "fp64", "schedule.batch": {"kind": "constant", "size": 16}}
    one = train_ranks(llama_recipe(token_files, "one", **over, **{"distributed.nproc_per_node": 1,
                                                                  "distributed.max_micro_batch": 16}), tmp_path)
    two = llama_recipe(token_files, "two", **over, **{"distributed.nproc_per_node": 2, "distributed.max_micro_batch": 4})
    plain = train_ranks(two, tmp_path)
    pa, pb = final_params(one), final_params(plain)
    assert pa["tokens.weight"].shape == (VOCAB, 32) and "blocks.0.self_attn.k_proj.weight" in pa
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    two["name"], two["performance"] = "two-ac", {"activation_checkpointing": True}
    checkpointed = train_ranks(two, tmp_path)
    assert_bitwise(final_params(checkpointed), pb)
    assert metric_rows(checkpointed) == metric_rows(plain)


@pytest.mark.slow
def test_fsdp_equals_ddp_with_and_without_activation_checkpointing(token_files, tmp_path):
    over = {"precision": "fp64", "schedule.batch": {"kind": "constant", "size": 16},
            "distributed.max_micro_batch": 4}
    ddp = final_params(train_ranks(llama_recipe(token_files, "ddp", **over), tmp_path))
    fsdp_recipe = llama_recipe(token_files, "fsdp", **over, **{"distributed.engine": "fsdp"})
    fsdp = final_params(train_ranks(fsdp_recipe, tmp_path))
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-10, atol=1e-12)
    fsdp_recipe["name"], fsdp_recipe["performance"] = "fsdp-ac", {"activation_checkpointing": True}
    assert_bitwise(final_params(train_ranks(fsdp_recipe, tmp_path)), fsdp)


@pytest.mark.e2e
def test_kill_9_of_a_llama_run_resumes_bitwise(token_files, tmp_path):
    """torchrun on 2 processes killed with SIGKILL (the whole tree) once its first checkpoint exists; the same
    command resumes it, bitwise the run that never stopped (trained in-process: the reference)."""
    assert_kill_9_resumes_bitwise(tmp_path, llama_recipe(token_files, **{"checkpoint.every": "3K tokens",
                                                                         "checkpoint.keep": 100}))


@pytest.mark.parametrize("over, expect", [
    ({"model.kv_heads": 3}, "model.kv_heads: 3 is not valid; allowed: a divisor of model.heads (4)"),
    ({"model.width": 36}, "model.width: 36 is not valid; allowed: a multiple of model.heads (4) whose head size is even"),
    ({"model.rope_theta": -1.0}, "model.rope_theta: -1.0 is not valid; allowed: a number > 0"),
    ({"model.name": "lama"}, "model.name: 'lama' is not valid; allowed: "),
])
def test_bad_llama_settings_are_one_line(token_files, tmp_path, capsys, over, expect):
    path = write_recipe(tmp_path, llama_recipe(token_files, **over))
    assert main(["plan", str(path)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and expect in err[0], err


def test_activation_checkpointing_is_refused_where_there_are_no_blocks(capsys):
    from helpers import base_recipe
    with pytest.raises(Exception, match=r"performance.activation_checkpointing: true is not valid with model "
                                        r"'small_cnn'; allowed: false, or a built-in model with blocks \(gpt \| llama\)"):
        config.from_dict(base_recipe(**{"performance.activation_checkpointing": True}))


def test_the_llama_demo_recipe_plans_on_two_processes(capsys):
    """recipes/lm/llama.yaml: the Llama-style demo (its 2-process run is in the e2e tier: test_demos)."""
    from helpers import ROOT
    assert main(["plan", str(ROOT / "recipes" / "lm" / "llama.yaml"), "--nproc", "2", "--n", "5000"]) == 0
    assert "optimizer steps" in capsys.readouterr().out
    assert T == 16


@pytest.mark.e2e
def test_the_llama_demo_runs_on_two_processes(tmp_path):
    """recipes/lm/llama.yaml through torchrun on 2 CPU processes (shortened): the standard library tokenized,
    the Llama-style model trained with activation checkpointing, complete with its tokenizer files."""
    from helpers import ROOT
    done = cli(["run", str(ROOT / "recipes" / "lm" / "llama.yaml"), "--set", "train.tokens=40K", "--set",
                "schedule.batch.points=[[0, 8], [20K, 16]]", "--set", "schedule.lr.decay=10K", "--set",
                "schedule.lr.warmup=2K", "--set", "eval.every=20K tokens"], cwd=tmp_path, check=0)
    run = tmp_path / "runs" / "lm-llama"
    assert (run / "final_model.pt").exists() and "final test perplexity" in done.stdout
    assert (run / "tokenizer" / "meta.json").is_file()
    assert sum(line.startswith("[qhm-launch] step ") for line in done.stdout.splitlines()) >= 2
