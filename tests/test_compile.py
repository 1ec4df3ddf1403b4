"""torch.compile(fullgraph=True) over the public ops: one graph, same values and gradients as eager."""
import pytest
import torch

import scale_fast as sf


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    M, B, D, K, H = 3, 12, 8, 11, 6
    e = torch.randn(M, B, D, generator=g, requires_grad=True)
    present = torch.rand(M, B, generator=g) > 0.25
    hidden = torch.randn(15, H, generator=g, requires_grad=True)
    weight = torch.randn(K, H, generator=g, requires_grad=True)
    target = torch.randint(0, K, (15,), generator=g)
    target[::4] = -100
    rows = torch.randint(0, B, (15,), generator=g)
    present[0, rows] = True
    feats = torch.randn(15, H, generator=g)
    present[1, rows] = True
    scale = torch.tensor(10.0, requires_grad=True)
    return e, present, hidden, weight, target, rows, feats, scale


# inductor once (it checks the custom ops' output strides); aot_eager elsewhere is faster
# and still traces every op through its fake implementation with fullgraph=True.
@pytest.mark.parametrize("mode, compiler", [("sample", "inductor"), ("batch", "aot_eager")])
def test_scale_loss_compiles_without_graph_breaks(mode, compiler):
    e, present, hidden, weight, target, rows, feats, scale = _inputs(0)

    def step(e, scale, hidden, weight):
        tasks = {
            0: sf.MaskedTask("ce", hidden, target, weight=weight, sample_index=rows),
            1: sf.MaskedTask("nce", hidden, feats, sample_index=rows),
        }
        return sf.scale_loss(e, present, logit_scale=scale, tasks=tasks, mode=mode, backend="torch").total

    leaves = [e, scale, hidden, weight]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for got, want in zip(compiled_grads, eager_grads):
        assert (got - want).norm() <= 1e-4 * want.norm()


def test_linear_cross_entropy_compiles():
    _, _, hidden, weight, target, _, _, _ = _inputs(1)

    def f(hidden, weight):
        return sf.linear_cross_entropy(hidden, weight, target, scale=0.5, backend="torch")

    eager = f(hidden, weight)
    eager_grads = torch.autograd.grad(eager, [hidden, weight])
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden, weight)
    compiled_grads = torch.autograd.grad(compiled, [hidden, weight])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for got, want in zip(compiled_grads, eager_grads):
        assert (got - want).norm() <= 1e-4 * want.norm()


def test_siglip_compiles():
    """form="siglip" as one custom op: the SCALE loss with S' weights and missing modalities, and the plain
    two-modality pair loss, against eager (values; gradients of embeddings, logit scale and bias)."""
    e, present, _, _, _, _, _, scale = _inputs(2)
    bias = torch.tensor(-10.0, requires_grad=True)

    def f(e, scale, bias):
        total = sf.scale_loss(e, present, logit_scale=scale, logit_bias=bias, form="siglip", backend="torch").total
        pair = sf.multi_pair_info_nce(e[:2], logit_scale=scale, logit_bias=bias, form="siglip", backend="torch")
        return total + pair.sum()

    leaves = [e, scale, bias]
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for got, want in zip(compiled_grads, eager_grads):
        assert (got - want).norm() <= 1e-4 * want.norm()


def test_first_call_compiled_with_fullgraph():
    """A fresh process whose first call of the loss is a fullgraph compile: the backend lookup
    imports nothing while dynamo traces."""
    import subprocess
    import sys

    code = ("import torch, scale_fast as sf\n"
            "e = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)\n"
            "p = torch.ones(3, 8, dtype=torch.bool)\n"
            "f = torch.compile(lambda e, p: sf.scale_loss(e, p, backend='torch').total, fullgraph=True, "
            "backend='eager')\n"
            "g = torch.autograd.grad(f(e, p), e)[0]\n"
            "r = torch.autograd.grad(sf.scale_loss(e, p, backend='torch').total, e)[0]\n"
            "assert torch.allclose(g, r, rtol=1e-12, atol=1e-14), (g - r).abs().max()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]


def test_run_op_refuses_an_option_the_op_does_not_take():
    """A misspelt keyword option, or row_range for an op without that form, is an error, not dropped."""
    from scale_fast._compiled_ops import run_op

    e, present = torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="normalise"):
        run_op("torch", "scores", e, present, "sample", normalise=False)
    with pytest.raises(TypeError, match="row_range"):
        run_op("torch", "scores", e, present, "sample", row_range=(0, 2))
