"""Unit tests of trainer/training: the loss terms against hand-computed values, the EMA's warm-up and
exact averages, and the learning-rate schedule (and the optimizer builders). CPU only, no files."""

import math
from types import SimpleNamespace

import pytest
import torch

from trainer.training.composite import CompositeLoss
from trainer.training.ema import EMA
from trainer.training.losses import (
    REGISTRY,
    DiscriminatorLoss,
    DistributionMatchingLoss,
    MSELoss,
    d_loss,
    d_loss_terms,
    g_loss,
    g_loss_terms,
    r1_term,
)
from trainer.training.optim import build_lr_schedule, build_optimizer, cosine_with_warmup

LOG2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def values(t: torch.Tensor) -> list:
    return t.detach().tolist()


# -- discriminator losses --------------------------------------------------------------------------
LOGITS = torch.tensor([0.0, 2.0, -1.0])


def test_d_loss_terms_bce_against_hand_computed_values():
    # real labelled 1: log(1 + e^-l); fake labelled 0: log(1 + e^l)
    assert values(d_loss_terms("bce", LOGITS, real=True)) == pytest.approx(
        [LOG2, math.log(1 + math.exp(-2)), math.log(1 + math.e)], rel=1e-6
    )
    assert values(d_loss_terms("bce", LOGITS, real=False)) == pytest.approx(
        [LOG2, math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))], rel=1e-6
    )
    assert values(d_loss_terms("bce", LOGITS, real=True)) == pytest.approx(
        [0.693147, 0.126928, 1.313262], abs=1e-6
    )
    # the same as torch's BCE-with-logits against labels 1 and 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(d_loss_terms("bce", LOGITS, True), bce(LOGITS, torch.ones(3), reduction="none"))
    assert torch.allclose(d_loss_terms("bce", LOGITS, False), bce(LOGITS, torch.zeros(3), reduction="none"))


def test_d_loss_terms_bce_is_stable_for_large_logits():
    big = torch.tensor([100.0, -100.0])
    real, fake = d_loss_terms("bce", big, True), d_loss_terms("bce", big, False)
    assert torch.isfinite(real).all() and torch.isfinite(fake).all()
    assert values(real) == pytest.approx([0.0, 100.0], abs=1e-6)
    assert values(fake) == pytest.approx([100.0, 0.0], abs=1e-6)


def test_d_loss_terms_hinge_against_hand_computed_values():
    assert values(d_loss_terms("hinge", LOGITS, real=True)) == [1.0, 0.0, 2.0]  # max(0, 1 - l)
    assert values(d_loss_terms("hinge", LOGITS, real=False)) == [1.0, 3.0, 0.0]  # max(0, 1 + l)


def test_d_loss_terms_compute_in_fp32():
    for kind in ("bce", "hinge"):
        assert d_loss_terms(kind, LOGITS.half(), True).dtype == torch.float32
        assert d_loss_terms(kind, LOGITS.to(torch.bfloat16), False).dtype == torch.float32


def test_d_loss_is_the_mean_real_term_plus_the_mean_fake_term():
    real, fake = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.5, -3.0])
    # hinge: mean(1, 0, 2) + mean(1.5, 0) = 1 + 0.75
    assert float(d_loss("hinge", real, fake)) == pytest.approx(1.75)
    # bce: mean(softplus(-real)) + mean(softplus(fake))
    expected = (softplus(0.0) + softplus(-2.0) + softplus(1.0)) / 3 + (softplus(0.5) + softplus(-3.0)) / 2
    assert float(d_loss("bce", real, fake)) == pytest.approx(expected, rel=1e-6)
    assert float(d_loss("bce", torch.zeros(4), torch.zeros(7))) == pytest.approx(2 * LOG2, rel=1e-6)
    # a perfect D under hinge: real logits >= 1 and fake logits <= -1 cost nothing
    assert float(d_loss("hinge", torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -2.0]))) == 0.0


