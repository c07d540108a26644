"""fastspec.kernels.attention_pool: every backend (numba, Triton interpreter, CUDA when present) against a
float64 reference, forward and backward, plus edge cases, error messages, opcheck and torch.compile."""
import math

import pytest
import torch
from fastspec.kernels import attention_pool, use_backend
from fastspec.kernels.attention import attention_pool_reference
from kernel_testing import BACKENDS, IDS, assert_close


def softmax_pool64(h, k):
    """Independent float64 oracle: torch.softmax, autograd by torch."""
    return (h.double() * torch.softmax(k.double(), dim=-1)).sum(-1)


def run(backend, h, k, g=None):
    """(e, dh, dk) from the public op under `backend`; h, k are detached copies or views made leaves here."""
    h = h.detach().requires_grad_()
    k = k.detach().requires_grad_()
    with use_backend(backend):
        e = attention_pool(h, k)
        if g is None:
            return e, None, None
        dh, dk = torch.autograd.grad(e, (h, k), g)
    return e, dh, dk


def oracle(h, k, g):
    h64 = h.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    e = softmax_pool64(h64, k64)
    dh, dk = torch.autograd.grad(e, (h64, k64), g.double())
    return e.detach(), dh, dk


def encoder_halves(N, C, T, dtype, device, scale=2.0, seed=0):
    """h and k as the two channel halves of one (N, 2C, T) conv output, as the encoder calls the op."""
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(N, 2 * C, T, generator=gen)).to(dtype).to(device)
    return x, x[:, :C], x[:, C:]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_backward_match_float64(backend, device, dtype):
    N, C, T = 3, 8, 72  # the encoder's T for SDSS
    x, h, k = encoder_halves(N, C, T, dtype, device)
    assert not h.is_contiguous() and h.stride(-1) == 1
    x_before = x.clone()
    g = torch.randn(N, C, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    e, dh, dk = run(backend, h, k, g)
    e_ref, dh_ref, dk_ref = oracle(h, k, g)
    assert e.dtype == dtype and dh.dtype == dtype and dk.dtype == dtype
    assert e.shape == (N, C) and dh.shape == (N, C, T) and e.device == x.device
    assert_close(e, e_ref, dtype, what="e")
    assert_close(dh, dh_ref, dtype, what="dh")
    assert_close(dk, dk_ref, dtype, what="dk")
    assert torch.equal(x, x_before), "inputs were modified"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gradcheck_float64(backend, device):
    N, C, T = 2, 3, 5
    x = torch.randn(N, 2 * C, T, dtype=torch.float64, device=device, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: attention_pool(x[:, :C], x[:, C:]), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("N,C,T", [(2, 7, 1), (3, 5, 13), (1, 3, 300)])
def test_odd_shapes_and_transposed_strides(backend, device, N, C, T):
    # (N, T, C) storage transposed to (N, C, T): stride along t is C, not 1.
    h = torch.randn(N, T, C, dtype=torch.float32, device=device).transpose(1, 2)
    k = 3 * torch.randn(N, T, C, dtype=torch.float32, device=device).transpose(1, 2)
    g = torch.randn(N, C, device=device)
    e, dh, dk = run(backend, h, k, g)
    e_ref, dh_ref, dk_ref = oracle(h, k, g)
    assert_close(e, e_ref, torch.float32, what="e")
    assert_close(dh, dh_ref, torch.float32, what="dh")
    assert_close(dk, dk_ref, torch.float32, what="dk")


@pytest.mark.skipif("triton" not in [b for b, _ in BACKENDS], reason="triton not among the kernel backends")
@pytest.mark.parametrize("block_r,block_t", [(4, 16), (8, 128)])
def test_triton_block_edges(block_r, block_t):
    """Several programs with a partial last one, and rows walked in several chunks with a partial last one."""
    from fastspec.kernels.attention_triton import attention_pool_bwd, attention_pool_fwd

    device = dict(BACKENDS)["triton"]
    N, C, T = 3, 5, 40  # R = 15 rows; T = 40 = 2·16 + 8
    x, h, k = encoder_halves(N, C, T, torch.float32, device, scale=4.0, seed=3)
    k[0, 1, :7] = float("-inf")  # a first chunk of -inf keys: the online rescaling must start from nothing
    g = torch.randn(N, C, device=device).expand(N, C)
    e = attention_pool_fwd(h, k, block_r=block_r, block_t=block_t)
    dh, dk = attention_pool_bwd(g, h, k, block_r=block_r, block_t=block_t)
    e_ref, dh_ref, dk_ref = oracle(h, k, g)
    assert_close(e, e_ref, torch.float32, what="e")
    assert_close(dh, dh_ref, torch.float32, what="dh")
    assert_close(dk, dk_ref, torch.float32, what="dk")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_lazily_negated_inputs(backend, device):
    """Autograd may hand over views with the negation bit set; kernels reading raw memory must honour it."""
    N, C, T = 2, 3, 5
    h = torch.randn(N, C, T, device=device)
    k = torch.randn(N, C, T, device=device)
    g = torch.randn(N, C, device=device)
    e, dh, dk = run(backend, torch._neg_view(h), k, torch._neg_view(g))
    e_ref, dh_ref, dk_ref = oracle(-h, k, -g)
    assert_close(e, e_ref, torch.float32, what="e")
    assert_close(dh, dh_ref, torch.float32, what="dh")
    assert_close(dk, dk_ref, torch.float32, what="dk")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("shape", [(0, 4, 9), (2, 0, 9), (2, 4, 0)], ids=["N=0", "C=0", "T=0"])
def test_empty(backend, device, shape):
    h = torch.randn(shape, device=device)
    k = torch.randn(shape, device=device)
    g = torch.randn(shape[:2], device=device)
    e, dh, dk = run(backend, h, k, g)
    assert e.shape == shape[:2] and dh.shape == shape and dk.shape == shape
    # T = 0: a sum over no positions is 0.
    assert torch.equal(e, torch.zeros(shape[:2], device=device))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_large_keys_are_stable(backend, device):
    N, C, T = 2, 4, 33
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(N, C, T, generator=gen)
    k = torch.randn(N, C, T, generator=gen) * 30
    k[0] += 1e4  # exp(k) overflows float32 and float64 without the max shift
    k[1, 0] -= 1e4
    h, k = h.to(device), k.to(device)
    g = torch.randn(N, C, generator=gen).to(device)
    e, dh, dk = run(backend, h, k, g)
    # Oracle on keys shifted in float64 by hand (softmax is shift-invariant), independent of the op's shift.
    k_shifted = k.double() - k.double().amax(-1, keepdim=True)
    e_ref, dh_ref, dk_ref = oracle(h, k_shifted, g)
    assert torch.isfinite(e).all() and torch.isfinite(dh).all() and torch.isfinite(dk).all()
    # k − max is exact in float32 here (Sterbenz: keys of a row lie within a factor 2): full fp32 accuracy.
    assert_close(e, e_ref, torch.float32, what="e")
    assert_close(dh, dh_ref, torch.float32, what="dh")
    assert_close(dk, dk_ref, torch.float32, what="dk")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("backend,device", BACKENDS + [("torch", "cpu")], ids=IDS + ["torch-cpu"])
def test_infinite_and_nan_keys(backend, device):
    N, C, T = 1, 5, 6
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(N, C, T, generator=gen)
    k = torch.randn(N, C, T, generator=gen)
    inf = float("inf")
    k[0, 0, [1, 4]] = -inf  # masked positions: zero weight
    k[0, 1, :] = -inf  # nothing to attend to: e = 0, zero gradients (defined, unlike torch.softmax's NaN)
    k[0, 2, 3] = float("nan")
    k[0, 3, 2] = inf
    h, k = h.to(device), k.to(device)
    g = torch.ones(N, C, device=device)
    e, dh, dk = run(backend, h, k, g)
    e, dh, dk = e.cpu(), dh.cpu(), dk.cpu()
    hc, kc = h.cpu(), k.cpu()

    keep = [0, 2, 3, 5]  # row 0 is the softmax over its finite keys only
    e0, dh0, dk0 = oracle(hc[:, :1, keep], kc[:, :1, keep], g.cpu()[:, :1])
    assert_close(e[0, 0], e0[0, 0], torch.float32, what="e with -inf keys")
    assert_close(dh[0, 0, keep], dh0[0, 0], torch.float32, what="dh with -inf keys")
    assert_close(dk[0, 0, keep], dk0[0, 0], torch.float32, what="dk with -inf keys")
    assert torch.equal(dh[0, 0, [1, 4]], torch.zeros(2)) and torch.equal(dk[0, 0, [1, 4]], torch.zeros(2))

    assert e[0, 1] == 0 and torch.equal(dh[0, 1], torch.zeros(T)) and torch.equal(dk[0, 1], torch.zeros(T))
    assert math.isnan(e[0, 2].item()) and math.isnan(e[0, 3].item()), "NaN and +inf keys must give NaN, as torch.softmax does"
    e4, _, _ = oracle(hc[:, 4:], kc[:, 4:], g.cpu()[:, 4:])
    assert_close(e[0, 4], e4[0, 0], torch.float32, what="a clean row next to bad ones")


def test_reference_matches_softmax_form():
    """The torch reference (used by the 'torch' backend) agrees with torch.softmax where both are defined."""
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(4, 6, 20, dtype=torch.float64, generator=gen, requires_grad=True)
    k = (5 * torch.randn(4, 6, 20, dtype=torch.float64, generator=gen)).requires_grad_()
    g = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(attention_pool_reference(h, k), (h, k), g)
    want = torch.autograd.grad(softmax_pool64(h, k), (h, k), g)
    assert_close(attention_pool_reference(h, k), softmax_pool64(h, k), 1e-13, what="e")
    for name, a, b in zip(("dh", "dk"), got, want):
        assert_close(a, b, 1e-13, what=name)
    with use_backend("torch"):
        assert torch.equal(attention_pool(h, k), attention_pool_reference(h, k))


@pytest.mark.parametrize(
    "h_shape,k_shape,h_dtype,k_dtype,k_device,match",
    [
        ((2, 3, 4), (2, 3, 5), torch.float32, torch.float32, "cpu", r"same shape.*h \(2, 3, 4\).*k \(2, 3, 5\)"),
        ((2, 3), (2, 3), torch.float32, torch.float32, "cpu", r"h must have shape \(N, C, T\), got shape \(2, 3\)"),
        ((2, 3, 4), (2, 3, 4), torch.float32, torch.float32, "meta", r"k is on meta but h is on cpu"),
        ((2, 3, 4), (2, 3, 4), torch.float32, torch.float16, "cpu", r"same dtype.*torch.float32.*torch.float16"),
        ((2, 3, 4), (2, 3, 4), torch.int64, torch.int64, "cpu", r"float16, bfloat16, float32 or float64.*int64"),
    ],
    ids=["shape", "ndim", "device", "dtype", "int"],
)
def test_bad_input_errors(h_shape, k_shape, h_dtype, k_dtype, k_device, match):
    h = torch.zeros(h_shape, dtype=h_dtype)
    k = torch.zeros(k_shape, dtype=k_dtype, device=k_device)
    for backend in ("numba", "torch"):
        with use_backend(backend), pytest.raises((ValueError, TypeError), match="attention_pool: .*" + match):
            attention_pool(h, k)
    if k_device == "cpu":  # the custom op checks too (e.g. when called directly)
        with pytest.raises((ValueError, TypeError), match=match):
            torch.ops.fastspec.attention_pool_fwd(h, k)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        attention_pool(torch.zeros(2, 3, 4), [1.0])


def test_backward_op_checks_gradient_shape():
    h = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"g must have shape \(N, C\) = \(2, 3\), got \(3, 2\)"):
        torch.ops.fastspec.attention_pool_bwd(torch.zeros(3, 2), h, h)


def test_opcheck_custom_ops():
    x = torch.randn(2, 8, 6)
    cases = [
        (torch.randn(2, 3, 5), torch.randn(2, 3, 5)),
        (x[:, :4], x[:, 4:]),  # channel halves of one buffer
        (torch.randn(2, 3, 5).to(torch.float16), torch.randn(2, 3, 5).to(torch.float16)),
        (torch.randn(2, 3, 5).to(torch.bfloat16), torch.randn(2, 3, 5).to(torch.bfloat16)),
    ]
    for h, k in cases:
        torch.library.opcheck(torch.ops.fastspec.attention_pool_fwd, (h, k))
        torch.library.opcheck(torch.ops.fastspec.attention_pool_fwd,
                              (h.clone().requires_grad_(), k.clone().requires_grad_()))
    g = torch.randn(2, 1).expand(2, 3)  # what autograd hands over after a .sum(): zero strides
    torch.library.opcheck(torch.ops.fastspec.attention_pool_bwd, (g, torch.randn(2, 3, 5), torch.randn(2, 3, 5)))


def test_torch_compile_cpu():
    # One small compile (~10-20 s on 2 cores): the op must trace without graph breaks, forward and backward.
    N, C, T = 2, 4, 72
    x = torch.randn(N, 2 * C, T, requires_grad=True)
    compiled = torch.compile(attention_pool, fullgraph=True)
    e = compiled(x[:, :C], x[:, C:])
    g = torch.randn(N, C)
    (dx,) = torch.autograd.grad(e, x, g)
    x64 = x.detach().double().requires_grad_()
    e64 = softmax_pool64(x64[:, :C], x64[:, C:])
    (dx64,) = torch.autograd.grad(e64, x64, g.double())
    assert_close(e, e64, torch.float32, what="compiled e")
    assert_close(dx, dx64, torch.float32, what="compiled dx")
