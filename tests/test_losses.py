"""Losses against float64 numpy computations written from their formulas (paper eq. 1, spender's `_loss`,
spender's consistency loss)."""
import numpy as np
import pytest
import torch

from fastspec.losses import consistency_loss, spender_loss, weighted_mse


def data(n=5, L=40, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.normal(1, 0.3, (n, L))
    y_hat = y + rng.normal(0, 0.1, (n, L))
    w = rng.uniform(0, 3, (n, L))
    w[:, :5] = 0
    valid = rng.uniform(size=(n, L)) > 0.2
    return y, y_hat, w, valid


def t32(*arrays):
    return [torch.from_numpy(np.asarray(a)).float() if a.dtype != bool else torch.from_numpy(a) for a in arrays]


def test_weighted_mse_matches_formula():
    y, y_hat, w, valid = data()
    ref = np.array([np.sum(w[n] * valid[n] * (y[n] - y_hat[n]) ** 2) / np.sum(w[n] * valid[n])
                    for n in range(len(y))])
    got = weighted_mse(*t32(y, y_hat, w, valid))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    # without valid: plain Σ w (y−ŷ)² / Σ w
    ref = (w * (y - y_hat) ** 2).sum(1) / w.sum(1)
    np.testing.assert_allclose(weighted_mse(*t32(y, y_hat, w)).numpy(), ref, rtol=1e-5)


def test_weighted_mse_of_a_spectrum_without_weight_is_zero_and_differentiable():
    y, y_hat, w, _ = data(n=2)
    w[0] = 0
    y_t, y_hat_t, w_t = t32(y, y_hat, w)
    y_hat_t.requires_grad_(True)
    loss = weighted_mse(y_t, y_hat_t, w_t)
    assert loss[0].item() == 0.0 and loss[1].item() > 0
    loss.sum().backward()
    assert torch.isfinite(y_hat_t.grad).all() and (y_hat_t.grad[0] == 0).all()
    # gradient of eq. (1): ∂/∂ŷ = −2 w (y−ŷ) / Σ w
    ref = -2 * w[1] * (y[1] - y_hat[1]) / w[1].sum()
    np.testing.assert_allclose(y_hat_t.grad[1].numpy(), ref, rtol=1e-4, atol=1e-7)


def test_weighted_mse_accumulates_half_precision_in_float32():
    y, y_hat, w, _ = data()
    got = weighted_mse(*[t.half() for t in t32(y, y_hat, w)])
    assert got.dtype == torch.float32
    yh, yhh, wh = (np.float16(a).astype(np.float64) for a in (y, y_hat, w))
    np.testing.assert_allclose(got.numpy(), (wh * (yh - yhh) ** 2).sum(1) / wh.sum(1), rtol=1e-4)


def test_spender_loss_matches_formula():
    y, y_hat, w, valid = data()
    ref = np.sum(0.5 * w * valid * (y - y_hat) ** 2, axis=1) / y.shape[1]
    np.testing.assert_allclose(spender_loss(*t32(y, y_hat, w, valid)).numpy(), ref, rtol=1e-5)


def test_shape_errors():
    y, y_hat, w, _ = data()
    with pytest.raises(ValueError, match="same shape"):
        weighted_mse(*t32(y, y_hat[:, :-1], w))
    with pytest.raises(ValueError, match=r"shape \(N, S\)"):
        consistency_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="batch of at least 2"):
        consistency_loss(torch.zeros(1, 4), torch.zeros(1, 4))


def test_consistency_loss_matches_formula():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(6, 4))
    s_aug = s + rng.normal(0, 0.3, s.shape)
    S = s.shape[1]
    d2 = ((s_aug - s) ** 2).sum(1)
    # fixed σ
    ref = 1 / (1 + np.exp(-d2 / (S * 0.5**2))) - 0.5
    got = consistency_loss(*t32(s, s_aug), sigma=0.5)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)
    # σ² = mean per-dimension (unbiased) variance of s across the batch, as spender 0.3
    sigma2 = s.var(axis=0, ddof=1).mean()
    ref = 1 / (1 + np.exp(-d2 / (S * sigma2))) - 0.5
    np.testing.assert_allclose(consistency_loss(*t32(s, s_aug)).numpy(), ref, rtol=1e-5, atol=1e-7)


