"""Spectral early stopping: closed forms on hand-computable spectra, brute force, and the rule end to end."""

import json
import math
import typing

import numpy as np
import pytest
import torch

from taskvec.spectral import (
    SpectralStopping,
    adam_path_steps,
    critical_radius,
    localized_complexity,
    rkhs_norm_sq,
    spectral_stopping_step,
)
from taskvec.stopping import StopDecision, StoppingRule, TrainContext, make_rule

E = math.e


def brute_force_step(lam, eta, sigma, R, n):
    """T̂ = min{k ≥ 1 : R̂(1/√η_k) > R/(2eση_k)} − 1, evaluated literally."""
    for k in range(1, len(eta)):
        if eta[k] > 0 and math.sqrt(np.minimum(lam, 1 / eta[k]).sum() / n) > R / (2 * E * sigma * eta[k]):
            return k - 1
    return None


@pytest.mark.parametrize("m,mu,alpha,sigma,R,n", [(5, 2.0, 0.1, 0.5, 1.0, 100), (20, 0.5, 0.03, 0.2, 0.7, 400),
                                                  (1, 10.0, 0.5, 1.0, 3.0, 50)])
def test_rank_m_closed_form(m, mu, alpha, sigma, R, n):
    """Rank-m kernel with equal eigenvalues μ, constant step α: T̂ = floor(η*/α), η* = nR²/(4e²σ²m), when
    η* ≥ 1/μ; the critical radius is ε̂² = 1/η*."""
    lam = np.concatenate([np.full(m, mu), np.zeros(n - m)])
    eta_star = n * R * R / (4 * E * E * sigma * sigma * m)
    assert eta_star >= 1 / mu
    K = int(eta_star / alpha) + 50
    pred = spectral_stopping_step(lam, [alpha] * K, sigma, R)
    assert pred.step == math.floor(eta_star / alpha)
    assert pred.eta == pytest.approx(alpha * pred.step)
    assert pred.critical_radius ** 2 == pytest.approx(1 / eta_star, rel=1e-9)
    assert pred.bound_scale == pytest.approx(R * R / (alpha * pred.step))
    # too few steps: no stop predicted
    assert spectral_stopping_step(lam, [alpha] * (pred.step // 2 + 1), sigma, R).step is None


def test_matches_brute_force_on_power_law_and_schedules():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(20, 300))
        lam = rng.uniform(0.5, 3) * np.arange(1, n + 1) ** -rng.uniform(0.5, 3)
        steps = rng.uniform(0.01, 2) * np.linspace(1, 0, 400) + 1e-3  # linear decay schedule
        eta = np.concatenate([[0], np.cumsum(steps)])
        sigma, R = rng.uniform(0.05, 1), rng.uniform(0.1, 5)
        p = spectral_stopping_step(lam, steps, sigma, R)
        assert p.step == brute_force_step(lam, eta, sigma, R, n)
        p2 = spectral_stopping_step(lam, eta, sigma, R, cumulative=True)
        assert p2.step == p.step
        # subsample extrapolation: the n in 1/n can differ from the number of eigenvalues
        p3 = spectral_stopping_step(lam, steps, sigma, R, n=3 * n)
        assert p3.step == brute_force_step(lam, eta, sigma, R, 3 * n)


def test_critical_radius_definition():
    lam = np.arange(1, 101) ** -2.0
    eps = critical_radius(lam, 0.3, 1.2)
    c = 1.2 / (2 * E * 0.3)
    assert localized_complexity(lam, eps) <= c * eps ** 2 * (1 + 1e-9)
    assert localized_complexity(lam, eps * 0.999) > c * (eps * 0.999) ** 2


def test_rkhs_norm_definitions():
    g = np.random.default_rng(1)
    U, _ = np.linalg.qr(g.standard_normal((10, 10)))
    # every eigenvalue sits well away from the thresholds used below (rcond·λ1 = 1e-6, trunc·λ1 = 1e-2,
    # 1e-3·λ1 = 1e-2): eigh returns them only to round-off, which differs between CPUs' BLAS
    lam = np.array([10, 5, 2, 1, 0.5, 3e-2, 1e-4, 1e-5, 1e-9, 0])
    K = torch.as_tensor(U @ np.diag(lam) @ U.T)
    c = g.standard_normal(10)
    r = U @ c
    got = rkhs_norm_sq(K, r, "pinv", rcond=1e-7)
    assert got["R2"] == pytest.approx((c[:8] ** 2 / lam[:8]).sum(), rel=1e-6)
    tr = rkhs_norm_sq(K, r, "truncated", trunc=1e-3)
    assert tr["R2"] == pytest.approx((c[:6] ** 2 / lam[:6]).sum(), rel=1e-6)
    rd = rkhs_norm_sq(K, r, "ridge", ridge=0.01)
    assert rd["R2"] == pytest.approx((lam * c ** 2 / (lam + 0.1) ** 2).sum(), rel=1e-6)
    assert got["share_below_1e-3"] == pytest.approx((c[6:8] ** 2 / lam[6:8]).sum() / got["R2"], rel=1e-6)


def test_adam_path_steps():
    lrs = np.full(100, 1e-3)
    # no decay of the residual (tiny eigenvalues): constant κ·lr
    a = adam_path_steps(lrs, np.array([1e-12]), np.array([1.0]), kappa=50.0, signal_share=0.3)
    assert np.allclose(a, 5e-2, rtol=1e-6)
    # a fitting mode: residual shrinks, Adam's effective step grows
    b = adam_path_steps(lrs, np.array([1.0]), np.array([1.0]), kappa=50.0, signal_share=1.0, beta2=0.9)
    assert b[0] == pytest.approx(5e-2) and b[-1] > 2 * b[0]


def _tiny_ctx(optimizer="sgd", loss="mse", n=24):
    from transformers import BertConfig, BertModel

    from taskvec.modeling import HeadSpec, LinearHead, TaskModel
    from taskvec.scopes import resolve_scope

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    model = TaskModel(BertModel(cfg), LinearHead(32, 2), HeadSpec("linear", "mean", 2)).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[::3, 6:] = 0
    labels = (ids[:, 0] > 50).long()
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
               for i in range(0, n, 8)]
    return TrainContext(model, resolve_scope(model, "qkv"), lambda: iter(batches), n, 2,
                        lambda k: 0.5 * (1 - k / 2000), 2000, optimizer, 8, loss, "cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    t = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(t)


@pytest.mark.parametrize("optimizer,loss,kernel", [("sgd", "mse", "full"), ("adamw", "ce", "trace")])
def test_rule_end_to_end(optimizer, loss, kernel):
    ctx = _tiny_ctx(optimizer, loss)
    rule = make_rule("spectral", kernel=kernel, max_examples=16)
    assert isinstance(rule, SpectralStopping)
    rule.start(ctx)
    s = rule.summary()
    json.dumps(s)
    assert s["n_kernel"] == 16 and s["n_train"] == 24 and s["sigma"] > 0 and s["R2"] > 0
    assert set(s["R2_all"]) == {"pinv", "truncated", "ridge"}
    assert (s["adam_kappa"] is None) == (optimizer == "sgd")
    if s["predicted_step"] is not None:
        k = s["predicted_step"]
        assert rule.update(max(k, 1) - 1, None) is None or k <= 1
        d = rule.update(max(k, 1), None)
        assert isinstance(d, StopDecision) and "spectral" in d.reason
    # resumable
    r2 = SpectralStopping()
    r2.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert r2.predicted == rule.predicted


def test_rule_sgd_matches_pure_function():
    """SGD + squared loss: the rule is the pure function on the kernel's eigenvalues with η = Σ lr."""
    from taskvec.ntk import as_batch, empirical_ntk, model_outputs

    ctx = _tiny_ctx("sgd", "mse")
    rule = SpectralStopping(max_examples=1000, sigma=0.3, r2="pinv", action="log")
    rule.start(ctx)
    b = as_batch(list(ctx.train_batches()))
    K = empirical_ntk(ctx.model, b, kernel="full", groups=False).matrix()
    r = (torch.nn.functional.one_hot(b["labels"], 2).double() - model_outputs(ctx.model, b).double()).reshape(-1)
    R2 = rkhs_norm_sq(K, r.detach().numpy(), "pinv", rcond=1e-7)["R2"]
    lam = torch.linalg.eigvalsh(K / 24).numpy()
    steps = [ctx.lr_at(k) for k in range(ctx.max_steps)]
    pred = spectral_stopping_step(lam, steps, 0.3, math.sqrt(R2))
    assert rule.predicted == pred.step
    assert rule.summary()["R2"] == pytest.approx(R2, rel=1e-9)
    assert rule.update(10 ** 6, None) is None  # action="log" never stops


# --- additions for the outcome study: label noise, test curve, extra evaluation steps, kernel cache ---------


def test_flip_labels_is_keyed_by_example():
    from conftest import toy_task

    from taskvec.finetune import flip_labels
    from taskvec.tasks import Task

    task = toy_task(n=400)
    a, b = list(range(200)), list(range(200, 300))
    _, fa = flip_labels(task, a, 0.3, seed=5)
    noisy_ab, fab = flip_labels(task, a + b, 0.3, seed=5)
    assert set(fa) <= set(a) and set(fab) <= set(a + b)
    assert [i for i in fab if i < 200] == fa  # the union flips the same examples of a
    assert fab[len(fa):] == flip_labels(task, b, 0.3, seed=5)[1]  # ... and of b
    assert 0.15 < len(fa) / len(a) < 0.45  # binomial around the rate
    changed = [i for i in range(len(task)) if noisy_ab.labels[i] != task.labels[i]]
    assert changed == fab  # flipped = changed, nothing outside the indices
    assert flip_labels(task, a, 0.3, seed=6)[1] != fa
    assert flip_labels(task, a, 0.0)[0] is task
    with pytest.raises(ValueError, match="rate must be in"):
        flip_labels(task, a, 1.0)
    # multi-class: the new label is another class, each other class reachable
    g = np.random.default_rng(0)
    mc = Task("mc", [f"t{i}" for i in range(3000)], g.integers(0, 4, 3000).tolist(), ["a", "b", "c", "d"])
    noisy, f = flip_labels(mc, range(3000), 0.5, seed=1)
    moves = {(mc.labels[i], noisy.labels[i]) for i in f}
    assert all(x != y for x, y in moves) and len(moves) == 12


def test_config_validates_noise_and_eval_steps():
    from taskvec.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="label_noise"):
        FinetuneConfig(label_noise=1.0)
    with pytest.raises(ValueError, match="eval_steps"):
        FinetuneConfig(eval_steps=[0, 3])
    assert FinetuneConfig(eval_steps=[7, 3, 3]).eval_steps == [3, 7]


