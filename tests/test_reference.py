import math

import numpy as np
import pytest
import torch

from pyro_svae import AmortizedGuide, SpatialVAE
from pyro_svae.reference import compare_samples, nuts_posterior, overview


def prior_only_model():
    """A model whose likelihood ignores every latent, so the exact posterior is the prior."""
    model = SpatialVAE((5, 5), 2, hidden_dim=8, theta_prior_std=0.5, dx_prior_std=0.2)
    with torch.no_grad():
        model.decoder.coord_linear.weight.zero_()
        model.decoder.latent_linear.weight.zero_()
    return model


@pytest.mark.slow
def test_nuts_recovers_a_known_posterior_and_reports_diagnostics():
    model = prior_only_model()
    guide = AmortizedGuide(model, hidden_dim=8)
    weights = [p.detach().clone() for p in model.parameters()]
    image = torch.rand(1, 5, 5).round()
    ref = nuts_posterior(model, guide, image, num_samples=150, warmup_steps=80, num_chains=2, seed=1)
    # the posterior is the prior: z ~ N(0, 1), theta ~ N(0, 0.5), dx ~ N(0, 0.2) per component
    s = ref.summary
    assert set(s.index) == {"z[0]", "z[1]", "theta", "dx[0]", "dx[1]"}
    for name, sd in [("z[0]", 1.0), ("z[1]", 1.0), ("theta", 0.5), ("dx[0]", 0.2), ("dx[1]", 0.2)]:
        assert abs(s.loc[name, "mean"]) < 0.35 * sd, name
        assert s.loc[name, "sd"] == pytest.approx(sd, rel=0.3), name
    assert {"r_hat", "ess_bulk", "ess_tail", "hdi_5%", "hdi_95%"} <= set(s.columns)
    assert ref.max_r_hat < 1.1 and ref.min_ess_bulk > 50
    assert ref.nuts.posterior.sizes["chain"] == 2 and ref.nuts.posterior.sizes["draw"] == 150
    assert set(ref.comparison.index) == set(s.index)
    # the decoder stayed fixed and trainable afterwards
    for before, after in zip(weights, model.parameters(), strict=True):
        assert torch.equal(before, after) and after.requires_grad
    row = overview([ref], labels=["img"]).loc["img"]
    assert row["max_r_hat"] == pytest.approx(ref.max_r_hat) and row["divergences"] >= 0


def test_nuts_unwraps_theta_around_the_guide_and_checks_its_input():
    model = prior_only_model()
    guide = AmortizedGuide(model, hidden_dim=8)
    with torch.no_grad():
        guide.heads["theta"].weight.zero_()
        unit = float(guide.families["theta"].unit)  # the head works in units of the prior's std
        guide.heads["theta"].bias.copy_(torch.tensor([3.0 / unit, -2.0]))  # guide centred near pi
    ref = nuts_posterior(model, guide, torch.rand(1, 1, 5, 5), num_samples=20, warmup_steps=20, num_chains=2)
    theta = ref.nuts.posterior["theta"].values
    centre = ref.info["theta_centre"]
    assert centre == pytest.approx(3.0, abs=1e-5)
    assert np.all(np.abs(theta - centre) <= math.pi + 1e-6)
    assert np.all(np.abs(ref.guide.posterior["theta"].values - centre) <= math.pi + 1e-6)
    with pytest.raises(ValueError, match="one image of shape"):
        nuts_posterior(model, guide, torch.rand(2, 1, 5, 5))
    with pytest.raises(ValueError, match="hdi_prob"):
        nuts_posterior(model, guide, torch.rand(1, 5, 5), hdi_prob=1.5)


def test_compare_samples_measures_agreement_and_disagreement():
    rng = np.random.default_rng(0)
    p = rng.normal(0.0, 1.0, size=(2, 2000))
    same = compare_samples({"a": p}, {"a": rng.normal(0.0, 1.0, size=4000)}, hdi_prob=0.9).loc["a"]
    assert same["overlap"] > 0.9 and abs(same["mean_shift_sd"]) < 0.1
    assert same["sd_ratio"] == pytest.approx(1.0, abs=0.1) and same["guide_in_hdi"] == pytest.approx(
        0.9, abs=0.03
    )
    narrow_off = compare_samples({"a": p}, {"a": rng.normal(3.0, 0.2, size=4000)}).loc["a"]
    assert narrow_off["mean_shift_sd"] == pytest.approx(3.0, abs=0.2)
    assert narrow_off["sd_ratio"] == pytest.approx(0.2, abs=0.03)
    assert narrow_off["overlap"] < 0.05 and narrow_off["guide_in_hdi"] < 0.05
