"""Latent (and redshift) refinement through the frozen decoder (fastspec.fit): planted latents and redshifts
are recovered, the χ² it reports matches an independent float64 computation, and the model is left as it was."""
import numpy as np
import pytest
import torch

from fastspec.fit import refine
from fastspec.model import ModelConfig, SpectrumAutoencoder

TOY = {"name": "toy", "start": 3.6, "step": 4e-4, "L": 256, "loglinear": True}


def toy_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(instrument=dict(TOY), n_latent=3, z_max=0.5, encoder_channels=(8, 16, 32),
                      encoder_hidden=(16, 8), decoder_hidden=(16, 32, 64), activation="speculator",
                      rest_grid="log")
    model = SpectrumAutoencoder(cfg)
    # a continuum with narrow lines around which the latents vary, so that redshift is well defined
    logw = torch.log10(model.wave_rest.double())
    lines = sum(torch.exp(-0.5 * ((logw - c) / 6e-4) ** 2) for c in (3.50, 3.56, 3.62, 3.66, 3.71))
    model.init_output((1 + 2 * lines).float(), weight_scale=1.0)
    return model


def planted(model, n=6, seed=1, sigma=0.01):
    """Spectra made by the decoder itself from known latents s_true at known z, with noise σ."""
    g = torch.Generator().manual_seed(seed)
    s_true = torch.randn(n, model.n_latent, generator=g)
    z = 0.05 + 0.3 * torch.rand(n, generator=g)
    with torch.no_grad():
        y, valid = model(torch.zeros(n, model.wave_obs.shape[0]), z, s=s_true)
    y = y + sigma * torch.randn(y.shape, generator=g)
    w = valid.float() / sigma**2
    return y * valid, w, z, s_true


def chi2_float64(model, s, z, y, w, n_par):
    """Reduced χ² of latents s at z, in float64, with numpy.interp for the redshift-resample (log-linear
    restframe grid rebuilt from its end points)."""
    m = model.double()
    try:
        with torch.no_grad():
            x = m.decoder(s.double()).numpy()
    finally:
        model.float()
    r = model.wave_rest.double().numpy()
    coord = np.linspace(np.log10(r[0]), np.log10(r[-1]), r.size)
    out = []
    for i in range(len(z)):
        at = np.log10(model.wave_obs.double().numpy() / (1 + float(z[i])))
        inside = (at >= coord[0]) & (at <= coord[-1])
        y_model = np.where(inside, np.interp(at, coord, x[i]), 0.0)
        wi, yi = w[i].double().numpy(), y[i].double().numpy()
        chi = np.sum(wi * inside * (yi - y_model) ** 2)
        out.append(chi / (np.sum(inside & (wi > 0)) - n_par))
    return np.array(out)


def test_refine_recovers_planted_latents_and_reports_the_float64_chi2():
    model = toy_model()
    y, w, z, s_true = planted(model, sigma=0.003)
    s_start = s_true + 0.5 * torch.randn(s_true.shape, generator=torch.Generator().manual_seed(2))
    r = refine(model, y, w, z, s=s_start, steps=400, lr=0.05, tol=0, patience=1000)
    # pure noise leaves χ² ≈ 1; the starting latents are far off (for most spectra: where the random decoder
    # barely responds to a latent, the data cannot pin it down either)
    constrained = r.chi2_before > 2
    assert int(constrained.sum()) >= 4
    assert float(r.chi2_after.max()) < 1.3
    assert torch.allclose(r.latents[constrained], s_true[constrained], atol=0.05)
    assert torch.equal(r.z, z)
    np.testing.assert_allclose(r.chi2_before.numpy(), chi2_float64(model, s_start, z, y, w, 3), rtol=1e-4)
    np.testing.assert_allclose(r.chi2_after.numpy(), chi2_float64(model, r.latents, z, y, w, 3), rtol=1e-4)


def test_refine_fits_redshift_too():
    model = toy_model()
    y, w, z, s_true = planted(model, sigma=0.003)
    dz = torch.tensor([3e-4, -3e-4, 2e-4, -2e-4, 1e-4, -1e-4])
    r = refine(model, y, w, z + dz, s=s_true, steps=400, lr=0.02, fit_z=True, lr_z=2e-5, tol=0, patience=1000)
    # the redshift error is a fraction of a pixel (Δlog10 λ = 4e-4 ↔ Δz ≈ 9e-4); refined to ≪ its size
    assert float((r.z - z).abs().max()) < 3e-5, (r.z - z)
    assert float(r.chi2_after.max()) < 1.3
    # the reported χ² counts z as one more fitted parameter
    np.testing.assert_allclose(r.chi2_after.numpy(), chi2_float64(model, r.latents, r.z, y, w, 4), rtol=1e-4)


def test_refine_never_returns_worse_than_it_started_and_stops_early():
    model = toy_model()
    y, w, z, s_true = planted(model)
    # far too large a step: Adam oscillates, but the best state each spectrum reached is what comes back
    r = refine(model, y, w, z, s=s_true + 0.3, steps=50, lr=5.0, patience=5)
    assert bool((r.chi2_after <= r.chi2_before * (1 + 1e-5)).all())
    assert int(r.steps.max()) < 50  # every spectrum gave up well before the budget
    assert r.steps.dtype == torch.long


def test_zero_steps_is_the_encoder_pass_and_the_model_is_left_as_it_was():
    model = toy_model().train()
    y, w, z, _ = planted(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.decoder.mlp[0].weight.requires_grad_(False)  # a user's own freezing survives
    r = refine(model, y, w, z, steps=0)
    with torch.no_grad():
        s_enc = model.eval().encode(y, z)
    model.train()
    assert torch.allclose(r.latents, s_enc)
    assert torch.equal(r.chi2_after, r.chi2_before)
    assert int(r.steps.max()) == 0
    refine(model, y, w, z, steps=5)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads.pop("decoder.mlp.0.weight") is False and all(grads.values())


def test_each_spectrum_is_refined_independently_of_its_batch():
    model = toy_model()
    y, w, z, s_true = planted(model)
    s_start = s_true + 0.3
    together = refine(model, y, w, z, s=s_start, steps=30)
    alone = refine(model, y[2:3], w[2:3], z[2:3], s=s_start[2:3], steps=30)
    assert torch.allclose(together.latents[2], alone.latents[0], atol=1e-5)
    assert torch.equal(together.steps[2:3], alone.steps)


def test_method_on_the_model_and_errors():
    model = toy_model()
    y, w, z, _ = planted(model, n=2)
    assert model.refine(y, w, z, steps=2).latents.shape == (2, 3)
    with pytest.raises(ValueError, match="steps must be ≥ 0"):
        refine(model, y, w, z, steps=-1)