def test_g_loss_non_saturating_vs_hinge():
    fake = torch.tensor([1.0, -2.0])
    # non-saturating: mean softplus(-l) = (log(1 + e^-1) + log(1 + e^2)) / 2
    assert float(g_loss("non_saturating", fake)) == pytest.approx(
        (softplus(-1.0) + softplus(2.0)) / 2, rel=1e-6
    )
    assert float(g_loss("non_saturating", fake)) == pytest.approx(1.220095, abs=1e-6)
    # hinge: mean(-l) = -(1 - 2) / 2
    assert float(g_loss("hinge", fake)) == pytest.approx(0.5)
    assert float(g_loss("hinge", torch.tensor([3.0, 5.0]))) == pytest.approx(-4.0)  # unbounded below
    assert g_loss("hinge", fake.half()).dtype == torch.float32
    # per sample: softplus(-l) for non_saturating (and bce, whose generator side it is), -l for hinge
    assert values(g_loss_terms("non_saturating", fake)) == pytest.approx(
        [softplus(-1.0), softplus(2.0)], rel=1e-6
    )
    assert values(g_loss_terms("bce", fake)) == values(g_loss_terms("non_saturating", fake))
    assert values(g_loss_terms("hinge", fake)) == [-1.0, 2.0]
    assert g_loss_terms("non_saturating", fake.to(torch.bfloat16)).dtype == torch.float32
    # the non-saturating gradient does not vanish where D is confident the sample is fake
    x = torch.tensor([-10.0], requires_grad=True)
    g_loss("non_saturating", x).backward()
    assert float(x.grad) == pytest.approx(-1 / (1 + math.exp(-10)), rel=1e-6)


# -- R1 --------------------------------------------------------------------------------------------
def test_r1_term_on_a_linear_discriminator_is_half_the_squared_weight_norm():
    torch.manual_seed(0)
    d = torch.nn.Linear(4, 1)
    with torch.no_grad():
        d.weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5]]))
        d.bias.fill_(0.3)
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    logits = d(x.flatten(1)).squeeze(1)
    r1 = r1_term(logits, x)
    # grad_x D(x) = w for every sample: 0.5 * ||w||^2 = 0.5 * 6.25
    assert r1.item() == pytest.approx(3.125, rel=1e-6)
    # differentiable (create_graph): d/dw 0.5 ||w||^2 = w, and nothing reaches the bias
    r1.backward()
    assert torch.allclose(d.weight.grad, torch.tensor([[1.0, 2.0, -1.0, 0.5]]))
    assert d.bias.grad is None or float(d.bias.grad.abs().sum()) == 0.0


def test_r1_term_matches_an_analytic_gradient_per_sample():
    # D(x) = sum(x^2) per sample: grad = 2x, so R1 = 0.5 * mean_i ||2 x_i||^2 = 2 * mean_i ||x_i||^2
    x = torch.tensor([[[1.0, 2.0]], [[0.0, -3.0]]], requires_grad=True)  # (2, 1, 2)
    logits = (x**2).flatten(1).sum(1)
    assert r1_term(logits, x).item() == pytest.approx(2 * (5.0 + 9.0) / 2)
    # logits in reduced precision still give an fp32 term
    y = x.detach().clone().requires_grad_(True)
    assert r1_term((y**2).flatten(1).sum(1).half(), y).dtype == torch.float32


# -- the generator's composite loss ------------------------------------------------------------------
def test_mse_loss_reads_key_and_target():
    term = MSELoss(key="pred", target="noise", weight=1.0)
    outputs = {"pred": torch.tensor([1.0, 2.0, 3.0]), "noise": torch.tensor([1.0, 0.0, 0.0])}
    assert float(term(outputs, {})) == pytest.approx(13 / 3)
    half = {k: v.half() for k, v in outputs.items()}
    assert term(half, {}).dtype == torch.float32
    assert not term.needs_discriminator


