import math

import pytest
import torch

from pyro_svae import SpatialVAE, priors
from pyro_svae.compare import (
    Contender,
    circular_contenders,
    compare_inference,
    default_contenders,
    format_table,
)
from pyro_svae.data import ImageDataset, rotated_mnist


@pytest.fixture(scope="module")
def small():
    train, test = rotated_mnist(test_size=20, split="head")
    shrink = torch.nn.functional.avg_pool2d
    return (
        ImageDataset(shrink(train.images[:60], 2), theta=train.theta[:60]),
        ImageDataset(shrink(test.images, 2), theta=test.theta),
    )


def make_model(**kwargs):
    return lambda: SpatialVAE((14, 14), 2, translate=False, hidden_dim=8, **kwargs)


def test_every_contender_gets_the_same_budget_and_a_row(small):
    train, test = small
    contenders = [
        Contender("normal | Trace_ELBO", loss="Trace_ELBO"),
        Contender("same again", loss="Trace_ELBO"),
        Contender("normal | IWAE K=3", loss="IWAE_ELBO", particles=3),
        Contender("von_mises | matching", {"theta": "von_mises"}),
        Contender("cnn", loss="TraceMeanField_ELBO", encoder="cnn", kl_warmup=2),
    ]
    seen = []
    rows = compare_inference(
        contenders,
        train,
        test,
        make_model=make_model(),
        epochs=2,
        batch_size=30,
        num_particles=4,
        hidden_dim=8,
        on_result=lambda row: seen.append(row["contender"]),
    )
    assert seen == [c.name for c in contenders]
    first, again, iwae, von_mises, cnn = rows
    # same seed, same initial weights, same batches: identical runs give identical numbers
    assert first["test_elbo"] == pytest.approx(again["test_elbo"], abs=1e-4)
    assert iwae["objective"] == "IWAE_ELBO K=3" and von_mises["objective"] == "TraceGraph_ELBO"
    assert von_mises["theta_family"] == "von_mises" and cnn["objective"] == "TraceMeanField_ELBO"
    for row in rows:
        assert row["K"] == 4 and row["epochs"] == 2 and row["sec_per_epoch"] > 0
        assert row["test_iw_elbo"] >= row["test_elbo"] - 1e-3  # log-mean-exp >= mean
        assert -1 <= row["theta_circ_corr"] <= 1 and 0 <= row["theta_median_error_deg"] <= 180
        assert "iw_elbo_wrapped" not in row  # the paper's prior is not circular
    table = format_table(rows)
    assert "IW-ELBO K=4" in table and table.count("\n") == len(rows) + 1
    assert f"{first['test_elbo']:.2f}" in table


def test_circular_prior_adds_the_wrapped_bound_for_the_normal_guide(small):
    train, test = small
    rows = compare_inference(
        circular_contenders()[:2],
        train,
        test,
        make_model=make_model(theta_prior=priors.circular_uniform_theta()),
        epochs=1,
        batch_size=30,
        num_particles=4,
        hidden_dim=8,
    )
    normal, projected = rows
    assert math.isfinite(normal["iw_elbo_wrapped"]) and "iw_elbo_wrapped" not in projected
    assert "IW-ELBO wrapped" in format_table(rows)


def test_default_contenders_cover_the_issue_and_unknown_losses_fail():
    names = [c.name for c in default_contenders(8)]
    assert {"normal | Trace_ELBO", "normal | TraceMeanField_ELBO", "normal | IWAE K=8"} <= set(names)
    assert any(c.families.get("theta") in {"projected_normal", "von_mises"} for c in default_contenders())
    with pytest.raises(ValueError, match="unknown loss"):
        Contender("x", loss="MagicELBO").make_loss(None)
    with pytest.raises(ValueError, match="no contenders"):
        compare_inference([], None, None, make_model=make_model())
