"""The dataflow graph of one forward + loss evaluation, recorded at the torch-function level.

A `TorchFunctionMode` sees every top-level torch call (F.linear, torch.addmm, F.batch_norm, F.relu,
Tensor.view, ...) with its arguments, so we learn which parameter feeds which op without tracing or
name-matching a particular architecture (nn.Module calls, HF Conv1D and functional attention code all end
up as these calls). Parameters are recognised by tensor identity.

Axis bookkeeping between two ops of interest is done by *label propagation*: the ops in between are
replayed on a tensor of integer labels (e.g. label = output-feature index of a linear layer, constant along
every other axis), which tells where each feature ends up after views, splits, transposes, pooling and
flattening. Mixing ops (a pooled average of different labels) are caught because labels must stay integers
and two independent labelings must agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from eqlab.analyses.discover.ops import ELEMENTWISE_ACT

# Ops that only move, select or (positively, uniformly) rescale entries: features keep their identity.
STRUCTURAL = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "split",
              "chunk", "__getitem__", "select", "narrow", "squeeze", "unsqueeze", "t", "clone", "to", "type",
              "float", "double", "half", "bfloat16", "cat", "dropout", "view_as", "reshape_as", "movedim",
              "expand", "identity", "type_as"}
POOLING = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
           "adaptive_max_pool2d", "adaptive_max_pool3d"}
SCALAR = {"mul", "div", "__mul__", "__truediv__", "__rmul__"}  # by a parameter-free scalar
# Replayed as the identity on labels: casts, dropout, scalar multiples, and elementwise activations (which
# keep each feature where it is; whether they keep the *symmetry* is the pattern's business).
LABEL_IDENTITY = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "dropout", "identity", "clone",
                  "contiguous"} | SCALAR | ELEMENTWISE_ACT


@dataclass
class Op:
    index: int
    name: str
    func: object
    leaves: list          # flattened (args, kwargs)
    spec: object
    outputs: list         # flattened output tensors

    def tensor_positions(self):
        return [i for i, x in enumerate(self.leaves) if torch.is_tensor(x)]

    def arg(self, position: int, name: str, default=None):
        """A positional-or-keyword argument of the original call."""
        args, kwargs = tree_unflatten(self.leaves, self.spec)
        if name in kwargs:
            return kwargs[name]
        return args[position] if len(args) > position else default

    def replay(self, position: int, value):
        leaves = list(self.leaves)
        leaves[position] = value
        args, kwargs = tree_unflatten(leaves, self.spec)
        if self.name in LABEL_IDENTITY:
            return [value]
        out = self.func(*args, **kwargs)
        return [x for x in tree_flatten(out)[0] if torch.is_tensor(x)]


def _out_of_place(func, args, kwargs):
    """An in-place call (``a += b``, ``a.add_(b)``, ``relu(x, inplace=True)``) as its out-of-place twin,
    with the tensor it would have mutated. In-place results alias their input, so recorded as they are they
    would be invisible to the dataflow graph (a residual ``h += r`` would hide the add)."""
    name = getattr(func, "__name__", "")
    if kwargs.get("inplace") is True:
        return func, args, {**kwargs, "inplace": False}, args[0] if args else None
    twin = None
    if name.startswith("__i") and name.endswith("__") and hasattr(torch.Tensor, "__" + name[3:]):
        twin = getattr(torch.Tensor, "__" + name[3:])
    elif name.endswith("_") and not name.endswith("__") and name not in ("requires_grad_", "copy_", "zero_",
                                                                            "fill_", "uniform_", "normal_"):
        twin = getattr(torch.Tensor, name[:-1], None)
    if twin is None or not args or not torch.is_tensor(args[0]):
        return func, args, kwargs, None
    return twin, args, kwargs, args[0]


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self._latest: dict[int, torch.Tensor] = {}   # id(mutated tensor) -> the tensor holding its new value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        func, args, kwargs, target = _out_of_place(func, args, kwargs)
        out = func(*args, **kwargs)
        if target is not None:
            # the model may keep using the mutated object (``x.add_(y)``, MoE's ``acc.index_add_(...)``
            # without rebinding): give it the new value, and record later reads of it as reads of ``out``,
            # so the dataflow through the mutation is kept; code that rebinds (``h += r``) reads ``out``.
            target.copy_(out)
        outs = [x for x in tree_flatten(out)[0] if torch.is_tensor(x)]
        if outs:
            leaves, spec = tree_flatten((args, kwargs))
            leaves = [self._latest.get(id(x), x) if torch.is_tensor(x) else x for x in leaves]
            if target is not None and torch.is_tensor(out):
                self._latest[id(target)] = out
            name = getattr(func, "__name__", str(func))
            self.ops.append(Op(len(self.ops), name, func, leaves, spec, outs))
        return out


class Graph:
    def __init__(self, ops: list[Op], param_names: dict[int, str]):
        self.ops, self._param = ops, param_names
        self._producer: dict[int, tuple[Op, int]] = {}
        self._consumers: dict[int, list[tuple[Op, int]]] = {}
        for op in ops:
            ins = {id(op.leaves[p]) for p in op.tensor_positions()}
            if any(id(t) in ins for t in op.outputs):
                # `x.to(same dtype)`, `x.type(...)`, in-place ops return their input: aliases, not new
                # dataflow (recording them would give the input a second consumer). In-place activations
                # (ReLU(inplace=True)) therefore go unseen: patterns through them are missed, not wrong.
                continue
            for pos in op.tensor_positions():
                self._consumers.setdefault(id(op.leaves[pos]), []).append((op, pos))
            for k, t in enumerate(op.outputs):
                self._producer.setdefault(id(t), (op, k))

    def param(self, t) -> str | None:
        return self._param.get(id(t)) if torch.is_tensor(t) else None

    def producer(self, t):
        return self._producer.get(id(t))

    def consumers(self, t):
        return self._consumers.get(id(t), [])

    def ops_named(self, *names):
        return [op for op in self.ops if op.name in names]

    def param_uses(self, name: str):
        return [(op, pos) for op in self.ops for pos in op.tensor_positions() if self.param(op.leaves[pos]) == name]

    def ancestors(self, t) -> set[int]:
        """ids of every tensor that ``t`` was computed from (parameters included)."""
        seen, todo = set(), [t]
        while todo:
            x = todo.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            prod = self.producer(x)
            if prod is not None:
                todo += [prod[0].leaves[p] for p in prod[0].tensor_positions()]
        return seen

    def has_param_input(self, op) -> bool:
        return any(self.param(op.leaves[p]) for p in op.tensor_positions())

    # --------------------------------------------------------------------------------- walking
    def is_passthrough(self, op, pos, pooling=True) -> bool:
        if op.name in STRUCTURAL or (pooling and op.name in POOLING):
            if op.name == "cat":
                return True
            return pos == op.tensor_positions()[0]
        if op.name in SCALAR:  # multiplying by a parameter-free scalar keeps features (and homogeneity)
            others = [op.leaves[p] for p in op.tensor_positions() if p != pos]
            return all(t.numel() == 1 and not self.param(t) for t in others)
        return False

    def walk_back(self, t, pooling=True):
        """From tensor t back through pass-through ops. Returns (origin tensor, chain) with chain the list
        of (op, in_position, out_index) from origin to t in forward order."""
        chain = []
        while True:
            prod = self.producer(t)
            if prod is None:
                break
            op, k = prod
            data = self._data_input(op)
            if data is None or not self.is_passthrough(op, data, pooling):
                break
            chain.append((op, data, k))
            t = op.leaves[data]
        return t, chain[::-1]

    def _data_input(self, op):
        pos = op.tensor_positions()
        if not pos:
            return None
        if op.name == "cat":  # HF's key/value cache concatenates an empty tensor: follow the biggest input
            return max(pos, key=lambda p: op.leaves[p].numel())
        if op.name in SCALAR:
            return max(pos, key=lambda p: op.leaves[p].numel())
        return pos[0]

    def walk_forward(self, t, pooling=True):
        """From t forward while the only consumer is a pass-through op. Returns (end tensor, chain,
        consumers of the end tensor)."""
        chain = []
        while True:
            cons = self.consumers(t)
            if len(cons) != 1:
                return t, chain, cons
            op, pos = cons[0]
            if not self.is_passthrough(op, pos, pooling) or len(op.outputs) != 1:
                return t, chain, cons
            chain.append((op, pos, 0))
            t = op.outputs[0]

    def single_consumer_chain(self, origin, chain) -> bool:
        """True when no tensor along origin→chain→end is read by anything outside the chain (split outputs
        other than the followed one are allowed: they carry other features)."""
        ts = [origin] + [op.outputs[k] for op, _, k in chain[:-1]]
        return all(len(self.consumers(t)) == 1 for t in ts)


def propagate(chain, labels):
    """Replay ``chain`` on ``labels`` (float64 tensor shaped like the chain's origin)."""
    x = labels
    for op, pos, k in chain:
        x = op.replay(pos, x)[k]
    return x


def axis_labels(chain, origin_shape, axis: int, end_axis: int, start: int = 0):
    """Which origin index (along ``axis``) each position along ``end_axis`` of the chain's end carries.

    Returns a list of ints (one per end position), or None when the chain mixes features (non-integer
    labels, labels not constant along the other axes, or two labelings disagreeing)."""
    n = origin_shape[axis]
    results = []
    for f in (lambda i: i + 1.0, lambda i: (i + 1.0) ** 2):
        vec = f(torch.arange(n, dtype=torch.float64))
        shape = [1] * len(origin_shape)
        shape[axis] = n
        lab = vec.reshape(shape).expand(*origin_shape).contiguous()
        try:
            out = propagate(chain, lab).to(torch.float64)
        except Exception:  # noqa: BLE001 - an op we cannot replay means we cannot vouch for the mapping
            return None
        out = out.movedim(end_axis, -1).reshape(-1, out.shape[end_axis])
        if out.numel() == 0 or not torch.equal(out.amax(0), out.amin(0)):
            return None
        results.append(out[0])
    a, b = results
    if not torch.equal(a, torch.round(a)) or not torch.equal((a) ** 2, b):
        return None
    return [int(x) - 1 for x in a.tolist()]


def trace(model: torch.nn.Module, loss, batch) -> Graph:
    """Record ``loss(model(inputs), targets)``; buffers (BN running stats) are restored afterwards."""
    inputs, targets = batch
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    rec = _Recorder()
    try:
        with torch.no_grad(), rec:
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            value = loss(out, targets)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    names = {id(p): n for n, p in model.named_parameters()}
    graph = Graph(rec.ops, names)
    from eqlab.analyses.discover.norms import fuse_norms

    fused = fuse_norms(graph)  # normalisations written as several ops -> one rms_norm / layer_norm op
    if fused is not graph.ops:
        graph = Graph(fused, names)
    from eqlab.analyses.identities import output_tensor

    graph.output = output_tensor(out)  # the model output f (for equivariance)
    graph.loss_value = value             # the scalar loss (for what reaches it)
    return graph
