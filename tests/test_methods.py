"""Methods as objects: each method's named terms against direct formulas written here, methods
built from a config (defaults vs overrides, options a method does not take), the learning-rate
schedule, and the report's loss-term panel. Fast: no training."""

import dataclasses
import json
import math

import pytest
import torch
from tensors import assert_close, generator, random_labels, random_logits

from dhkd_pipe.config import TrainConfig, build_config
from dhkd_pipe.errors import DhkdError
from dhkd_pipe.methods import registry as methods
from dhkd_pipe.methods.base import KD_STOP_HELP
from dhkd_pipe.methods.registry import CE, DHKD, DIST, DKD, KD, METHODS, BinaryKL, from_config
from dhkd_pipe.training.epoch_end import lr_at, metric_names

B, K = 6, 7
SCALE = 2.0  # of the random logits


# --- direct formulas, written from the definitions (float64) ---------------------------------------


def ce_direct(s, y):
    return -sum(torch.log_softmax(s[i], 0)[y[i]] for i in range(len(y))) / len(y)


def kl(p, q):
    return (p * (p.log() - q.log())).sum()


def kd_direct(s, t, T):
    return T * T / len(s) * sum(kl(torch.softmax(t[i] / T, 0), torch.softmax(s[i] / T, 0)) for i in range(len(s)))


def binary_kl_direct(s, t, T):
    a, b = torch.sigmoid(t / T), torch.sigmoid(s / T)
    return T * T / len(s) * (a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log()).sum()


def binary_kl_norm_direct(s, t, T):
    q = torch.sigmoid((s - t) / T)
    return T * T / len(s) * (0.5 * (0.5 / q).log() + 0.5 * (0.5 / (1 - q)).log()).sum()


def dkd_parts_direct(s, t, y, T):
    """(TCKD, NCKD) times T^2/B: the binary target/rest KL and the KL among the other classes."""
    tckd = nckd = 0.0
    for i in range(len(s)):
        p, q = torch.softmax(t[i] / T, 0), torch.softmax(s[i] / T, 0)
        yi = int(y[i])
        tckd = tckd + kl(torch.stack([p[yi], 1 - p[yi]]), torch.stack([q[yi], 1 - q[yi]]))
        rest = [k for k in range(len(p)) if k != yi]
        nckd = nckd + kl(torch.softmax(t[i, rest] / T, 0), torch.softmax(s[i, rest] / T, 0))
    return T * T / len(s) * tckd, T * T / len(s) * nckd


def _check_keys(method, terms):
    assert set(terms) == set(method.term_names) | {"total"}
    assert_close(terms["total"], terms["ce"] + terms.get("kd", 0.0))


# --- the registry ------------------------------------------------------------------------------------


def test_registry_declares_each_method_once():
    assert list(METHODS) == [cls.name for cls in METHODS.values()]
    for cls in METHODS.values():
        # every option is described for --help, and nothing else is
        assert set(cls.knobs) == set(methods.option_names(cls)), cls.name
        assert set(methods.option_names(cls)) <= set(methods.OPTIONS), cls.name
        assert {"ce"} <= set(cls.term_names) and cls.summary
    assert {"ce", "kd", "dkd", "binary_kl", "dhkd", "dist"} <= set(METHODS)


def test_help_says_what_each_option_weighs():
    alpha = methods.option_help("alpha")
    assert "dkd: weight of TCKD" in alpha and "default 1.0" in alpha
    assert "dkd: weight of NCKD" in methods.option_help("beta")
    assert "kd: weight of CE, default 0.1" in methods.option_help("gamma")


# --- each method's terms against the direct formulas -----------------------------------------------


def test_ce_alone_needs_no_teacher():
    s, y = random_logits(B, K, 1, SCALE).requires_grad_(), random_labels(B, K, 2)
    m = CE(gamma=0.5, backend="torch")
    terms = m.terms(s, y)
    _check_keys(m, terms)
    assert_close(terms["ce"], 0.5 * ce_direct(s, y))
    assert not m.needs_teacher and not m.dual_head


