"""Running a backend op: ``run_op`` calls the dispatcher's choice eagerly, and under torch.compile
the op's torch.library custom op, so that torch.compile sees each as one node.

Under torch.compile the backends' Python loops, host syncs and Triton launches
would break the graph; wrapped as custom ops with fake (shape-only)
implementations they compile with ``fullgraph=True``.  Their backward reruns
the op's forward with autograd enabled and differentiates it: one extra
forward pass, paid only under torch.compile (eager calls go straight to the
backend and keep their saved tensors).

Every custom op comes from one ``CompiledOp`` record (``register``): its name, its inputs (a
torch schema), the ones that get a gradient, its eager implementation and its fake.  From it
``register`` makes the forward op, a backward op (the recompute) and the autograd glue.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._dispatch import get_op
from ._normalize import accumulation_dtype


_AUTOGRAD_KEYS = [torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView]


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """A custom op's implementation runs with autograd dispatch excluded; lift that for a recompute."""
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in _AUTOGRAD_KEYS]
    for key in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(_AUTOGRAD_KEYS, excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def _grads_by_recompute(run, inputs: Sequence[Optional[Tensor]], differentiable: Sequence[bool], grad_outputs):
    """Gradients of run(*inputs) w.r.t. the differentiable inputs (zeros where unused; an empty tensor where
    the input is None)."""
    with _autograd_inside_custom_op():
        leaves = [
            x.detach().requires_grad_(True) if (x is not None and diff) else x
            for x, diff in zip(inputs, differentiable)
        ]
        outputs = run(*leaves)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        wanted = [x for x, diff in zip(leaves, differentiable) if diff and x is not None]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs and wanted else [None] * len(wanted)
    result, it = [], iter(got)
    for x, diff in zip(inputs, differentiable):
        if not diff:
            continue
        if x is None:
            result.append(_empty_grad(inputs))
            continue
        g = next(it)
        result.append(x.new_zeros(x.shape) if g is None else g.contiguous())
    return result


def _dense_like(x: Tensor) -> Tensor:
    """A contiguous tensor of x's shape (what the real implementations return)."""
    return x.new_empty(x.shape)


def _empty_grad(tensors) -> Tensor:
    """The backward op's entry for an absent (None) differentiable input: an empty tensor."""
    device = next(x.device for x in tensors if isinstance(x, Tensor))
    return torch.empty(0, device=device)


def _contiguous_copy(out):
    """The op's output(s) as fresh contiguous tensors (a custom op may not return a view of an input)."""
    if isinstance(out, (tuple, list)):
        return type(out)(t.clone(memory_format=torch.contiguous_format) for t in out)
    return out.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class CompiledOp:
    """One custom op: ``scale_fast::<name>``.

    inputs: its schema's inputs, e.g. "Tensor z, Tensor present, str form"; a trailing ``str backend``
        is added.  Types used: Tensor, Tensor?, Tensor[] (gradients: one list per list input), and
        non-tensor values (int, float, str, bool, int[], int[]?, float[]).
    returns: the schema's output, e.g. "Tensor", "(Tensor, Tensor, Tensor)" or "Tensor[]".
    differentiable: the names of the inputs that get a gradient (where they hold a floating tensor).
    fake(*inputs): empty outputs of the right shapes and dtypes (no backend argument).
    run(backend, *inputs): the eager implementation; by default the backend op of that name, chosen by
        the dispatcher (an input named row_range is passed as its row_range form).
    keywords: ((name, default), ...) of the inputs that the backend op takes as keywords; they follow
        the positional inputs in the schema (row_range, if any, comes last), and one at its default is
        not passed (a backend without that option serves the default).
    """

    name: str
    inputs: str
    returns: str
    differentiable: Tuple[str, ...]
    fake: Callable
    run: Optional[Callable] = None
    keywords: Tuple[Tuple[str, object], ...] = ()

    def changed(self, options: Dict[str, object]) -> Dict[str, object]:
        """The keyword options that differ from their defaults: the ones a backend op is called with."""
        return {k: options[k] for k, default in self.keywords if options.get(k, default) != default}


def _parameters(inputs: str) -> List[Tuple[str, str]]:
    """[(type, name)] of a schema's inputs (defaults dropped)."""
    pairs = [p.strip().split("=")[0].rsplit(" ", 1) for p in inputs.split(",")]
    return [(kind.strip(), name.strip()) for kind, name in pairs]


def _flatten(values, params) -> List[Optional[Tensor]]:
    """Every tensor input, lists expanded, in order."""
    flat = []
    for (kind, _), x in zip(params, values):
        if kind.startswith("Tensor"):
            flat.extend(x if kind.endswith("[]") else [x])
    return flat


def _unflatten(tensors: Sequence[Optional[Tensor]], values, params) -> list:
    """The inputs `values` with their tensor entries (lists included) taken in order from `tensors`."""
    it = iter(tensors)
    out = []
    for (kind, _), x in zip(params, values):
        if not kind.startswith("Tensor"):
            out.append(x)
        elif kind.endswith("[]"):
            out.append([next(it) for _ in x])
        else:
            out.append(next(it))
    return out


def _marks(values, params, differentiable) -> List[bool]:
    """Per flattened tensor input: whether it gets a gradient (a listed input, floating or None)."""
    marks = []
    for (kind, name), x in zip(params, values):
        if kind.startswith("Tensor"):
            marks += [name in differentiable and (t is None or t.is_floating_point())
                      for t in (x if kind.endswith("[]") else [x])]
    return marks


def register(spec: CompiledOp):
    """Make ``scale_fast::<name>`` and ``scale_fast::<name>_backward`` (the recompute) from `spec`, with the
    autograd glue between them; returns the forward op."""
    params = _parameters(spec.inputs)
    takes_rows = params[-1][1] == "row_range"
    n_positional = len(params) - len(spec.keywords) - takes_rows

    def run(backend, *inputs):
        if spec.run is not None:
            return spec.run(backend, *inputs)
        options = dict(zip((k for k, _ in spec.keywords), inputs[n_positional:]))
        return _eager(backend, spec.name, *inputs[:n_positional], row_range=inputs[-1] if takes_rows else None,
                      **spec.changed(options))

    def forward(*args):
        with torch.no_grad():
            return _contiguous_copy(run(args[-1], *args[:-1]))

    op = torch.library.custom_op(f"scale_fast::{spec.name}", forward, mutates_args=(),
                                 schema=f"({spec.inputs}, str backend) -> {spec.returns}")
    op.register_fake(lambda *args: spec.fake(*args[:-1]))

    # backward: one gradient per marked (flattened) input, an empty tensor where that input is None
    def backward(grads, *args):
        *values, backend = args
        flat = _flatten(values, params)
        return _grads_by_recompute(lambda *leaves: run(backend, *_unflatten(leaves, values, params)),
                                   flat, _marks(values, params, spec.differentiable), grads)

    def backward_fake(grads, *args):
        values = args[:-1]
        flat = _flatten(values, params)
        return [_empty_grad(flat) if t is None else _dense_like(t)
                for t, mark in zip(flat, _marks(values, params, spec.differentiable)) if mark]

    backward_op = torch.library.custom_op(f"scale_fast::{spec.name}_backward", backward, mutates_args=(),
                                          schema=f"(Tensor?[] grads, {spec.inputs}, str backend) -> Tensor[]")
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        values = inputs[:-1]
        ctx.save_for_backward(*_flatten(values, params))
        ctx.values = [None if kind.startswith("Tensor") else x for (kind, _), x in zip(params, values)]
        ctx.sizes = [len(x) if kind == "Tensor[]" else 0 for (kind, _), x in zip(params, values)]
        ctx.backend = inputs[-1]

    def grad(ctx, *grads):
        if spec.returns == "Tensor[]":  # one list of gradients for the list output
            (grads,) = grads
        values = [[None] * n if kind == "Tensor[]" else x for (kind, _), x, n in zip(params, ctx.values, ctx.sizes)]
        values = _unflatten(ctx.saved_tensors, values, params)
        flat = _flatten(values, params)
        got = iter(backward_op(list(grads), *values, ctx.backend))
        per_tensor = []
        for t, mark in zip(flat, _marks(values, params, spec.differentiable)):
            g = next(got) if mark else None
            per_tensor.append(None if t is None else g)
        per_tensor = iter(per_tensor)
        out = []  # the inputs' structure: a list of gradients per tensor list
        for (kind, _), x in zip(params, values):
            if kind.startswith("Tensor"):
                out.append([next(per_tensor) for _ in x] if kind.endswith("[]") else next(per_tensor))
            else:  # autograd's rule: a list is one input unless it holds only tensors (an empty one: none)
                out.append([] if isinstance(x, list) and not x else None)
        return (*out, None)

    op.register_autograd(grad, setup_context=setup_context)
    _CUSTOM_OPS[spec.name] = op, spec, takes_rows
    return op


_CUSTOM_OPS: Dict[str, Tuple[Callable, CompiledOp, bool]] = {}  # name: (op, record, whether it takes row_range)


def _eager(backend: str, name: str, *args, row_range=None, **options):
    """Backend op `name` on args, as the dispatcher chooses it (row_range: a process group's (start, stop) rows;
    options: the op's keyword options)."""
    rows = () if row_range is None else (tuple(row_range),)
    chosen = get_op(backend, name, *args, row_range=row_range is not None,
                    columns_grad=options.get("columns_grad", True))
    return chosen(*args, *rows, **options)


def _pair_fake(z, *rest):
    return z.new_empty((z.shape[0], z.shape[0]), dtype=accumulation_dtype(z.dtype))


def _scalar_fake(a, *rest):
    return a.new_empty((), dtype=accumulation_dtype(a.dtype))


def _lce_fake(hidden, weight, target, bias, scale, ignore_index, reduction):
    shape = (hidden.shape[0],) if reduction == "none" else ()
    return hidden.new_empty(shape, dtype=accumulation_dtype(hidden.dtype))


def _scores_fake(z, present, mode, *rest):
    M, B = z.shape[0], z.shape[1]
    shape = (B, M, M) if mode == "sample" else (M, M)
    acc = accumulation_dtype(z.dtype)
    return z.new_empty(shape, dtype=acc), z.new_empty(shape, dtype=acc), z.new_empty((M, M), dtype=torch.bool)


# --- the backend ops (contracts in scale_fast/_dispatch.py): name, inputs, output, differentiable, fake ---
_PAIR_OPTIONS = (("normalize", True), ("columns_grad", True))
register(CompiledOp("contrastive", "Tensor z, Tensor present, Tensor logit_scale, Tensor? row_weights, str form, "
                    "bool normalize, bool columns_grad, int[]? row_range", "Tensor",
                    ("z", "logit_scale", "row_weights"), _pair_fake, keywords=_PAIR_OPTIONS))
register(CompiledOp("siglip", "Tensor z, Tensor present, Tensor logit_scale, Tensor logit_bias, Tensor? row_weights, "
                    "bool normalize, bool columns_grad, int[]? row_range", "Tensor",
                    ("z", "logit_scale", "logit_bias", "row_weights"), _pair_fake, keywords=_PAIR_OPTIONS))
register(CompiledOp("linear_cross_entropy", "Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
                    "Tensor? scale, int ignore_index, str reduction", "Tensor",
                    ("hidden", "weight", "target", "bias", "scale"), _lce_fake))
register(CompiledOp("info_nce", "Tensor a, Tensor b, Tensor? row_weights, float scale", "Tensor",
                    ("a", "b", "row_weights"), _scalar_fake))
register(CompiledOp("info_nce_rows", "Tensor a, Tensor b, Tensor? row_weights, float scale, int offset", "Tensor",
                    ("a", "b", "row_weights"), _scalar_fake))
register(CompiledOp("scores", "Tensor z, Tensor present, str mode, bool normalize", "(Tensor, Tensor, Tensor)",
                    ("z",), _scores_fake, keywords=(("normalize", True),)))


def run_op(backend: str, name: str, *args, row_range=None, **options):
    """Run backend op `name` (a resolved backend, see scale_fast/_dispatch.py); under torch.compile
    through its custom op (one graph node).  row_range: the (start, stop) rows of a process group's
    pair op (contrastive, siglip); options: the op's keyword options (normalize=, columns_grad=)."""
    if name not in _CUSTOM_OPS:
        return _eager(backend, name, *args, row_range=row_range, **options)
    op, spec, takes_rows = _CUSTOM_OPS[name]
    unknown = set(options) - {k for k, _ in spec.keywords}
    if unknown or (row_range is not None and not takes_rows):
        raise TypeError(f"op {name!r} takes no {sorted(unknown) or 'row_range'}")
    if torch.compiler.is_compiling():
        rows = (None if row_range is None else list(row_range),) if takes_rows else ()
        return op(*args, *(options.get(k, default) for k, default in spec.keywords), *rows, backend)
    return _eager(backend, name, *args, row_range=row_range, **spec.changed(options))