class _Recorder(StoppingRule):
    """A rule that asks for an evaluation at step 5 and records the metric keys it is shown."""

    name = "recorder"
    seen: typing.ClassVar[list] = []

    def __init__(self):
        _Recorder.seen = []

    def eval_steps(self):
        return [5]

    def update(self, step, metrics):
        if metrics is not None:
            _Recorder.seen.append((step, sorted(metrics)))


def test_finetune_label_noise_test_curve_and_eval_steps(tiny_bert, tmp_path):
    from conftest import toy_task

    from taskvec.finetune import FinetuneConfig, finetune_task
    from taskvec.stopping import register_rule
    from taskvec.tasks import make_splits

    register_rule("recorder", _Recorder)
    task = toy_task(n=200)
    splits = make_splits(task, 0, 40, 30, max_val_fraction=0.2)
    cfg = FinetuneConfig(max_steps=12, eval_every=8, eval_steps=[3], lr=1e-3, batch_size=8, device="cpu",
                         label_noise=0.3, test_curve=True, early_stopping=["recorder"])
    finetune_task(tiny_bert, task, tmp_path / "t", cfg, splits=splits, progress=False)
    log = json.loads((tmp_path / "t" / "log.json").read_text())
    steps = [e["step"] for e in log["curve"]]
    assert steps == [0, 3, 5, 8, 12]  # regular, configured, the rule's own, the last
    assert all({"test_loss", "test_accuracy", "val_loss"} <= set(e) for e in log["curve"])
    assert log["curve"][0]["test_accuracy"] == log["probe"]["test_accuracy"]
    # the rule saw the evaluations, but never a test metric
    assert [s for s, _ in _Recorder.seen if s > 0] == [3, 5, 8, 12]
    assert all(not any(k.startswith("test") for k in keys) for _, keys in _Recorder.seen)
    noise = log["label_noise"]
    flipped = set(noise["flipped"])
    assert noise["rate"] == 0.3 and flipped <= set(splits.train) | set(splits.val)
    assert noise["flipped_train"] == len(flipped & set(splits.train)) > 0
    assert noise["flipped_val"] == len(flipped & set(splits.val))
    assert log["config"]["label_noise"] == 0.3
    # the saved task keeps the clean labels; the flips are recorded, not baked in
    saved = json.loads((tmp_path / "t" / "task.json").read_text())
    assert saved["labels"] == task.labels


