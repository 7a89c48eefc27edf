"""Evaluation: test (and validation) loss and accuracy, and the exact full-gradient norm.

Both are one pass over a split, each rank a contiguous shard of it in batches of ``eval.batch_size``,
the sums all-reduced; :func:`_shard_batches` is that pass.

A pass can be long (a large validation file), and a preemption must not wait for it: after every batch
each pass asks ``stopped()`` (every rank the same number of times, so it may hold a collective: the
trainer's agreement on a stop), and when it says so the pass ends with :class:`Interrupted`, nothing
of it kept; the trainer saves where training stood and a resume evaluates again.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from launcher.data import order

if TYPE_CHECKING:
    from launcher.config import Recipe


class Interrupted(Exception):
    """An evaluation pass stopped part-way for a preemption every rank agreed on."""


def _never() -> bool:
    return False


def _shard_batches(split, comm, batch_size: int, stopped=_never):
    """:func:`_padded_shard`, with :class:`Interrupted` after any batch where ``stopped()``."""
    for batch in _padded_shard(split, comm, batch_size):
        yield batch
        if stopped():
            raise Interrupted


def _padded_shard(split, comm, batch_size: int):
    """(a, b, x, y) for this rank's shard of ``split``, ``batch_size`` samples at a time, and as many
    batches on every rank: a shorter shard's last ones empty (a == b; under FSDP every forward is a
    collective, and the stop check after each batch may be one)."""
    lo, hi = order.rank_bounds(len(split), comm.rank, comm.world)
    empty = None
    for a, b, x, y in split.shard(lo, hi, batch_size):
        empty = (x[:0], y[:0])
        yield a, b, x, y
    largest = -(-len(split) // comm.world)
    missing = -(-largest // batch_size) - -(-(hi - lo) // batch_size)
    if missing and empty is None:                  # no sample here at all: an empty batch of the right kind
        _, _, x, y = next(iter(split.shard(0, 1, 1)))
        empty = (x[:0], y[:0])
    for _ in range(missing):
        yield hi, hi, *empty


@torch.no_grad()
def evaluate(module, split, comm, batch_size: int, autocast, loss_fn, lockstep: bool = False,
             stopped=_never) -> tuple[float, float | None]:
    """Mean loss and accuracy over ``split`` (accuracy None when the outputs are not class logits; a
    per-token loss is the mean over the split's tokens that count). ``lockstep`` (FSDP): empty batches
    go through the model too."""
    sums = torch.zeros(3, dtype=torch.float64, device=comm.device)     # loss sum, correct, samples
    has_accuracy = True
    module.eval()
    try:
        for a, b, x, y in _shard_batches(split, comm, batch_size, stopped):
            if a < b or lockstep:
                has_accuracy &= _add_batch(sums, module, x, y, a, b, autocast, loss_fn)
    finally:
        module.train()
    comm.all_reduce_sum(sums)
    n = float(sums[2])
    return float(sums[0]) / n, (float(sums[1]) / n if has_accuracy else None)


def _add_batch(sums, module, x, y, a, b, autocast, loss_fn) -> bool:
    """One batch's loss sum, correct predictions and count into ``sums``; False when the outputs have
    no accuracy."""
    with autocast:
        out = module(x)
    sums[0] += loss_fn(out, y).double()
    correct = loss_fn.correct(out, y)
    if correct is not None:
        sums[1] += correct
    sums[2] += loss_fn.count(y) if loss_fn.per_token else b - a
    return correct is not None


def full_grad_norm(module, dataset, comm, recipe: Recipe, epoch: int, autocast, loss_fn, stopped=_never) -> float:
    """||grad f(x)|| of the empirical training loss f = (1/n) sum_i l_i: the exact mean gradient.

    Model in eval mode; mode "exact" uses the un-augmented training set, mode "paper" augments it as
    the paper's code does. Each rank does 1/W of a pass over its shard; the sums are all-reduced.
    Gradients go to fresh tensors (autograd.grad), never into .grad, so training state is untouched.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    split = dataset.train_eval
    paper = recipe.eval.grad_norm_mode == "paper" and dataset.augment is not None
    total = [torch.zeros_like(p) for p in params]
    terms = torch.zeros(1, dtype=torch.float64, device=comm.device)     # what f averages over: samples or tokens
    module.eval()
    try:
        for a, b, x, y in _shard_batches(split, comm, recipe.eval.batch_size, stopped):
            if a == b:
                continue
            if loss_fn.per_token:
                terms += loss_fn.count(y)
            if paper:
                params_ab = order.augment_params(recipe.seed, epoch, range(a, b), dataset.augment, "gradnorm")
                x = order.apply_augment(x, params_ab, dataset.augment)
            with autocast:
                out = module(x)
            loss = loss_fn(out, y)
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t += g
    finally:
        module.train()
    flat = comm.all_reduce_sum(torch.cat([t.reshape(-1) for t in total]).double())
    if loss_fn.per_token:                      # f is the mean over the training tokens
        return float(flat.div_(comm.all_reduce_sum(terms)).norm())
    return float(flat.div_(len(split)).norm())


def evaluate_epoch(parts, epoch: int, stopped=_never) -> dict:
    """The epoch row's evaluation: test (and validation) loss and accuracy, the full-gradient norm; the
    best accuracies and the running minimum of the norm are kept in the train state, once every pass
    is done (an :class:`Interrupted` evaluation changes nothing)."""
    p, state, r = parts, parts.state, parts.recipe
    row = {}
    row["test_loss"], row["test_acc"] = evaluate(p.module, p.dataset.test, p.comm, r.eval.batch_size, p.autocast,
                                                 p.loss, p.engine.lockstep, stopped)
    if p.dataset.validation is not None:
        row["val_loss"], row["val_acc"] = evaluate(p.module, p.dataset.validation, p.comm, r.eval.batch_size,
                                                   p.autocast, p.loss, p.engine.lockstep, stopped)
    if r.eval.full_grad_norm:
        row["grad_norm"] = full_grad_norm(p.module, p.dataset, p.comm, r, epoch, p.autocast, p.loss, stopped)
    if row["test_acc"] is not None:
        state.best_test_acc = max(state.best_test_acc, row["test_acc"])
    if row.get("val_acc") is not None:
        state.best_val_acc = max(state.best_val_acc, row["val_acc"])
    if "grad_norm" in row:
        state.min_grad_norm = min(state.min_grad_norm, row["grad_norm"])
    return row


def evaluate_unless_stopped(parts, epoch: int, agreement, delay: float = 0.0) -> dict | None:
    """:func:`evaluate_epoch`, asking ``agreement`` (an Agreement of its own, closed here) after every batch;
    None when the ranks agreed to stop part-way. ``delay``: seconds slept per batch (a test's slow evaluation)."""
    def stopped() -> bool:
        if delay:
            time.sleep(delay)
        return agreement.poll()
    try:
        return evaluate_epoch(parts, epoch, stopped)
    except Interrupted:
        return None
    finally:
        agreement.close()