def test_kd_weights_and_temperature():
    s, t, y = random_logits(B, K, 3, SCALE).requires_grad_(), random_logits(B, K, 4, SCALE), random_labels(B, K, 5)
    m = KD(backend="torch")
    assert (m.gamma, m.alpha, m.temperature) == (0.1, 0.9, 4.0)  # mdistiller's KD
    terms = m.terms(s, y, t)
    _check_keys(m, terms)
    assert_close(terms["ce"], 0.1 * ce_direct(s, y))
    assert_close(terms["kd"], 0.9 * kd_direct(s, t, 4.0))


def test_kd_int8_teacher_is_dequantized():
    s, y = random_logits(B, K, 6, SCALE), random_labels(B, K, 7)
    q = torch.randint(-127, 128, (B, K), generator=generator(8), dtype=torch.int8)
    scale = torch.rand(B, generator=generator(9)) * 0.05 + 0.01
    terms = KD(alpha=2.0, temperature=3.0, backend="torch").terms(s, y, q, scale)
    # int8 rows are float32(q) * float32(scale), the store's and the kernels' dequantise
    assert_close(terms["kd"], 2.0 * kd_direct(s, (q.float() * scale[:, None]).double(), 3.0))


@pytest.mark.parametrize("epoch, warm", [(0, 1 / 20), (9, 10 / 20), (18, 19 / 20), (19, 1.0), (200, 1.0)])
def test_dkd_terms_and_warmup(epoch, warm):
    s, t, y = random_logits(B, K, 10, SCALE).requires_grad_(), random_logits(B, K, 11, SCALE), random_labels(B, K, 12)
    m = DKD(backend="torch")
    assert (m.gamma, m.alpha, m.beta, m.temperature, m.warmup_epochs) == (1.0, 1.0, 8.0, 4.0, 20)  # mdistiller DKD
    terms = m.terms(s, y, t, epoch=epoch)
    _check_keys(m, terms)
    tckd, nckd = dkd_parts_direct(s, t, y, 4.0)
    assert_close(terms["ce"], ce_direct(s, y))  # CE weight 1, never warmed up
    assert_close(terms["tckd"], warm * 1.0 * tckd)  # alpha weighs TCKD only
    assert_close(terms["nckd"], warm * 8.0 * nckd)  # beta weighs NCKD only
    assert_close(terms["kd"], warm * (tckd + 8.0 * nckd))


def test_dkd_alpha_and_beta_weigh_one_term_each():
    s, t, y = random_logits(B, K, 13, SCALE), random_logits(B, K, 14, SCALE), random_labels(B, K, 15)
    base = DKD(warmup_epochs=0, backend="torch").terms(s, y, t)
    more_alpha = DKD(alpha=3.0, warmup_epochs=0, backend="torch").terms(s, y, t)
    more_beta = DKD(beta=2.0, warmup_epochs=0, backend="torch").terms(s, y, t)
    assert_close(more_alpha["tckd"], 3.0 * base["tckd"])
    assert_close(more_alpha["nckd"], base["nckd"])
    assert_close(more_beta["tckd"], base["tckd"])
    assert_close(more_beta["nckd"], base["nckd"] / 4.0)


@pytest.mark.parametrize(
    "kd_loss, direct", [("binary_kl_norm", binary_kl_norm_direct), ("binary_kl", binary_kl_direct), ("kd", kd_direct)]
)
def test_dhkd_ce_on_head_1_kd_on_head_2(kd_loss, direct):
    h1, h2 = random_logits(B, K, 16, SCALE).requires_grad_(), random_logits(B, K, 17, SCALE).requires_grad_()
    t, y = random_logits(B, K, 18, SCALE), random_labels(B, K, 19)
    assert DHKD().params() == {
        "gamma": 1.0,
        "alpha": 1.0,
        "temperature": 2.0,
        "kd_loss": "binary_kl_norm",
        "kd_stop_epoch": None,
    }  # published
    m = DHKD(gamma=0.7, alpha=1.3, temperature=2.5, kd_loss=kd_loss, backend="torch")
    assert m.dual_head
    terms = m.terms((h1, h2), y, t)
    _check_keys(m, terms)
    assert_close(terms["ce"], 0.7 * ce_direct(h1, y))
    assert_close(terms["kd"], 1.3 * direct(h2, t, 2.5))
    # the terms are apart: CE reaches head 1 only, the distillation term head 2 only
    g_ce = torch.autograd.grad(terms["ce"], (h1, h2), retain_graph=True, allow_unused=True)
    g_kd = torch.autograd.grad(terms["kd"], (h1, h2), allow_unused=True)
    assert g_ce[1] is None or not g_ce[1].any()
    assert g_kd[0] is None or not g_kd[0].any()