class FixedD:
    """Stands in for ctx["discriminator"]: fixed logits, and a record of what it was called with."""

    def __init__(self, logits):
        self.logits, self.calls = logits, []

    def __call__(self, z, t):
        self.calls.append((z, t))
        return self.logits * (1 + 0 * z.flatten(1).sum(1))  # keeps the graph back to z


def test_discriminator_loss_scores_the_generated_sample():
    d = FixedD(torch.tensor([1.0, -2.0]))
    term = DiscriminatorLoss(key="latent", target=None, weight=0.5)
    sample, t = torch.randn(2, 4, 8, 8).half(), torch.tensor([10, 20])
    value = term({"generated": sample, "generated_t": t}, {"discriminator": d, "d_loss": "hinge"})
    assert float(value) == pytest.approx(0.5)  # hinge g_loss of the logits; the weight is applied outside
    ((z, seen_t),) = d.calls
    assert z.dtype == torch.float32 and torch.equal(seen_t, t)
    assert term.needs_discriminator
    value = term({"generated": sample}, {"discriminator": d, "d_loss": "non_saturating"})
    assert float(value) == pytest.approx(1.220095, abs=1e-6)
    assert d.calls[-1][1] is None  # no generated_t: an unconditioned D gets t=None


def test_discriminator_loss_with_an_empty_batch_is_zero_without_calling_d():
    def never(z, t):
        raise AssertionError("D called on an empty batch")

    sample = torch.zeros(0, 4, 8, 8, requires_grad=True)
    value = DiscriminatorLoss(key="pred_latent", target=None, weight=1.0)(
        {"generated": sample, "generated_t": torch.zeros(0)}, {"discriminator": never, "d_loss": "bce"}
    )
    assert value.shape == () and value.item() == 0.0
    value.backward()  # still part of the graph: the step's backward works
    assert sample.grad.shape == (0, 4, 8, 8)


def test_composite_loss_drops_zero_weight_terms():
    mse = MSELoss(key="a", target="b", weight=1.0)
    loss = CompositeLoss([mse, DiscriminatorLoss(key="latent", target=None, weight=0.0)])
    assert loss.terms == [mse] and not loss.needs_discriminator
    # no discriminator in ctx: the dropped term is never evaluated
    total, parts = loss({"a": torch.tensor([3.0]), "b": torch.tensor([1.0])}, {})
    assert float(total) == 4.0 and parts == {"mse": 4.0, "adv": 0.0}
    assert CompositeLoss([mse, DiscriminatorLoss(key="latent", target=None, weight=0.1)]).needs_discriminator


def test_composite_loss_sums_weighted_terms_and_reports_unweighted_parts():
    d = FixedD(torch.tensor([1.0, -2.0]))
    loss = CompositeLoss(
        [
            MSELoss(key="a", target="b", weight=2.0),
            MSELoss(key="a", target="c", weight=1.0),
            DiscriminatorLoss(key="latent", target=None, weight=0.5),
        ]
    )
    outputs = {
        "a": torch.tensor([1.0, 2.0]),
        "b": torch.tensor([1.0, 0.0]),
        "c": torch.tensor([0.0, 0.0]),
        "generated": torch.randn(2, 4, 8, 8),
    }
    total, parts = loss(outputs, {"discriminator": d, "d_loss": "hinge"})
    # mse(a, b) = 2, mse(a, c) = 2.5, hinge g_loss = 0.5
    assert float(total) == pytest.approx(2.0 * 2.0 + 1.0 * 2.5 + 0.5 * 0.5)
    assert parts == pytest.approx({"mse": 2.0 + 2.5, "adv": 0.5})


def test_composite_loss_without_a_positive_term_raises():
    for terms in ([], [MSELoss(key="a", target="b", weight=0.0)]):
        loss = CompositeLoss(terms)
        assert loss.terms == []
        with pytest.raises(ValueError, match="no term with a positive weight"):
            loss({"a": torch.ones(1), "b": torch.ones(1)}, {})