def test_consistency_loss_limits_and_scale_invariance():
    s = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(consistency_loss(s, s.clone()), torch.zeros(8))
    far = consistency_loss(s, s + 100.0, sigma=1.0)
    torch.testing.assert_close(far, torch.full((8,), 0.5))
    other = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    # with the batch-variance scale, rescaling all latents changes nothing
    torch.testing.assert_close(consistency_loss(3 * s, 3 * other), consistency_loss(s, other))


def test_consistency_per_dim_closes_the_stretching_loophole():
    torch.manual_seed(3)
    s = torch.randn(64, 6, dtype=torch.float64)
    s_aug = s + 0.3 * torch.randn(64, 6, dtype=torch.float64)
    s_aug[:, 0] = s[:, 0] + 0.01 * torch.randn(64, dtype=torch.float64)  # a direction redshift does not move
    var = s.numpy().var(axis=0, ddof=1)
    expect = 1 / (1 + np.exp(-(((s_aug - s).numpy() ** 2) / var).sum(1) / 6)) - 0.5
    np.testing.assert_allclose(consistency_loss(s, s_aug, "per_dim").numpy(), expect, rtol=1e-12)
    # stretch that direction by 10 (the decoder can undo it): spender's mean-variance σ grows and every other
    # direction's penalty shrinks; per-dimension scaling does not move
    stretch = torch.ones(6, dtype=torch.float64)
    stretch[0] = 10
    mean_before = consistency_loss(s, s_aug).mean()
    mean_after = consistency_loss(s * stretch, s_aug * stretch).mean()
    assert mean_after < 0.5 * mean_before
    torch.testing.assert_close(consistency_loss(s * stretch, s_aug * stretch, "per_dim"),
                               consistency_loss(s, s_aug, "per_dim"))
    with pytest.raises(ValueError, match="sigma must be None, 'per_dim', 'whiten' or a number, got 'perdim'"):
        consistency_loss(s, s_aug, "perdim")


def test_cli_consistency_sigma_values(capsys):
    from fastspec import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "x.h5", "-o", "r", "--consistency-sigma", "wide"])
    assert "--consistency-sigma takes a positive number, per-dim or whiten, got 'wide'" in capsys.readouterr().err


def test_consistency_whiten_is_invariant_to_any_linear_map_of_the_latents():
    torch.manual_seed(4)
    s = torch.randn(128, 5, dtype=torch.float64)
    s_aug = s + 0.2 * torch.randn(128, 5, dtype=torch.float64)
    cov = np.cov(s.numpy().T)
    d = (s_aug - s).numpy()
    m = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov + 1e-6 * np.trace(cov) / 5 * np.eye(5)), d) / 5
    np.testing.assert_allclose(consistency_loss(s, s_aug, "whiten").numpy(), 1 / (1 + np.exp(-m)) - 0.5, rtol=1e-9)
    # a rotated, stretched latent space (what per_dim cannot see): the whitened penalty does not move
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
    A = torch.as_tensor(q @ np.diag([10.0, 1, 1, 1, 1]) @ q.T)
    torch.testing.assert_close(consistency_loss(s @ A, s_aug @ A, "whiten"), consistency_loss(s, s_aug, "whiten"),
                               rtol=1e-4, atol=1e-9)  # up to the ε·I regulariser
    assert not torch.allclose(consistency_loss(s @ A, s_aug @ A, "per_dim"), consistency_loss(s, s_aug, "per_dim"),
                              rtol=1e-3)
