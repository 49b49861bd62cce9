"""Spectrum: eigenvalues, effective ranks, decay fits, alignment, kernel ridge — against obvious references."""

import json
import math

import numpy as np
import pytest
import torch

from taskvec.spectrum import (
    SpectrumReport,
    bootstrap_alpha,
    center_kernel,
    effective_ranks,
    eigenvalues,
    fit_decay,
    kernel_ridge_accuracy,
    kernel_target_alignment,
    sketch_floor,
    spectrum_report,
    top_eigenvalues_from_features,
)


def _psd(n, seed=0, d=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d or n, generator=g, dtype=torch.float64)
    return X @ X.T, X


def test_eigenvalues_normalised_symmetrised_centred():
    K, _ = _psd(12)
    lam = eigenvalues(K)
    ref = np.sort(np.linalg.eigvalsh(K.numpy() / 12))[::-1]
    assert np.allclose(lam.numpy(), ref, rtol=1e-12, atol=1e-12)
    asym = K + 1e-9 * torch.randn(12, 12, dtype=torch.float64)
    assert torch.allclose(eigenvalues(asym), eigenvalues(0.5 * (asym + asym.T)), atol=1e-14)
    H = torch.eye(12, dtype=torch.float64) - 1.0 / 12
    assert torch.allclose(eigenvalues(K, centered=True), eigenvalues(H @ K @ H), atol=1e-10)
    # full (n, n, o, o) kernel: n·o eigenvalues of K/n, centring over examples (H ⊗ I_o)
    K4 = K.reshape(4, 3, 4, 3).permute(0, 2, 1, 3)
    lam4 = eigenvalues(K4)
    assert lam4.shape == (12,) and torch.allclose(lam4, eigenvalues(K) * 12 / 4, atol=1e-10)
    Ho = torch.kron(torch.eye(4, dtype=torch.float64) - 0.25, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(center_kernel(K, o=3), Ho @ K @ Ho, atol=1e-10)


def test_top_eigenvalues_from_features():
    _, X = _psd(40, d=200)
    X = X * (torch.arange(1, 201, dtype=torch.float64) ** -1.0)  # a decaying spectrum, as NTKs have
    K = X @ X.T
    top = top_eigenvalues_from_features(X, r=5, niter=8)
    assert np.allclose(top.numpy(), eigenvalues(K)[:5].numpy(), rtol=1e-6)
    topc = top_eigenvalues_from_features(X, r=5, centered=True, niter=8)
    assert np.allclose(topc.numpy(), eigenvalues(K, centered=True)[:5].numpy(), rtol=1e-6)


def test_effective_ranks_hand_spectra():
    r = effective_ranks([2.0] * 10 + [0.0] * 5)
    assert r.participation_ratio == pytest.approx(10) and r.entropy_rank == pytest.approx(10)
    assert r.stable_rank == pytest.approx(10) and r.k90 == 9 and r.k99 == 10
    r = effective_ranks([3.0, 1.0])
    assert r.participation_ratio == pytest.approx(16 / 10)
    assert r.entropy_rank == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert r.stable_rank == pytest.approx(4 / 3) and r.k90 == 2


def test_decay_fits():
    i = np.arange(1, 201)
    fit = fit_decay(5.0 * i ** -1.7)
    assert fit.alpha == pytest.approx(1.7, abs=1e-10) and fit.r2 == pytest.approx(1.0)
    assert fit.start == 4 and fit.stop == 100 and fit.better == "power"
    assert fit.rate_exponent == pytest.approx(1.7 / 2.7)
    ex = fit_decay(np.exp(-0.3 * i))
    assert ex.better == "exponential" and ex.exp_rate == pytest.approx(0.3, abs=1e-10)
    # the floor ends the window
    lam = np.concatenate([i[:50] ** -2.0, np.full(150, 1e-16)])
    assert fit_decay(lam).stop == 50
    assert fit_decay(lam, window=(2, 30)).start == 2
    assert sketch_floor([1.0, 0.0], k=100) == pytest.approx(0.2)


def test_bootstrap_alpha_interval():
    n = 120
    g = np.random.default_rng(0)
    U, _ = np.linalg.qr(g.standard_normal((n, n)))
    lam = np.arange(1, n + 1) ** -2.0
    K = torch.as_tensor(U @ np.diag(lam) @ U.T * n)
    ci, a = bootstrap_alpha(K, num_boot=30, skip=2)
    assert len(a) == 30 and ci[0] <= ci[1] and np.all(np.isfinite(a))


def test_alignment_and_kernel_ridge():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    Y = np.eye(3)[y]
    assert kernel_target_alignment(Y @ Y.T, y) == pytest.approx(1.0)
    g = np.random.default_rng(1)
    X = g.standard_normal((120, 5))
    lab = (X[:, 0] > 0).astype(int)
    K = X @ X.T
    res = kernel_ridge_accuracy(K[:80, :80], lab[:80], K[80:, :80], lab[80:])
    assert res["accuracy"] >= 0.9


def test_report_json_roundtrip():
    i = np.arange(1, 31)
    g = np.random.default_rng(2)
    U, _ = np.linalg.qr(g.standard_normal((30, 30)))
    K = torch.as_tensor(U @ np.diag(i ** -1.5) @ U.T * 30)
    rep = spectrum_report(K, labels=np.arange(30) % 2, groups={"0.q": K / 2, "0.k": K / 2}, num_boot=5)
    d = json.loads(json.dumps(rep.to_json()))
    back = SpectrumReport.from_json(d)
    assert back.uncentered.decay.alpha == pytest.approx(1.5, rel=1e-9)
    assert back.group_traces == pytest.approx({"0.q": 0.5, "0.k": 0.5})
    assert back.centered.centered and rep.kernel_ridge is not None


def test_plots_from_saved_json(tmp_path):
    from taskvec.ntk_plots import plot_run

    i = np.arange(1, 41)
    g = np.random.default_rng(3)
    U, _ = np.linalg.qr(g.standard_normal((40, 40)))
    K = torch.as_tensor(U @ np.diag(i ** -1.2) @ U.T * 40)
    groups = {f"{layer}.{r}": K / 6 for layer in range(2) for r in "qkv"}
    for name in ("a", "b"):
        (tmp_path / f"{name}.spectrum.json").write_text(json.dumps(spectrum_report(K, groups=groups).to_json()))
    pngs = plot_run(tmp_path)
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)
