"""fastspec.kernels.instance_norm_prelu_pool and spectrum_conv_block: every backend (numba, Triton interpreter,
CUDA when present) against float64 torch modules (nn.InstanceNorm1d → nn.PReLU → nn.MaxPool1d, nn.Conv1d in
front), forward and backward, plus ties, odd lengths, half types, NaN rows, errors, opcheck, and the encoder's
fused blocks against its plain-module blocks."""
import pytest
import torch
from fastspec.kernels import instance_norm_prelu_pool, spectrum_conv_block, use_backend
from kernel_testing import BACKENDS, IDS, assert_close
from torch import nn


def modules64(C, pool, padding, slopes):
    """The independent oracle: torch's own modules in float64."""
    act = nn.PReLU(len(slopes)).double()
    with torch.no_grad():
        act.weight.copy_(slopes.double())
    layers = [nn.InstanceNorm1d(C), act]
    if pool > 1:
        layers.append(nn.MaxPool1d(pool, padding=padding))
    return nn.Sequential(*layers).double()


def oracle(x, slopes, pool, padding, g):
    x64 = x.detach().double().requires_grad_()
    net = modules64(x.shape[1], pool, padding, slopes)
    y = net(x64)
    dx, dw = torch.autograd.grad(y, (x64, net[1].weight), g.double())
    return y.detach(), dx, dw


def run(backend, x, slopes, pool, padding, g):
    x = x.detach().requires_grad_()
    w = slopes.detach().clone().requires_grad_()
    with use_backend(backend):
        y = instance_norm_prelu_pool(x, w, pool, padding)
        dx, dw = torch.autograd.grad(y, (x, w), g)
    return y, dx, dw