def test_composite_loss_from_config_builds_registered_terms():
    assert REGISTRY == {
        "MSELoss": MSELoss,
        "DiscriminatorLoss": DiscriminatorLoss,
        "DistributionMatchingLoss": DistributionMatchingLoss,
    }
    cfg = SimpleNamespace(
        losses=[
            SimpleNamespace(type="MSELoss", key="pred_noise", target="noise", weight=1.0),
            SimpleNamespace(type="DiscriminatorLoss", key="latent", target=None, weight=0.25),
            SimpleNamespace(type="MSELoss", key="x", target="y", weight=0.0),
        ]
    )
    loss = CompositeLoss.from_config(cfg)
    assert loss.terms == [
        MSELoss(key="pred_noise", target="noise", weight=1.0),
        DiscriminatorLoss(key="latent", target=None, weight=0.25),
    ]


# -- EMA -------------------------------------------------------------------------------------------
def test_ema_warmup_decay_formula():
    ema = EMA([torch.zeros(1)], decay=0.9)
    seen = []
    for n in range(100):
        assert ema.num_updates == n
        seen.append(ema.current_decay())
        ema.step([torch.zeros(1)])
    assert seen[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert seen == pytest.approx([min(0.9, (1 + n) / (10 + n)) for n in range(100)])
    # (1 + n) / (10 + n) reaches 0.9 at n = 80; from there on the nominal decay holds
    assert seen[79] == pytest.approx(80 / 89) and seen[79] < 0.9 and seen[80] == pytest.approx(0.9)
    assert EMA([torch.zeros(1)], decay=0.05).current_decay() == pytest.approx(0.05)  # below the warm-up value


def test_ema_exact_values_after_a_few_steps():
    p = torch.zeros(2)
    ema = EMA([p], decay=0.99)
    for value, expected in [(1.0, 0.9), (2.0, 1.8), (3.0, 2.7)]:
        # s <- d * s + (1 - d) * p with d = 0.1, 2/11, 0.25
        p.fill_(value)
        ema.step([p])
        assert values(ema.shadow[0]) == pytest.approx([expected, expected], rel=1e-6)
    assert ema.num_updates == 3
    assert float(p[0]) == 3.0  # the model's parameter itself is untouched


def test_ema_shadow_is_fp32_and_updated_in_place():
    p = torch.full((3,), 2.0, dtype=torch.bfloat16)
    ema = EMA([p], decay=0.9)
    assert ema.shadow[0].dtype == torch.float32 and ema.shadow[0] is not p
    before = ema.shadow[0].data_ptr()
    ema.step([torch.full((3,), 4.0, dtype=torch.bfloat16)])
    assert ema.shadow[0].data_ptr() == before  # no copy while the model stays on the shadow's device
    assert values(ema.shadow[0]) == pytest.approx([2.0 * 0.1 + 4.0 * 0.9] * 3)


def test_ema_copy_to_writes_the_average_into_the_model():
    model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-1.0)
    ema = EMA(model.parameters(), decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(1.0)
    ema.step(model.parameters())  # d = 0.1: weight 0.1 * 1 + 0.9 * 3 = 2.8, bias -0.1 + 0.9 = 0.8
    ema.copy_to(model.parameters())
    assert model.weight.dtype == torch.bfloat16  # the model keeps its own dtype
    assert values(model.weight.float().flatten()) == pytest.approx([2.8, 2.8], abs=1e-2)
    assert model.bias.item() == pytest.approx(0.8, abs=1e-2)
    assert values(ema.shadow[0].flatten()) == pytest.approx([2.8, 2.8], rel=1e-6)  # the shadow is unchanged


def test_ema_state_dict_round_trip():
    torch.manual_seed(0)
    params = [torch.randn(3), torch.randn(2, 2)]
    a = EMA(params, decay=0.95)
    for _ in range(4):
        a.step([torch.randn_like(p) for p in params])
    state = a.state_dict()
    assert state["decay"] == 0.95 and state["num_updates"] == 4
    assert all(s.device.type == "cpu" for s in state["shadow"])
    b = EMA([torch.zeros(3), torch.zeros(2, 2)], decay=0.5)
    b.load_state_dict(state)
    assert b.decay == 0.95 and b.num_updates == 4 and b.current_decay() == a.current_decay()
    assert all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow, strict=True))
    # and the two go on identically
    update = [torch.randn_like(p) for p in params]
    a.step(update)
    b.step(update)
    assert all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow, strict=True))


