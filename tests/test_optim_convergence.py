"""Convergence smoke tests for every registered optimizer name: Rosenbrock and logistic regression."""

import pytest
import torch

from hf_clinic import create_optimizer, list_optimizers


# Learning rates per registry name (LARS/LARC take a large base lr: the trust ratio η = 1e-3 scales it down).
ROSENBROCK = {
    "radam": dict(lr=1e-1),
    # the momentum-SGD warm phase diverges on Rosenbrock above ~1e-2 (LiyuanLucasLiu/RAdam#54)
    "radam_sgd": dict(lr=1e-2),
    "lamb": dict(lr=2e-2),
    "lamb_paper": dict(lr=2e-2),
    "lamb_nvlamb": dict(lr=2e-2),
    "lamb_timm": dict(lr=2e-2),
    "lamb_deepspeed": dict(lr=2e-2),
    "lamb_optax": dict(lr=2e-2),
    "lambc": dict(lr=5e-2),
    "lars": dict(lr=20.0, weight_decay=1e-4),
    "larc": dict(lr=5e-4, weight_decay=1e-4, trust_coefficient=1.0),
    "gsignsgd": dict(lr=5e-3, betas=(0.9, 0.99)),
}


def rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def test_every_registered_name_has_a_convergence_case():
    assert sorted(ROSENBROCK) == list_optimizers()


@pytest.mark.parametrize("name", sorted(ROSENBROCK))
def test_rosenbrock(name):
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = create_optimizer([xy], name, **ROSENBROCK[name])
    start_distance = (xy.detach() - 1).norm().item()
    start_loss = rosenbrock(xy).item()
    for _ in range(1500):
        opt.zero_grad()
        loss = rosenbrock(xy)
        loss.backward()
        opt.step()
    assert torch.isfinite(xy).all()
    assert rosenbrock(xy).item() < 0.1 * start_loss
    assert (xy.detach() - 1).norm().item() < start_distance


@pytest.fixture(scope="module")
def two_clusters():
    """The fixed 2-cluster logistic-regression dataset (pytorch_optimizer's test pattern, seed 42)."""
    generator = torch.Generator().manual_seed(42)
    x0 = torch.randn(100, 2, generator=generator) + torch.tensor([1.5, 1.5])
    x1 = torch.randn(100, 2, generator=generator) - torch.tensor([1.5, 1.5])
    x = torch.cat([x0, x1])
    y = torch.cat([torch.zeros(100), torch.ones(100)])
    return x, y


LOGISTIC = {name: dict(kwargs) for name, kwargs in ROSENBROCK.items()}
LOGISTIC.update(
    {
        "radam": dict(lr=2e-1, weight_decay=1e-3),
        "radam_sgd": dict(lr=5e-2, weight_decay=1e-3),
        "lars": dict(lr=50.0, weight_decay=1e-3),
        "larc": dict(lr=1.0, weight_decay=1e-3, trust_coefficient=0.1),
        "gsignsgd": dict(lr=5e-2, weight_decay=1e-3),
    }
)
for _name in ("lamb", "lamb_paper", "lamb_nvlamb", "lamb_timm", "lamb_deepspeed", "lamb_optax", "lambc"):
    LOGISTIC[_name] = dict(lr=1e-1, weight_decay=1e-3)


@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LambDegeneratesToAdamWarning")
@pytest.mark.parametrize("name", sorted(LOGISTIC))
def test_logistic_regression(name, two_clusters):
    x, y = two_clusters
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():  # start from a wrong classifier so there is something to learn
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        model.bias.fill_(0.5)
    opt = create_optimizer(model, name, **LOGISTIC[name])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    initial = loss_fn(model(x).squeeze(-1), y).item()
    for _ in range(50):
        opt.zero_grad()
        loss = loss_fn(model(x).squeeze(-1), y)
        loss.backward()
        opt.step()
    final = loss_fn(model(x).squeeze(-1), y).item()
    assert initial > 1.5 * final, (initial, final)