def test_binary_kl_is_ce_and_binary_kl_on_one_head():
    s, t, y = random_logits(B, K, 20, SCALE).requires_grad_(), random_logits(B, K, 21, SCALE), random_labels(B, K, 22)
    # the ablation differs from dhkd only in its heads (and kd_stop_epoch, the ImageNet script's, which
    # applies only to that script's methods, kd and dhkd)
    dhkd_params = {k: v for k, v in DHKD().params().items() if k != "kd_stop_epoch"}
    assert BinaryKL().params() == dhkd_params
    for kd_loss, direct in (("binary_kl_norm", binary_kl_norm_direct), ("binary_kl", binary_kl_direct)):
        m = BinaryKL(kd_loss=kd_loss, backend="torch")
        assert not m.dual_head
        terms = m.terms(s, y, t)
        _check_keys(m, terms)
        assert_close(terms["ce"], 1.0 * ce_direct(s, y))
        assert_close(terms["kd"], 1.0 * direct(s, t, m.temperature))
        # one head: the total's gradient is both terms' gradients on the same logits
        (g,) = torch.autograd.grad(terms["total"], s)
        a = s.detach().requires_grad_()
        (want,) = torch.autograd.grad(ce_direct(a, y) + direct(a, t, m.temperature), a)
        assert_close(g, want)
    with pytest.raises(DhkdError, match="--method kd"):
        BinaryKL(kd_loss="kd")


def dist_parts_direct(s, t, T, eps=1e-8):
    """(inter, intra) times T^2: 1 - mean Pearson r of softmax rows, then of softmax columns (the
    authors' code adds eps to the product of the norms)."""

    def r(u, v):
        u, v = u - u.mean(), v - v.mean()
        return (u * v).sum() / ((u * u).sum().sqrt() * (v * v).sum().sqrt() + eps)

    ys, yt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    inter = 1 - torch.stack([r(ys[i], yt[i]) for i in range(len(s))]).mean()
    intra = 1 - torch.stack([r(ys[:, k], yt[:, k]) for k in range(s.shape[1])]).mean()
    return T * T * inter, T * T * intra


def test_dist_terms_and_published_defaults():
    s, t, y = random_logits(B, K, 27, SCALE).requires_grad_(), random_logits(B, K, 28, SCALE), random_labels(B, K, 29)
    m = DIST(backend="torch")
    # the authors' recipes: CE weight 1, kd_loss_weight 2 x DIST(beta=1, gamma=1), tau 1 (ImageNet)
    assert m.params() == {"gamma": 1.0, "alpha": 2.0, "beta": 2.0, "temperature": 1.0}
    assert not m.dual_head and m.needs_teacher
    for T in (1.0, 4.0):
        m = DIST(temperature=T, alpha=1.5, beta=0.5, gamma=0.3, backend="torch")
        terms = m.terms(s, y, t)
        _check_keys(m, terms)
        inter, intra = dist_parts_direct(s, t, T)
        assert_close(terms["ce"], 0.3 * ce_direct(s, y))
        assert_close(terms["inter"], 1.5 * inter)  # alpha weighs the inter-class relation
        assert_close(terms["intra"], 0.5 * intra)  # beta the intra-class one
        assert_close(terms["kd"], 1.5 * inter + 0.5 * intra)


def test_dist_from_a_config():
    m = from_config(TrainConfig(data="digits", method="dist", temperature=4.0))
    assert isinstance(m, DIST) and m.params() == {"gamma": 1.0, "alpha": 2.0, "beta": 2.0, "temperature": 4.0}
    with pytest.raises(DhkdError, match="--method dist does not use --kd-loss"):
        TrainConfig(data="digits", method="dist", kd_loss="kd").validate()