def test_ema_follows_the_model_to_its_device():
    # "meta" stands in for an accelerator: a device other than the shadow's, with no data to compute
    ema = EMA([torch.zeros(2)], decay=0.9)
    assert ema.shadow[0].device.type == "cpu"
    ema.step([torch.zeros(2, device="meta")])
    assert ema.shadow[0].device.type == "meta" and ema.num_updates == 1
    # a loaded state lands where the shadow already is, not on the CPU it was saved from
    ema.load_state_dict({"decay": 0.9, "num_updates": 5, "shadow": [torch.ones(2)]})
    assert ema.shadow[0].device.type == "meta" and ema.num_updates == 5
    assert EMA([torch.zeros(2)], decay=0.9).state_dict()["shadow"][0].device.type == "cpu"


# -- learning-rate schedule and optimizer -------------------------------------------------------------
def test_warmup_is_linear_and_reaches_one():
    assert [cosine_with_warmup(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [cosine_with_warmup(s, 4, 14, "constant") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_endpoints_and_midpoint():
    warmup, total = 4, 14
    assert cosine_with_warmup(warmup, warmup, total) == 1.0  # the cosine starts at 1
    assert cosine_with_warmup(9, warmup, total) == pytest.approx(0.5)  # halfway through the decay
    assert cosine_with_warmup(total, warmup, total) == pytest.approx(0.0, abs=1e-12)  # and ends at 0
    assert cosine_with_warmup(total + 10, warmup, total) == pytest.approx(0.0, abs=1e-12)  # and stays there
    assert cosine_with_warmup(5, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    decay = [cosine_with_warmup(s, warmup, total) for s in range(warmup, total + 1)]
    assert all(x > y for x, y in zip(decay, decay[1:], strict=False))  # strictly decreasing


def test_cosine_without_warmup():
    assert cosine_with_warmup(0, 0, 4) == 1.0
    assert cosine_with_warmup(1, 0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_with_warmup(2, 0, 4) == pytest.approx(0.5)
    assert cosine_with_warmup(4, 0, 4) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(3, 3, 3) == 1.0 and cosine_with_warmup(4, 3, 3) == pytest.approx(0.0, abs=1e-12)


def test_constant_kind_holds_one_after_warmup():
    assert [cosine_with_warmup(s, 2, 10, "constant") for s in (2, 5, 10, 50)] == [1.0, 1.0, 1.0, 1.0]
    assert cosine_with_warmup(0, 0, 10, "constant") == 1.0


def test_lr_schedule_scales_the_optimizer_learning_rate():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.1, weight_decay=0.0)
    sched = build_lr_schedule(opt, warmup=2, total=6)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [
        0.1 * f
        for f in (
            0.5,
            1.0,
            1.0,
            0.5 * (1 + math.cos(math.pi / 4)),
            0.5,
            0.5 * (1 + math.cos(3 * math.pi / 4)),
            0.0,
            0.0,
        )
    ]
    assert lrs == pytest.approx(expected, abs=1e-12)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.1, weight_decay=0.0)
    sched = build_lr_schedule(opt, warmup=0, total=6, kind="constant")
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_build_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(p, lr=3e-4, weight_decay=0.01)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["weight_decay"] == 0.01
    opt = build_optimizer(p, lr=1e-3, weight_decay=0.0, name="Adam", betas=[0.5, 0.9], eps=1e-6)
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["betas"] == (0.5, 0.9) and opt.defaults["eps"] == 1e-6