def test_spectral_kernel_cache_and_eval_step(tmp_path):
    ctx = _tiny_ctx("sgd", "mse")
    a = SpectralStopping(max_examples=16, cache_dir=str(tmp_path), action="log")
    a.start(ctx)
    assert a.summary()["kernel_cache"] == "miss" and len(list(tmp_path.glob("*.safetensors"))) == 1
    b = SpectralStopping(max_examples=16, cache_dir=str(tmp_path), action="log")
    b.start(ctx)
    sb = b.summary()
    assert sb["kernel_cache"] == "hit" and sb["R2"] == a.summary()["R2"] and b.predicted == a.predicted
    assert sb["eigen_top"] == a.summary()["eigen_top"]
    assert b.eval_steps() == ([a.predicted] if a.predicted else [])
    # another head (other outputs at θ0): a different kernel, so a miss
    with torch.no_grad():
        ctx.model.head.linear.weight.mul_(1.5)
    c = SpectralStopping(max_examples=16, cache_dir=str(tmp_path), action="log")
    c.start(ctx)
    assert c.summary()["kernel_cache"] == "miss" and len(list(tmp_path.glob("*.safetensors"))) == 2
    # without a cache nothing is written and the summary says so
    d = SpectralStopping(max_examples=16, action="log")
    d.start(ctx)
    assert d.summary()["kernel_cache"] is None


def test_run_written_before_new_config_fields_still_resumes(tiny_bert, tmp_path):
    """A run.json without the fields added for the study (label_noise, test_curve, eval_steps) is the same
    configuration as one with their defaults; a real difference is still refused."""
    from conftest import toy_task

    from taskvec.errors import TaskvecError
    from taskvec.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(max_steps=4, eval_every=2, lr=1e-3, test_size=24, val_size=16, device="cpu", batch_size=8)
    out = tmp_path / "run"
    first = finetune(tiny_bert, [toy_task("a")], out, cfg, progress=False)
    meta = json.loads((out / "run.json").read_text())
    for k in ("label_noise", "test_curve", "eval_steps"):
        del meta["config"][k]
    (out / "run.json").write_text(json.dumps(meta))
    again = finetune(tiny_bert, [toy_task("a")], out, cfg, progress=False)
    assert again[0].wall_time_s == first[0].wall_time_s  # reused, not refused
    with pytest.raises(TaskvecError, match="another base model or configuration"):
        finetune(tiny_bert, [toy_task("a")], out, FinetuneConfig(**{**cfg.__dict__, "label_noise": 0.2}),
                 progress=False)