def test_fused_backend_gives_the_same_terms():
    """Under Triton (its interpreter on CPU) the fused launch gives the same named terms."""
    pytest.importorskip("triton")
    from dhkd_pipe.kernels import triton_available

    if not triton_available():
        pytest.skip("triton cannot run here")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h1, h2 = (
        random_logits(B, K, 23, SCALE, dtype=torch.float32).to(dev),
        random_logits(B, K, 24, SCALE, dtype=torch.float32).to(dev),
    )
    t, y = random_logits(B, K, 25, SCALE, dtype=torch.float32).to(dev), random_labels(B, K, 26).to(dev)
    cases = [(DHKD, (h1, h2)), (BinaryKL, h1), (KD, h1), (CE, h1)]
    for cls, outputs in cases:
        got = cls(backend="triton").terms(outputs, y, t)
        want = cls(backend="torch").terms(outputs, y, t)
        assert set(got) == set(want)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (cls.name, k)


# The published DHKD ImageNet script (train_student_imagenet.py) counts epochs from 1 and, for both
# its methods (kd, dhkd), does `if epoch >= args.early_stop_epoch: args.alpha = 0` before training
# that epoch. Our epochs are 0-based: 1-based epoch e1 = epoch + 1.
def published_alpha(alpha, early_stop_epoch, epoch0):
    e1 = epoch0 + 1
    return 0.0 if early_stop_epoch and e1 >= early_stop_epoch else alpha


@pytest.mark.parametrize("stop", [None, 0, 1, 3, 50])
@pytest.mark.parametrize("method", ["kd", "dhkd"])
def test_kd_stop_epoch_turns_the_kd_term_off_from_that_epoch(method, stop):
    s, h2, t, y = (
        random_logits(B, K, 40, SCALE).requires_grad_(),
        random_logits(B, K, 41, SCALE).requires_grad_(),
        random_logits(B, K, 42, SCALE),
        random_labels(B, K, 43),
    )
    if method == "kd":
        m, outputs = KD(alpha=0.6, temperature=3.0, kd_stop_epoch=stop, backend="torch"), s
        direct = kd_direct(s, t, 3.0)
    else:
        m, outputs = DHKD(alpha=0.1, temperature=2.0, kd_stop_epoch=stop, backend="torch"), (s, h2)
        direct = binary_kl_norm_direct(h2, t, 2.0)
    ce = m.gamma * ce_direct(s, y)
    for epoch in (0, 1, 2, 3, 48, 49, 50, 99):
        terms = m.terms(outputs, y, t, epoch=epoch)
        _check_keys(m, terms)
        assert_close(terms["ce"], ce)
        weight = published_alpha(m.alpha, stop, epoch)
        if weight == 0.0:
            assert float(terms["kd"].detach()) == 0.0, (epoch, stop)
            # nothing of the distillation term reaches the student any more
            grads = torch.autograd.grad(terms["kd"], (s, h2), allow_unused=True)
            assert all(g is None or not g.any() for g in grads)
        else:
            assert_close(terms["kd"], weight * direct)
    # where it first bites: 1-based epoch `stop` is our 0-based `stop - 1`
    if stop:
        assert float(m.terms(outputs, y, t, epoch=stop - 1)["kd"].detach()) == 0.0
        if stop > 1:
            assert float(m.terms(outputs, y, t, epoch=stop - 2)["kd"].detach()) > 0.0


def test_kd_stop_epoch_from_the_config_and_its_help():
    m = from_config(TrainConfig(method="dhkd", kd_stop_epoch=50))
    assert m.kd_stop_epoch == 50 and from_config(TrainConfig(method="kd", kd_stop_epoch=7)).kd_stop_epoch == 7
    assert methods.methods_taking("kd_stop_epoch") == ("kd", "dhkd")  # the two methods of the published script
    assert "0 or unset: never" in KD_STOP_HELP and "counting epochs from 1" in KD_STOP_HELP


# --- construction from a config ------------------------------------------------------------------------


