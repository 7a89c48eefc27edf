"""The noise scale while training, against the truth from exact per-sample gradients: least squares under
SGD, its batches drawn as the launcher draws them (a permutation per epoch, two ranks' halves), each
step's estimates made by the launcher's coefficients and its rows by the launcher's NoiseWindows.

At fixed parameters the estimates are unbiased at any size (test_noise.py). While training they are not
once B_simple is a sizeable share of the n samples: a batch comes from the samples its epoch has left,
against parameters the samples before it shaped. Where that bias exceeds what a row may carry, the rows
refuse (null with a reason and a lower bound); elsewhere the mean logged value is within 25% of the truth."""
import numpy as np
import pytest
import torch

from launcher.train import noise

N, DIM, BATCH = 1024, 20, 32


def train(lr: float, seed: int, epochs: int = 40, burn: int = 15, log_every: int = 8):
    """(rows, truth over each row's span): SGD on least squares, steps.jsonl-like rows every ``log_every``
    steps after ``burn`` epochs, the truth the ratio of the exact mean tr(S) to the exact mean |G|^2 over the
    steps each row's B_simple spans."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(N, DIM))
    y = a @ rng.normal(size=DIM) + rng.normal(size=N)
    x = np.zeros(DIM)
    half = BATCH // 2
    matrix = noise.coefficients(half, BATCH, 2, torch.device("cpu"), N).numpy()
    windows, rows, truths, exact = noise.NoiseWindows(N, world=2), [], [], []
    window, whole_epoch = np.zeros(3), np.zeros(3)
    for epoch in range(epochs):
        windows.end_epoch(whole_epoch)           # the epoch row's sums: the regime the next rows are judged in
        whole_epoch[:] = 0
        order = rng.permutation(N)
        for start in range(0, N, BATCH):
            batch = order[start:start + BATCH]
            per_sample = a * (a @ x - y)[:, None]
            mean = per_sample.mean(0)
            big = per_sample[batch].mean(0)
            if epoch >= burn and len(batch) == BATCH:
                exact.append((mean @ mean, ((per_sample - mean) ** 2).sum() / (N - 1)))
                for rank in (0, 1):          # each rank's accumulated gradient, scaled by world/B as the loss is
                    mine = per_sample[batch[rank * half:(rank + 1) * half]].sum(0) * 2 / BATCH
                    estimates = [*(matrix @ np.array([mine @ mine, big @ big])), 1]
                    window += estimates
                    whole_epoch += estimates
                if len(exact) % log_every == 0:
                    row = windows.add(window)
                    window[:] = 0
                    if row.get("noise_scale") is not None:
                        span = np.array(exact[-row["noise_scale_steps"]:])
                        truths.append(span[:, 1].mean() / span[:, 0].mean())
                    rows.append(row)
            x = x - lr * big
    whole = np.array(exact)
    return rows, truths, whole[:, 1].mean() / whole[:, 0].mean()


@pytest.mark.parametrize("lr,share", [(0.5, 0.1), (0.15, 0.5), (0.085, 1.0), (0.06, 2.0)])
def test_the_logged_noise_scale_is_within_25_percent_of_the_truth_or_says_why(lr, share):
    rows, truths, truth = [], [], []
    for seed in range(3):
        r, t, whole = train(lr, seed)
        rows, truths, truth = rows + r, truths + t, truth + [whole]
    assert np.mean(truth) / N == pytest.approx(share, rel=0.5)              # the regime asked for
    logged = [r["noise_scale"] for r in rows if r.get("noise_scale") is not None]
    refused = [r for r in rows if r.get("noise_scale") is None]
    assert all(r["noise_scale_reason"] for r in refused)
    if share <= 0.1:        # measured: 59% of the rows logged, their mean 0.84x the truth
        assert len(logged) >= 0.5 * len(rows)
        assert np.mean(logged) / np.mean(truths) == pytest.approx(1.0, abs=0.25)
    else:                   # the design refuses here: every row says why, with the estimate as a lower bound
        assert not logged
        assert all(r["noise_scale_lower_bound"] < np.mean(truth) for r in refused if r.get("noise_scale_lower_bound"))
        assert any(r.get("noise_scale_lower_bound") for r in refused)
