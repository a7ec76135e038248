"""Hand-applied transformations for the discovery tests: the loss at given parameters, and swaps applied by
hand, so that each reported symmetry is checked independently of the toolbox's own transformation code."""
import torch
from torch.func import functional_call

EPS = torch.finfo(torch.float64).eps
# Both sides of each comparison are one float64 forward of the same function up to the order of its sums
# (heads into the output projection, experts accumulated by index_add_, softmax and norm rows: <= 64 terms
# each, ~10 of them in depth), so they agree to ~640·u relative to the loss; 1e3·u·|L| bounds that.
REL = 1e3 * EPS


def loss_at(model, loss, batch, params):
    x, y = batch
    with torch.no_grad():
        return float(loss(functional_call(model, params, (x,)), y))


def swapped(params, terms):
    """The reported swaps applied by hand: each term [param, axis, perm] is a product of disjoint swaps."""
    out = dict(params)
    for name, axis, perm in terms:
        out[name] = out[name].index_select(axis, torch.tensor(perm))
    return out
