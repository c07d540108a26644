"""SpectrumAutoencoder against an independent float64 implementation of the forward pass (torch.nn.functional
for the network, numpy.interp for the redshift-resample), the default kernel backend against 'torch', and
the config / checkpoint / input-error behaviour users see."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastspec.kernels import use_backend

from fastspec.instruments import get_instrument
from fastspec.losses import spender_loss, weighted_mse
from fastspec.model import ModelConfig, ModelConfigError, SpectrumAutoencoder

# A small log-linear instrument keeps the full architecture (128/256/512 channels) cheap on 2 cores:
# 256 pixels → 52 → 5 positions for attention pooling.
TOY = {"name": "toy", "start": 3.6, "step": 4e-4, "L": 256, "loglinear": True}


def toy_config(**kw):
    return ModelConfig(instrument=dict(TOY), n_latent=6, z_max=0.5, **kw)


def batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = model.wave_obs.shape[0]
    y = 1 + 0.3 * torch.randn(n, L, generator=g)
    w = torch.rand(n, L, generator=g) * 4
    w[:, 10:20] = 0  # a masked stretch
    z = 0.05 + 0.4 * torch.rand(n, generator=g)
    z[-1] = 0.7  # beyond z_max: the blue end falls off the restframe grid
    return y, w, z


# --- independent reference -----------------------------------------------------------------------------------


def rest_interp(model, lam, x):
    """x (R,) on the model's restframe grid, linearly interpolated at wavelengths lam, in the coordinate the
    grid is uniform in (λ or log10 λ): the grid rebuilt in float64 from its end points, since its float32
    copy is off by up to half an ulp (~1e-4 Å). Also returns which lam fall inside the grid."""
    r = model.wave_rest.double().numpy()
    if model.config.rest_spacing == "log":
        coord, at = np.linspace(np.log10(r[0]), np.log10(r[-1]), r.size), np.log10(lam)
    else:
        coord, at = np.linspace(r[0], r[-1], r.size), lam
    inside = (at >= coord[0]) & (at <= coord[-1])
    return np.where(inside, np.interp(at, coord, x), 0.0), inside


def reference_forward(model, y, z):
    """(s, x_rest, y_hat, valid) in float64 from the model's weights, written from DESIGN §1 directly."""
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = y.double().unsqueeze(1)
    for i, k in enumerate(cfg.encoder_kernels):
        x = F.conv1d(x, p[f"encoder.blocks.{i}.conv.weight"], p[f"encoder.blocks.{i}.conv.bias"], padding=k // 2)
        x = F.instance_norm(x, eps=1e-5)
        x = F.prelu(x, p[f"encoder.blocks.{i}.act.weight"])
        if i < len(cfg.encoder_pools):
            q = cfg.encoder_pools[i]
            x = F.max_pool1d(x, q, padding=q // 2)
    C = x.shape[1] // 2
    h, a = x[:, :C], x[:, C:]
    e = (h * torch.softmax(a, dim=-1)).sum(-1)
    if cfg.conditioned:
        e = torch.cat([e, z.double()[:, None]], 1)
    n_enc = len(cfg.encoder_hidden) + 1
    for j in range(n_enc):
        e = F.linear(e, p[f"encoder.mlp.{2 * j}.weight"], p[f"encoder.mlp.{2 * j}.bias"])
        if j < n_enc - 1:
            e = F.prelu(e, p[f"encoder.mlp.{2 * j + 1}.weight"])
    s = e
    n_dec = len(cfg.decoder_hidden) + 1
    x = s
    for j in range(n_dec):
        x = F.linear(x, p[f"decoder.mlp.{2 * j}.weight"], p[f"decoder.mlp.{2 * j}.bias"])
        if cfg.activation == "leakyrelu":
            x = F.leaky_relu(x, cfg.leaky_slope)
        else:
            g, b = p[f"decoder.mlp.{2 * j + 1}.gamma"], p[f"decoder.mlp.{2 * j + 1}.beta"]
            x = (g + (1 - g) * torch.sigmoid(b * x)) * x
            if j == n_dec - 1:
                x = x + 1
    wave_obs = model.wave_obs.double().numpy()
    y_hat = np.zeros((y.shape[0], wave_obs.size))
    valid = np.zeros((y.shape[0], wave_obs.size), dtype=bool)
    for n in range(y.shape[0]):
        y_hat[n], valid[n] = rest_interp(model, wave_obs / (1 + float(z[n])), x[n].numpy())
    return s, x, torch.from_numpy(y_hat), torch.from_numpy(valid)


def close(a, b, rtol):
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().clamp_min(1e-12)
    err = ((a - b).abs().max() / scale).item()
    assert err < rtol, f"max |Δ| / max |ref| = {err:.2e} ≥ {rtol:.0e}"


# --- architecture -----------------------------------------------------------------------------------------------


def test_sdss_shapes_follow_the_design():
    torch.manual_seed(0)
    # the linear restframe grid (spender's kind): λ_min/(1+z_max) … λ_max in R = ceil(L·(1+z_max)) pixels
    linear = SpectrumAutoencoder(ModelConfig(instrument="sdss", n_latent=10, z_max=0.5, rest_grid="linear"))
    assert linear.wave_rest.shape == (int(np.ceil(3921 * 1.5)),)
    np.testing.assert_allclose(linear.wave_rest[0].item(), 10**3.578 / 1.5, rtol=1e-6)
    np.testing.assert_allclose(linear.wave_rest[-1].item(), 10 ** (3.578 + 3920e-4), rtol=1e-6)
    # log-linear with the SDSS step from λ_min/(1+z_max), covering λ_max: R = 5682
    single = SpectrumAutoencoder(ModelConfig(instrument="sdss", n_latent=10, z_max=0.5, rest_grid="log",
                                             oversample=1))
    assert single.config.rest_spacing == "log" and single.wave_rest.shape == (5682,)
    logw = np.log10(single.wave_rest.double().numpy())
    np.testing.assert_allclose(logw[0], 3.578 - np.log10(1.5), atol=1e-7)
    np.testing.assert_allclose(np.diff(logw), 1e-4, atol=1e-7)  # float32 wavelengths: ~3e-8 in log10
    assert single.wave_rest[-1].item() >= 10 ** (3.578 + 3920e-4) * (1 - 1e-7)
    # the log grid's default: oversampled 2× (half the SDSS step)
    double = SpectrumAutoencoder(ModelConfig(instrument="sdss", n_latent=10, z_max=0.5, rest_grid="log"))
    assert double.config.rest_oversample == 2 and double.wave_rest.shape == (11363,)
    logw2 = np.log10(double.wave_rest.double().numpy())
    np.testing.assert_allclose(logw2[0], logw[0], atol=1e-7)
    np.testing.assert_allclose(np.diff(logw2), 5e-5, atol=1e-7)
    assert double.wave_rest[-1].item() >= 10 ** (3.578 + 3920e-4) * (1 - 1e-7)
    # the default: the linear grid; 'auto' picks log for log-linear instruments, linear for DESI
    model = SpectrumAutoencoder(ModelConfig(instrument="sdss", n_latent=10, z_max=0.5)).eval()
    assert model.config.rest_spacing == "linear" and torch.equal(model.wave_rest, linear.wave_rest)
    assert ModelConfig(instrument="sdss", rest_grid="auto").rest_spacing == "log"
    assert ModelConfig(instrument="desi", rest_grid="auto").rest_spacing == "linear"
    assert ModelConfig(instrument="desi").rest_spacing == "linear"
    assert ModelConfig(instrument="desi").n_restframe == get_instrument("desi").n_rest(0.5)
    assert ModelConfig(instrument="desi", oversample=2).n_restframe == 2 * get_instrument("desi").n_rest(0.5)
    assert model.wave_obs.shape == (3921,) and model.wave_obs.dtype == torch.float32
    y = torch.randn(2, 3921)
    with torch.no_grad():
        h, k = model.encoder.features(y)
        assert h.shape == k.shape == (2, 256, 72)  # 3921 → 785 → 72 positions
        s = model.encode(y, torch.tensor([0.1, 0.2]))
        assert s.shape == (2, 10)
        assert model.decode(s).shape == (2, model.wave_rest.shape[0])
    assert model.encoder.mlp[0].in_features == 257  # conditioned: z appended


@pytest.mark.parametrize("conditioned, activation, rest_grid", [(True, "leakyrelu", "log"),
                                                                (False, "speculator", "linear"),
                                                                (True, "leakyrelu", "linear")])
def test_forward_matches_float64_reference(conditioned, activation, rest_grid):
    torch.manual_seed(1)
    model = SpectrumAutoencoder(toy_config(conditioned=conditioned, activation=activation,
                                           rest_grid=rest_grid)).eval()
    assert model.config.rest_spacing == rest_grid
    y, w, z = batch(model)
    s_ref, x_ref, y_ref, valid_ref = reference_forward(model, y, z)
    with use_backend("torch"), torch.no_grad():
        s = model.encode(y, z)
        x = model.decode(s)
        y_hat, valid = model(y, z)
        loss = model.loss(y, w, z)
        loss_sp = model.loss(y, w, z, kind="spender")
    close(s, s_ref, 1e-5)
    close(x, x_ref, 1e-5)
    assert torch.equal(valid, valid_ref)
    assert 0 < valid.sum() < valid.numel()  # the test z mix leaves some pixels outside the restframe grid
    close(y_hat, y_ref, 1e-5)
    wv = w.double() * valid_ref
    paper = (wv * (y.double() - y_ref) ** 2).sum(1) / wv.sum(1).mean()  # eq. (1): Σw over the batch
    sp = (0.5 * wv * (y.double() - y_ref) ** 2).sum(1) / y.shape[1]
    close(loss, paper, 1e-5)
    close(loss_sp, sp, 1e-5)


def test_encoder_ignores_z_only_when_unconditioned():
    torch.manual_seed(2)
    y, _, z = batch(SpectrumAutoencoder(toy_config()), n=2)
    for conditioned in (False, True):
        model = SpectrumAutoencoder(toy_config(conditioned=conditioned)).eval()
        with torch.no_grad():
            same = torch.allclose(model.encode(y, z), model.encode(y, z + 0.1))
        assert same is (not conditioned)


def test_default_backend_matches_torch_backend_with_gradients():
    torch.manual_seed(3)
    model = SpectrumAutoencoder(toy_config(activation="speculator"))
    y, w, z = batch(model)

    def run(backend):
        model.zero_grad()
        with use_backend(backend):
            y_hat, valid = model(y, z)
            loss = model.loss(y, w, z).sum()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        return y_hat.detach(), valid, loss.detach(), grads

    ref = run("torch")
    got = run("auto")  # numba on CPU tensors
    close(got[0], ref[0], 1e-5)
    assert torch.equal(got[1], ref[1])
    close(got[2], ref[2], 1e-5)
    # conv biases feed an InstanceNorm, which removes them: their true gradient is 0 and both backends
    # return round-off (~1e-11), so every gradient is compared on the scale of the largest one
    scale = max(g.abs().max().item() for g in ref[3].values())
    for name, g in ref[3].items():
        assert torch.isfinite(got[3][name]).all(), name
        diff = (got[3][name] - g).abs().max().item()
        assert diff <= 1e-4 * g.abs().max().item() + 1e-7 * scale, f"{name}: |Δ| = {diff:.1e}"


def test_loss_is_the_fused_form_of_the_materialised_losses():
    torch.manual_seed(4)
    model = SpectrumAutoencoder(toy_config()).eval()
    y, w, z = batch(model)
    w[1] = 0  # a spectrum without valid weight has loss 0, not NaN
    with torch.no_grad():
        y_hat, valid = model(y, z)
        paper = model.loss(y, w, z, kind="paper")
        per_spectrum = model.loss(y, w, z, kind="spectrum")
        sp = model.loss(y, w, z, kind="spender")
        chi2, wsum = model.loss_terms(y, w, z)
    yd, yhd, wd = y.double(), y_hat.double(), (w * valid).double()
    chi2_ref, wsum_ref = (wd * (yd - yhd) ** 2).sum(1), wd.sum(1)
    close(chi2, chi2_ref, 1e-5)
    close(wsum, wsum_ref, 1e-6)
    # eq. (1): both sums over the whole batch; per spectrum χ²_n / mean_n(Σ w), whose mean is the ratio
    close(paper, chi2_ref / wsum_ref.mean(), 1e-5)
    close(paper.mean(), chi2_ref.sum() / wsum_ref.sum(), 1e-5)
    close(model.loss(y, w, z, kind="paper", mean_weight=2.5), chi2_ref / 2.5, 1e-5)
    close(per_spectrum, weighted_mse(y, y_hat, w, valid), 1e-5)
    close(sp, spender_loss(y, y_hat, w, valid), 1e-5)
    assert paper[1].item() == 0.0 and per_spectrum[1].item() == 0.0 and sp[1].item() == 0.0
    with pytest.raises(ValueError, match="loss kind"):
        model.loss(y, w, z, kind="chi2")


def test_generate_on_other_grids_and_redshifts():
    torch.manual_seed(5)
    model = SpectrumAutoencoder(toy_config()).eval()
    y, _, z = batch(model, n=3)
    with torch.no_grad():
        s = model.encode(y, z)
        y_hat, valid = model(y, z)
        g_hat, g_valid = model.generate(s, z)
        assert torch.equal(g_valid, valid)
        close(g_hat, y_hat, 1e-6)
        # any grid, any z (past z_max too): restframe model sampled at λ/(1+z), zero outside wave_rest
        grid = np.linspace(2500.0, 7000.0, 333)
        z_new = torch.tensor([0.0, 0.3, 0.9])
        out, ok = model.generate(s, z_new, wave_obs=grid)
        x = model.decode(s).double().numpy()
    for n in range(3):
        ref, inside = rest_interp(model, grid / (1 + float(z_new[n])), x[n])
        np.testing.assert_array_equal(ok[n].numpy(), inside)
        np.testing.assert_allclose(out[n].numpy(), ref, atol=1e-5 * np.abs(x[n]).max())
    with torch.no_grad():
        desi, _ = model.generate(s[:1], 0.2, wave_obs="desi")
    assert desi.shape == (1, 7781)


def test_checkpoint_rebuilds_the_model(tmp_path):
    torch.manual_seed(6)
    cfg = toy_config(activation="speculator", dropout=0.1, rest_grid="log")
    model = SpectrumAutoencoder(cfg).eval()
    json.dumps(cfg.to_dict())  # the config is JSON
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = model.save(tmp_path / "sub" / "model.pt", extra={"epoch": 3, "losses": torch.arange(3.0)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary left behind
    loaded, extra = SpectrumAutoencoder.load(path, return_extra=True)
    assert loaded.config == cfg and extra["epoch"] == 3
    loaded.eval()
    y, _, z = batch(model, n=2)
    with torch.no_grad():
        assert torch.equal(loaded(y, z)[0], model(y, z)[0])

    # a config given as a dict takes the defaults; a checkpoint written before `rest_grid` existed was built
    # on the linear grid and loads as such, whatever the default
    assert ModelConfig.from_dict({"instrument": dict(TOY), "rest_grid": "auto"}).rest_spacing == "log"
    payload = torch.load(path, weights_only=True)
    del payload["config"]["rest_grid"]
    lin = SpectrumAutoencoder(toy_config(activation="speculator", dropout=0.1, rest_grid="linear"))
    payload["state_dict"] = lin.state_dict()
    torch.save(payload, tmp_path / "old.pt")
    old = SpectrumAutoencoder.load(tmp_path / "old.pt")
    assert old.config.rest_spacing == "linear" and torch.equal(old.wave_rest, lin.wave_rest)


def test_checkpoint_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "fastspec.model", "format_version": 1, "state_dict": {}}, bad)
    with pytest.raises(ModelConfigError, match=r"bad\.pt.*'config'"):
        SpectrumAutoencoder.load(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(ModelConfigError, match=r"bad\.pt.*not a fastspec model checkpoint"):
        SpectrumAutoencoder.load(bad)
    good = SpectrumAutoencoder(toy_config()).save(tmp_path / "m.pt")
    payload = torch.load(good, weights_only=True)
    payload["config"]["n_latent"] = 7
    torch.save(payload, bad)
    with pytest.raises(ModelConfigError, match=r"bad\.pt.*'state_dict' does not fit"):
        SpectrumAutoencoder.load(bad)
    payload["config"]["colour"] = "red"
    torch.save(payload, bad)
    with pytest.raises(ModelConfigError, match=r"bad\.pt.*unknown model config field.*colour"):
        SpectrumAutoencoder.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SpectrumAutoencoder.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("kw, msg", [
    ({"activation": "relu"}, "ModelConfig.activation"),
    ({"instrument": "hubble"}, "unknown instrument 'hubble'"),
    ({"n_latent": 0}, "ModelConfig.n_latent"),
    ({"dropout": 1.5}, "ModelConfig.dropout"),
    ({"encoder_pools": (5,)}, "ModelConfig.encoder_pools"),
    ({"grid": "spender", "instrument": dict(TOY)}, "grid='spender'"),
    ({"oversample": 0}, r"ModelConfig.oversample must be an integer in \[1, 16\] or None"),
    ({"rest_grid": "cubic"}, "ModelConfig.rest_grid must be one of"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ModelConfigError, match=msg):
        ModelConfig(**kw)


def test_input_errors_are_clear():
    model = SpectrumAutoencoder(toy_config())
    with pytest.raises(ValueError, match=r"shape \(2, 100\).*toy grid needs \(N, 256\)"):
        model.encode(torch.zeros(2, 100), torch.zeros(2))
    with pytest.raises(ValueError, match="conditioned on the redshift"):
        model.encode(torch.zeros(2, 256))
    with pytest.raises(ValueError, match=r"z must have shape \(2,\)"):
        model(torch.zeros(2, 256), torch.zeros(3))
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 6\)"):
        model.decode(torch.zeros(2, 5))


def test_half_precision_keeps_wavelengths_float32():
    model = SpectrumAutoencoder(toy_config()).half()
    assert model.wave_obs.dtype == model.wave_rest.dtype == torch.float32
    assert model.decoder.mlp[0].weight.dtype == torch.float16
    ref = SpectrumAutoencoder(toy_config())
    assert torch.equal(model.wave_rest, ref.wave_rest)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(7)
    model = SpectrumAutoencoder(toy_config(dropout=0.5))
    assert isinstance(model.encoder.blocks[0].drop, torch.nn.Dropout)
    y, _, z = batch(model, n=2)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model.encode(y, z), model.encode(y, z))
        model.eval()
        assert torch.equal(model.encode(y, z), model.encode(y, z))