def test_defaults_from_the_method_overrides_from_the_config():
    m = from_config(TrainConfig(method="kd"))
    assert isinstance(m, KD) and m.params() == {"gamma": 0.1, "alpha": 0.9, "temperature": 4.0, "kd_stop_epoch": None}
    m = from_config(TrainConfig(method="dkd", alpha=2.0, beta=4.0, warmup_epochs=5, kernels="torch"))
    assert m.params() == {"gamma": 1.0, "alpha": 2.0, "beta": 4.0, "temperature": 4.0, "warmup_epochs": 5}
    assert m.backend == "torch"
    m = from_config(TrainConfig(method="dhkd", kd_loss="binary_kl", temperature=3.0))
    assert (m.kd_loss, m.temperature, m.alpha, m.gamma) == ("binary_kl", 3.0, 1.0, 1.0)
    assert from_config(TrainConfig(method="dhkd")).temperature == 2.0  # --BinaryKL_T's published default
    assert from_config(TrainConfig(method="binary_kl")).temperature == 2.0
    assert from_config(TrainConfig(method="ce")).params() == {"gamma": 1.0}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="kd", kd_loss="binary_kl"), "--method kd does not use --kd-loss"),
        (dict(method="ce", alpha=1.0), "--method ce does not use --alpha"),
        (dict(method="dhkd", beta=2.0, warmup_epochs=3), "does not use --beta, --warmup-epochs"),
        (dict(method="binary_kl", kd_loss="kd"), "--method binary_kl takes --kd-loss"),
        (dict(method="dkd", warmup_epochs=-1), "bad (warmup_epochs|--warmup-epochs)"),
        (dict(method="dkd", kd_stop_epoch=50), "--method dkd does not use --kd-stop-epoch"),
        (dict(method="dist", kd_stop_epoch=50), "--method dist does not use --kd-stop-epoch"),
        (dict(method="dhkd", kd_stop_epoch=-1), "bad (kd_stop_epoch|--kd-stop-epoch)"),
        (dict(method="magic"), "unknown method 'magic'"),
    ],
)
def test_config_mistakes_are_user_errors(options, message):
    with pytest.raises(DhkdError, match=message):
        TrainConfig(data="digits", **options).validate()


def test_recipe_yaml_builds_its_method(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: dkd\nbeta: 2\ntemperature: 1\n")
    cfg = build_config(TrainConfig, str(f), {"alpha": 0.5, "data": "digits"})
    m = from_config(cfg)
    assert (m.alpha, m.beta, m.temperature, m.gamma) == (0.5, 2.0, 1.0, 1.0)
    assert dataclasses.is_dataclass(m)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.alpha = 3.0


# --- the learning-rate schedule --------------------------------------------------------------------------


def test_lr_schedule_steps_at_milestones():
    cfg = TrainConfig(lr=0.05, lr_milestones=[150, 180, 210], lr_decay=0.1)
    expect = {0: 0.05, 149: 0.05, 150: 0.005, 179: 0.005, 180: 5e-4, 209: 5e-4, 210: 5e-5, 239: 5e-5}
    for epoch, lr in expect.items():
        assert lr_at(cfg, epoch) == pytest.approx(lr, rel=1e-12), epoch
    assert lr_at(TrainConfig(lr=0.1, lr_milestones=[]), 99) == 0.1
    assert lr_at(TrainConfig(lr=0.1, lr_milestones=[0], lr_decay=0.5), 0) == 0.05
    # unsorted milestones count the same
    assert lr_at(TrainConfig(lr=1.0, lr_milestones=[60, 30], lr_decay=0.1), 45) == pytest.approx(0.1)


# --- what the engine logs and the report draws ---------------------------------------------------------


def test_metric_names_follow_the_terms():
    assert metric_names(DKD()) == ["train_loss", "train_ce", "train_kd", "train_tckd", "train_nckd"]
    assert metric_names(CE()) == ["train_loss", "train_ce"]
    assert metric_names(DIST()) == ["train_loss", "train_ce", "train_kd", "train_inter", "train_intra"]


def test_report_plots_the_named_terms(tmp_path):
    from dhkd_pipe.stages.report import loss_terms, write_report

    runs = []
    for name, terms in (("a", ("ce", "kd")), ("b", ("ce",)), ("old", ())):
        d = tmp_path / name
        d.mkdir()
        rows = []
        for epoch in (1, 2, 3):
            row = {"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1": 10.0 * epoch}
            row.update({f"train_{k}": 0.5 / epoch for k in terms})
            rows.append(json.dumps(row))
        (d / "metrics.jsonl").write_text("\n".join(rows) + "\n")
        runs.append(str(d))
    assert loss_terms([json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]) == [
        "ce",
        "kd",
    ]
    out = tmp_path / "r.png"
    table = write_report(runs, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| a |" in table and math.isfinite(out.stat().st_size)
