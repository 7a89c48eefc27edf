"""Writes the paper's recipes (one per curve of Figures 1-4, and the ViT-Tiny variants) and the grid
sweeps. Run from anywhere: python recipes/paper/generate.py. The YAML files are committed; edit this
file, not them.

Settings from the paper (Section 4): ResNet-18 (CIFAR stem) on CIFAR-100, M = 300, E = 30; batch small
2^8, large 2^12, increasing 2^3 doubling every 30 epochs; alpha_min = 0, p = 2; beta and gamma halved
every E (lambda = zeta = 0.5, as the paper's code: its text prints 2). The grid-searched alpha_max,
beta and gamma per curve are not stated in the text we have, so every recipe uses the grid's middle
(alpha_max 0.1, beta 0.9 / beta_min 0.5, gamma 0.7); the sweep files cover the paper's whole grid.
"""
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
LRS = ("constant", "sqrt_decay", "decay", "cosine", "polynomial")
BATCHES = {"small": {"kind": "constant", "size": 256}, "large": {"kind": "constant", "size": 4096},
           "increasing": {"kind": "exponential", "initial": 8, "growth": 2}}


def recipe(name, model, optimizer, lr, batch, beta, gamma):
    return {
        "name": name, "output": "runs/paper", "seed": 0, "epochs": 300,
        # the authors' code adds RandomRotation(15) to crop and flip for CIFAR-100
        "data": {"dataset": "cifar100", "root": "data/cifar", "download": False, "augment": True, "rotation": 15.0},
        "model": model, "precision": "fp32",
        "optimizer": {"name": optimizer, "weight_decay": 0.0},
        "schedule": {"interval": 30, "batch": BATCHES[batch],
                     "lr": {"kind": lr, "max": 0.1, "min": 0.0, "power": 2.0},
                     "beta": beta, "gamma": gamma},
        # the paper trained every batch (up to 4096) in one pass on one GPU, so batch norm saw the whole
        # batch: one micro-batch per step reproduces that (see README: batch norm)
        "distributed": {"engine": "ddp", "nproc_per_node": 1, "max_micro_batch": 4096, "batch_norm": "local"},
        "eval": {"every_epochs": 1, "full_grad_norm": True, "grad_norm_mode": "exact", "batch_size": 1000},
        "checkpoint": {"every_steps": 1000, "keep": 3},
        "tracking": {"wandb": {"mode": "offline", "project": "qhm-paper", "group": name, "tags": ["paper"]}},
    }


STEP_BETA = {"kind": "step_decay", "max": 0.9, "factor": 0.5}
STEP_GAMMA = {"kind": "step_decay", "max": 0.7, "factor": 0.5}
BETAS_NSHB = {"constant": {"kind": "constant", "max": 0.9}, "increasing": {"kind": "increasing", "min": 0.5}}


def main():
    written = []
    for model, tag in (("resnet18", "resnet18"), ("vit_tiny", "vittiny")):
        for lr in LRS:
            for batch in BATCHES:
                name = f"{tag}-qhm-{lr}-{batch}"
                written.append((name, recipe(name, model, "qhm", lr, batch, STEP_BETA, STEP_GAMMA)))
    for lr in LRS:
        for beta_name, beta in BETAS_NSHB.items():
            name = f"resnet18-nshb-{lr}-{beta_name}beta-increasing"
            written.append((name, recipe(name, "resnet18", "nshb", lr, "increasing", beta,
                                         {"kind": "constant", "max": 1.0})))
    for name, r in written:
        (HERE / f"{name}.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    sweeps = {
        "sweep-qhm-grid.yaml": {"recipe": "resnet18-qhm-cosine-increasing.yaml", "name": "qhm-grid",
                                "grid": {"schedule.lr.max": [0.05, 0.1, 0.25, 0.5],
                                         "schedule.beta.max": [0.3, 0.5, 0.9],
                                         "schedule.gamma.max": [0.2, 0.4, 0.7]},
                                "seeds": [0, 1, 2]},
        "sweep-nshb-grid.yaml": {"recipe": "resnet18-nshb-decay-increasingbeta-increasing.yaml", "name": "nshb-grid",
                                 "grid": {"schedule.lr.max": [0.05, 0.1, 0.25, 0.5],
                                          "schedule.beta.min": [0.3, 0.5, 0.9]},
                                 "seeds": [0, 1, 2]},
        "sweep-figure1.yaml": {"recipe": "resnet18-qhm-cosine-increasing.yaml", "name": "figure1",
                               "grid": {"schedule.lr.kind": list(LRS),
                                        "schedule.batch": list(BATCHES.values())},
                               "seeds": [0, 1, 2]},
    }
    for fname, spec in sweeps.items():
        (HERE / fname).write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"{len(written)} recipes and {len(sweeps)} sweeps in {HERE}")


if __name__ == "__main__":
    main()