def inputs(N, C, L, pool, padding, dtype, device, n_slopes=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (1.5 + 2 * torch.randn(N, C, L, generator=gen)).to(dtype).to(device)
    slopes = (torch.rand(n_slopes or C, generator=gen) - 0.4).to(device)  # both signs
    L_out = (L + 2 * padding - pool) // pool + 1
    g = torch.randn(N, C, L_out, generator=gen).to(dtype).to(device)
    return x, slopes, g


# (L, pool, padding): the encoder's pools, no pooling, a dropped tail (23 = 7·3 + 2), the first window
# entirely padding but one pixel, and one shared slope
SHAPES = [(37, 5, 2, None), (60, 11, 5, None), (24, 1, 0, None), (23, 3, 0, None), (23, 4, 2, None),
          (19, 5, 2, 1)]
SHAPE_IDS = ["pool5", "pool11", "nopool", "tail-dropped", "pad-half", "shared-slope"]


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("L,pool,padding,n_slopes", SHAPES, ids=SHAPE_IDS)
def test_matches_float64_modules(backend, device, L, pool, padding, n_slopes):
    x, slopes, g = inputs(3, 4, L, pool, padding, torch.float32, device, n_slopes)
    y, dx, dw = run(backend, x, slopes, pool, padding, g)
    y_ref, dx_ref, dw_ref = oracle(x, slopes, pool, padding, g)
    assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == slopes.shape
    assert y.dtype == dx.dtype == torch.float32 and y.device == x.device
    assert_close(y, y_ref, torch.float32, what="y")
    assert_close(dx, dx_ref, torch.float32, what="dx")
    assert_close(dw, dw_ref, torch.float32, what="dweight")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_in_and_out(backend, device, dtype):
    x, slopes, g = inputs(2, 3, 60, 11, 5, dtype, device, seed=1)
    y, dx, dw = run(backend, x, slopes, 11, 5, g)
    y_ref, dx_ref, dw_ref = oracle(x, slopes, 11, 5, g)  # from the same half-precision x and g
    assert y.dtype == dx.dtype == dtype and dw.dtype == torch.float32
    assert_close(y, y_ref, dtype, what="y")
    assert_close(dx, dx_ref, dtype, what="dx")
    # the slope gradient sums many rounded terms but is accumulated in fp32: relative to its size
    assert_close(dw, dw_ref, dtype, scale=dw_ref.abs().max(), what="dweight")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gradcheck_float64(backend, device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 11, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    w = torch.tensor([0.25, -0.3], dtype=torch.float64, device=device, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w: instance_norm_prelu_pool(x, w, 3, 1), (x, w), eps=1e-6,
                                        atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_ties_go_to_the_first_maximum(backend, device):
    # every window of 4 holds its maximum twice; equal inputs normalise to equal values in any precision
    N, C, L, pool = 1, 2, 16, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(N, C, L, generator=gen)
    x = x.view(N, C, L // pool, pool)
    top = x.amax(-1, keepdim=True) + 1.0
    x[..., 1:2], x[..., 3:4] = top, top
    x = x.reshape(N, C, L).to(device)
    slopes = torch.tensor([0.2, 0.3], device=device)
    g = torch.ones(N, C, L // pool, device=device)
    y, dx, dw = run(backend, x, slopes, pool, 0, g)
    y_ref, dx_ref, dw_ref = oracle(x, slopes, pool, 0, g)
    assert_close(dx, dx_ref, torch.float32, what="dx with ties")
    # the pooled gradient landed on slot 1 of each window, not slot 3: only there does dx differ from the
    # InstanceNorm-only part that every position gets
    xt = x.view(N, C, L // pool, pool)
    d = (dx.view(N, C, L // pool, pool) - dx_ref.view(N, C, L // pool, pool).to(dx.dtype)).abs().amax()
    assert d < 1e-5
    assert torch.equal(xt[..., 1], xt[..., 3])
    gap = dx.view(N, C, L // pool, pool)[..., 1] - dx.view(N, C, L // pool, pool)[..., 3]
    assert (gap.abs() > 0.1).all(), "slot 1 (first maximum) must carry the pooled gradient"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_nan_row_stays_in_its_row(backend, device):
    x, slopes, g = inputs(2, 3, 37, 5, 2, torch.float32, device, seed=4)
    x[1, 2, 17] = float("nan")
    y, dx, dw = run(backend, x, slopes, 5, 2, g)
    assert torch.isnan(y[1, 2]).all() and torch.isnan(dx[1, 2]).all()
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.isfinite(y[keep]).all() and torch.isfinite(dx[keep]).all()
    y_ref, dx_ref, _ = oracle(x[:1], slopes, 5, 2, g[:1])
    assert_close(y[:1], y_ref, torch.float32, what="y of a clean spectrum next to a NaN row")
    assert_close(dx[:1], dx_ref, torch.float32, what="dx of a clean spectrum next to a NaN row")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_strided_input_and_expanded_gradient(backend, device):
    # x as every other channel of a bigger buffer, g as autograd hands it over after a .sum() (zero strides)
    base, slopes, _ = inputs(2, 8, 37, 5, 2, torch.float32, device, seed=5)
    x = base[:, ::2]
    slopes = slopes[:4]
    g = torch.randn(2, 4, 1, device=device).expand(2, 4, 8)
    before = base.clone()
    y, dx, dw = run(backend, x, slopes, 5, 2, g)
    y_ref, dx_ref, dw_ref = oracle(x, slopes, 5, 2, g)
    assert_close(y, y_ref, torch.float32, what="y")
    assert_close(dx, dx_ref, torch.float32, what="dx")
    assert_close(dw, dw_ref, torch.float32, what="dweight")
    assert torch.equal(base, before), "input modified"


@pytest.mark.skipif("triton" not in [b for b, _ in BACKENDS], reason="triton not among the kernel backends")
@pytest.mark.parametrize("block_r,block_j", [(2, 4), (4, 2)])
def test_triton_block_edges(block_r, block_j):
    """Several programs with a partial last one, rows walked in several window chunks, a partial last chunk."""
    from fastspec.kernels.conv_block_triton import conv_block_bwd, conv_block_fwd

    device = dict(BACKENDS)["triton"]
    x, slopes, g = inputs(3, 3, 45, 5, 2, torch.float32, device, seed=6)  # R = 9 rows, 9 windows
    y, mean, rstd = conv_block_fwd(x, slopes, 5, 2, 1e-5, block_r=block_r, block_j=block_j)
    dx, dw = conv_block_bwd(g, x, slopes, mean, rstd, 5, 2, block_r=block_r, block_j=block_j)
    y_ref, dx_ref, dw_ref = oracle(x, slopes, 5, 2, g)
    assert_close(y, y_ref, torch.float32, what="y")
    assert_close(dx, dx_ref, torch.float32, what="dx")
    assert_close(dw, dw_ref, torch.float32, what="dweight")


@pytest.mark.parametrize("backend,device", BACKENDS + [("torch", "cpu")], ids=IDS + ["torch-cpu"])
def test_empty_batch(backend, device):
    x = torch.zeros(0, 3, 20, device=device, requires_grad=True)
    w = torch.full((3,), 0.25, device=device, requires_grad=True)
    with use_backend(backend):
        y = instance_norm_prelu_pool(x, w, 5, 2)
        assert y.shape == (0, 3, 4)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(3, device=device))


@pytest.mark.parametrize(
    "x_shape,w_shape,dtype,pool,padding,match",
    [
        ((2, 3), (3,), torch.float32, 1, 0, r"x must have shape \(N, C, L\), got shape \(2, 3\)"),
        ((2, 3, 10), (4,), torch.float32, 1, 0, r"weight \(the PReLU slopes\) must have shape \(3,\) or \(1,\).*\(4,\)"),
        ((2, 3, 10), (3,), torch.int32, 1, 0, r"x must be float16, bfloat16, float32 or float64; got torch.int32"),
        ((2, 3, 10), (3,), torch.float32, 0, 0, r"pool must be an integer ≥ 1, got 0"),
        ((2, 3, 10), (3,), torch.float32, 5, 3, r"padding must be an integer in \[0, pool // 2\] = \[0, 2\], got 3"),
        ((2, 3, 1), (3,), torch.float32, 1, 0, r"x needs at least 2 positions per row to normalise, got L=1"),
        ((2, 3, 4), (3,), torch.float32, 5, 0, r"L=4 positions are fewer than one pooling window \(pool=5"),
    ],
    ids=["ndim", "slopes", "int", "pool", "padding", "L=1", "short"],
)
def test_bad_input_errors(x_shape, w_shape, dtype, pool, padding, match):
    x = torch.zeros(x_shape, dtype=dtype)
    w = torch.zeros(w_shape)
    for backend in ("numba", "torch"):
        with use_backend(backend), pytest.raises((ValueError, TypeError), match="instance_norm_prelu_pool.*: " + match):
            instance_norm_prelu_pool(x, w, pool, padding)
    with pytest.raises((ValueError, TypeError), match=match):  # the custom op checks too
        torch.ops.fastspec.instance_norm_prelu_pool_fwd(x, w, pool, padding, 1e-5)


def test_backward_op_checks_gradient_shape():
    x = torch.zeros(2, 3, 10)
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"g must have shape \(N, C, L_out\) = \(2, 3, 2\), got \(2, 3, 10\)"):
        torch.ops.fastspec.instance_norm_prelu_pool_bwd(torch.zeros(2, 3, 10), x, torch.zeros(3), s, s, 5, 2)


def test_opcheck_custom_ops():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 23, generator=gen)
    w = torch.rand(3, generator=gen)
    for xx in (x, x.to(torch.bfloat16), x.to(torch.float16), x.double()):
        for pool, padding in ((5, 2), (1, 0)):
            torch.library.opcheck(torch.ops.fastspec.instance_norm_prelu_pool_fwd, (xx, w, pool, padding, 1e-5))
            torch.library.opcheck(torch.ops.fastspec.instance_norm_prelu_pool_fwd,
                                  (xx.clone().requires_grad_(), w.clone().requires_grad_(), pool, padding, 1e-5))
    y, mean, rstd = torch.ops.fastspec.instance_norm_prelu_pool_fwd(x, w, 5, 2, 1e-5)
    torch.library.opcheck(torch.ops.fastspec.instance_norm_prelu_pool_bwd,
                          (torch.randn(2, 1, 1).expand(y.shape), x, w, mean, rstd, 5, 2))
    y = torch.randn(2, 30, generator=gen)
    cw, cb = torch.randn(4, 1, 5, generator=gen), torch.randn(4, generator=gen)
    slopes = torch.rand(4, generator=gen)
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.fastspec.spectrum_block_fwd, (y, cw, cb, slopes, 5, 2, 1e-5, out_dtype))
    torch.library.opcheck(torch.ops.fastspec.spectrum_block_fwd,
                          (y, cw.clone().requires_grad_(), cb.clone().requires_grad_(),
                           slopes.clone().requires_grad_(), 5, 2, 1e-5, torch.float32))


# --- the first block with its conv: spectrum_conv_block -----------------------------------------------------

def spectrum_oracle(y, cw, cb, slopes, pool, padding, g):
    conv = nn.Conv1d(1, cw.shape[0], cw.shape[-1], padding=cw.shape[-1] // 2).double()
    with torch.no_grad():
        conv.weight.copy_(cw.double())
        conv.bias.copy_(cb.double())
    y64 = y.detach().double().requires_grad_(y.requires_grad)
    net = modules64(cw.shape[0], pool, padding, slopes)
    out = net(conv(y64.unsqueeze(1)))
    leaves = (conv.weight, conv.bias, net[1].weight) + ((y64,) if y.requires_grad else ())
    return out.detach(), torch.autograd.grad(out, leaves, g.double())


@pytest.mark.parametrize("backend", ["numba", "torch"] + (["triton"] if "triton" in dict(BACKENDS) else []))
@pytest.mark.parametrize("K,pool,padding", [(5, 5, 2), (4, 3, 0)], ids=["encoder", "even-kernel"])
def test_spectrum_conv_block_matches_float64(backend, K, pool, padding):
    gen = torch.Generator().manual_seed(8)
    N, C, L = 3, 4, 53
    y = 1 + 0.5 * torch.randn(N, L, generator=gen)
    cw = torch.randn(C, 1, K, generator=gen).requires_grad_()
    cb = torch.randn(C, generator=gen).requires_grad_()
    slopes = (torch.rand(C, generator=gen) - 0.4).requires_grad_()
    with use_backend(backend):
        out = spectrum_conv_block(y, cw, cb, slopes, pool, padding)
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (cw, cb, slopes), g)
    ref, want = spectrum_oracle(y, cw, cb, slopes, pool, padding, g)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close(out, ref, torch.float32, what="out")
    for name, a, b in zip(("conv weight", "conv bias", "slopes"), got, want):
        # the bias cancels in the InstanceNorm: its exact gradient is 0, ours is rounding noise around it
        assert_close(a, b, 2e-5, what=f"d {name}")


def test_spectrum_conv_block_autocast_and_input_gradient():
    gen = torch.Generator().manual_seed(9)
    y = 1 + 0.5 * torch.randn(2, 40, generator=gen)
    cw, cb = torch.randn(3, 1, 5, generator=gen), torch.randn(3, generator=gen)
    slopes = torch.rand(3, generator=gen)
    with use_backend("numba"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = spectrum_conv_block(y, cw, cb, slopes, 5, 2)
    assert out.dtype == torch.bfloat16, "under autocast the block returns what the conv would: bf16"
    ref, _ = spectrum_oracle(y, cw, cb, slopes, 5, 2, torch.zeros(2, 3, 8))
    assert_close(out, ref, torch.bfloat16, what="out under autocast")
    # a spectrum that needs a gradient (saliency maps) takes the unfused path and gets it
    yg = y.clone().requires_grad_()
    with use_backend("numba"):
        out = spectrum_conv_block(yg, cw, cb, slopes, 5, 2)
    g = torch.randn(out.shape, generator=gen)
    (dy,) = torch.autograd.grad(out, yg, g)
    _, want = spectrum_oracle(yg, cw, cb, slopes, 5, 2, g)
    assert_close(dy, want[-1], torch.float32, what="dy")


# --- the encoder -------------------------------------------------------------------------------------------

def tiny_models(dropout=0.0):
    from fastspec.model import ModelConfig, SpectrumAutoencoder

    inst = {"name": "tiny", "start": 3.6, "step": 1e-4, "L": 300, "loglinear": True}
    cfg = dict(instrument=inst, n_latent=3, encoder_channels=(8, 12, 16), dropout=dropout)
    torch.manual_seed(10)
    fused = SpectrumAutoencoder(ModelConfig(**cfg, fused_blocks=True))
    plain = SpectrumAutoencoder(ModelConfig(**cfg, fused_blocks=False))
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():  # slopes of both signs
        for a, b in zip(fused.encoder.blocks, plain.encoder.blocks):
            a.act.weight.uniform_(-0.5, 0.5)
            b.act.weight.copy_(a.act.weight)
    return fused, plain


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_encoder_fused_blocks_equal_plain_modules(dropout):
    fused, plain = tiny_models(dropout)
    assert set(fused.state_dict()) == set(plain.state_dict())  # same parameters, same names
    gen = torch.Generator().manual_seed(11)
    y = 1 + 0.3 * torch.randn(4, 300, generator=gen)
    w = torch.rand(4, 300, generator=gen)
    z = torch.tensor([0.05, 0.1, 0.2, 0.3])
    grads = []
    for model in (fused, plain):
        model.train()
        torch.manual_seed(12)  # the same dropout masks: dropout sits between activation and pooling in both
        with use_backend("numba"):
            loss = model.loss(y, w, z).sum()
            grads.append((loss.detach(), torch.autograd.grad(loss, list(model.encoder.parameters()))))
    (l1, g1), (l2, g2) = grads
    assert_close(l1, l2, 1e-5, scale=l2.abs(), what="loss")
    for (name, _), a, b in zip(fused.encoder.named_parameters(), g1, g2):
        assert_close(a, b, 2e-4, scale=max(b.abs().max().item(), 1e-3), what=name)


def test_encoder_fused_blocks_under_bf16_autocast():
    fused, plain = tiny_models()
    gen = torch.Generator().manual_seed(13)
    y = 1 + 0.3 * torch.randn(4, 300, generator=gen)
    z = torch.tensor([0.05, 0.1, 0.2, 0.3])
    with torch.no_grad():
        ref = plain.encode(y, z)
        with use_backend("numba"), torch.autocast("cpu", dtype=torch.bfloat16):
            h, _ = fused.encoder.features(y)
            s = fused.encode(y, z)
    assert h.dtype == torch.bfloat16, "activations stay bf16 between the blocks"
    assert_close(s, ref, 0.05, scale=ref.abs().max(), what="latents under autocast")
