"""``qhm-launch export --format hf``: the folder it writes loads in ``transformers`` with no code of ours, and
its logits equal the launcher's own model's on the same ids (the reference: our module with the same
weights), from the final model and from DDP, FSDP (sharded DCP) and DeepSpeed checkpoints."""
import json

import pytest
import torch

from helpers import VOCAB, T, checkpoint_steps, lm_recipe, train_ranks
from launcher import config
from launcher.cli.main import main
from launcher.train import export, models

transformers = pytest.importorskip("transformers")

LLAMA = {"name": "llama", "layers": 2, "heads": 4, "kv_heads": 2, "width": 32, "ffn_width": 48}


def ours(run, state: dict) -> torch.nn.Module:
    """The launcher's model of ``run`` holding ``state``."""
    recipe = config.load(run / "recipe.yaml", [])
    module = models.build(recipe.model, (T,), VOCAB, 0, torch.float32)
    module.load_state_dict(state)
    return module.eval()


def assert_same_logits(run, out, state: dict, architecture: str) -> None:
    loaded = getattr(transformers, architecture).from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = ours(run, {k: v.float() for k, v in state.items()})(ids)
        got = loaded(ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, architecture", [({"name": "gpt", "layers": 2, "heads": 2, "width": 32}, "GPT2LMHeadModel"),
                                                 (dict(LLAMA), "LlamaForCausalLM"),
                                                 ({**LLAMA, "tie_embeddings": True}, "LlamaForCausalLM")],
                         ids=["gpt", "llama", "llama-tied"])
def test_the_exported_folder_loads_in_transformers_with_the_same_logits(token_files, tmp_path, capsys, model,
                                                                         architecture):
    run = train_ranks(lm_recipe(token_files, model["name"], model=model, **{"checkpoint.every": "6K tokens"}), tmp_path)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"exported final_model.pt of {run} as {architecture}" in said and "meta.json" in said
    assert (out / "model.safetensors").is_file() and (out / "meta.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    assert_same_logits(run, out, torch.load(run / "final_model.pt", weights_only=True), architecture)
    # a checkpoint of the run, by its step: DDP's replicated state
    step = checkpoint_steps(run)[0]
    assert main(["export", str(run), "--step", str(step), "--format", "hf", "--out", str(tmp_path / "at")]) == 0
    state, source = export.model_state(export.RunFolder(run), step)
    assert source == f"checkpoint step-{step:09d}"
    assert_same_logits(run, tmp_path / "at", state, architecture)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2      # never over what is there
    assert "--out: " in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("engine", [{"distributed.engine": "fsdp"},
                                    {"distributed.engine": "deepspeed", "distributed.zero_stage": 3},
                                    {"distributed.engine": "deepspeed", "distributed.zero_stage": 0}],
                         ids=["fsdp", "zero3", "zero0"])
def test_export_reads_a_sharded_or_deepspeed_checkpoint_without_a_process_group(token_files, tmp_path, engine):
    """The newest checkpoint of a run killed before its end (final model gone): FSDP's DCP shards and
    DeepSpeed's partitions consolidated offline; the same weights as the run's final model where the
    checkpoint is at the last step."""
    recipe = lm_recipe(token_files, "sharded", model=dict(LLAMA), **{"checkpoint.every": "6K tokens", **engine})
    if engine["distributed.engine"] == "deepspeed":
        recipe["optimizer"] = {"name": "adamw", "weight_decay": 0.1}    # DeepSpeed clips with its own setting
    run = train_ranks(recipe, tmp_path)
    final = torch.load(run / "final_model.pt", weights_only=True)
    (run / "final_model.pt").unlink()
    state, source = export.model_state(export.RunFolder(run), None)
    assert source == f"checkpoint step-{checkpoint_steps(run)[-1]:09d}"
    for k in final:
        torch.testing.assert_close(state[k].float(), final[k].float(), rtol=0, atol=0)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert_same_logits(run, tmp_path / "hf", state, "LlamaForCausalLM")


def test_a_model_the_mapping_cannot_express_is_one_line(tmp_path, capsys):
    from helpers import base_recipe
    run = train_ranks(base_recipe(epochs=1, **{"distributed.nproc_per_node": 1}), tmp_path)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "--format: hf cannot express model 'small_cnn'" in err[0] and "gpt | llama" in err[0], err
    assert not (tmp_path / "hf").exists()
    assert main(["export", str(run), "--step", "999", "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
