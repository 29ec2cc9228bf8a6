"""Robust aggregation (privacy/robust.py): oracles against Flower's FedMedian /
FedTrimmedAvg, the trimmed mean trimming at the default 4 sites, the norm screen on what a
round changes (site rows left out), norm bounding with the screen off, site rows bounded,
and Byzantine sites (NaN, x1e6 scaling, random weights, sign flip) leaving the global model
within tolerance of the honest-only model."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from medgen.config import ConfigError, RunConfig
from medgen.privacy.robust import (RobustAggregator, RobustSettings, coordinate_median, own_site_rows,
                                   screen_norm_outliers, trim_count, trimmed_mean, update_norms)
from medgen.server.strategy import AcceptedReply, ReplyValidator, specs_of, weighted_average

NUM_HONEST = 7
SITES = tuple(f"S{i}" for i in range(12))
RNG = np.random.default_rng(0)
GLOBAL = {"disc.w": RNG.normal(size=(8, 16)).astype(np.float32),
          "disc.b": RNG.normal(size=(16,)).astype(np.float32),
          "gen.steps": np.array([3], dtype=np.int64)}
SPECS = specs_of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
COMMON = {k: RNG.normal(scale=0.05, size=v.shape) for k, v in GLOBAL.items() if v.dtype.kind == "f"}


def honest_arrays(seed: int) -> dict[str, np.ndarray]:
    """Global + a shared direction + site-specific noise (non-IID sites agree roughly)."""
    rng = np.random.default_rng(100 + seed)
    out = dict(GLOBAL)
    for key, common in COMMON.items():
        out[key] = (GLOBAL[key] + common + rng.normal(scale=0.02, size=common.shape)).astype(np.float32)
    return out


def byzantine(kind: str, seed: int) -> dict[str, np.ndarray]:
    honest, out = honest_arrays(seed), dict(GLOBAL)
    rng = np.random.default_rng(900 + seed)
    for key in COMMON:
        delta = honest[key] - GLOBAL[key]
        out[key] = {"nan": np.where(rng.random(delta.shape) < 0.1, np.nan, honest[key]),
                    "scale": GLOBAL[key] + 1e6 * delta,
                    "random": rng.normal(size=delta.shape),
                    "signflip": GLOBAL[key] - delta}[kind].astype(np.float32)
    return out


def message(node: int, arrays: dict[str, np.ndarray], num_examples: int = 20) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples, "site-index": node - 1,
                                                   "epsilon": 1.0, "delta": 1e-5})})
    return Message(content=content, metadata=meta)


def validated(messages: list[Message]) -> tuple[list[AcceptedReply], list]:
    validator = ReplyValidator(SPECS, SITES)
    verdicts = [validator.check(m) for m in messages]
    return ([v for v in verdicts if isinstance(v, AcceptedReply)],
            [v for v in verdicts if not isinstance(v, AcceptedReply)])


def honest_messages(n: int = NUM_HONEST) -> list[Message]:
    return [message(i + 1, honest_arrays(i), num_examples=10 + 5 * i) for i in range(n)]


def distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2) for k in COMMON)))


def honest_step() -> float:
    return float(np.median(update_norms(validated(honest_messages())[0], GLOBAL)))


def robust_aggregate(aggregator: RobustAggregator, accepted):
    """screen, then combine (the pipeline's two robust stages, server/aggregation.py)."""
    kept, rejected, _ = aggregator.screen(accepted, GLOBAL)
    return aggregator.combine(kept, SPECS), kept, rejected


# -- oracles: our rules equal Flower's strategies on the same replies ----------------------
@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_combination_rules_equal_flower_strategies(rule):
    messages = honest_messages() + [message(8, byzantine("signflip", 8))]
    accepted, _ = validated(messages)
    if rule == "median":
        ours = coordinate_median(accepted, SPECS)
        theirs, _ = FedMedian().aggregate_train(1, honest_messages() + [message(8, byzantine("signflip", 8))])
    else:
        ours = trimmed_mean(accepted, SPECS, 0.2)
        theirs, _ = FedTrimmedAvg(beta=0.2).aggregate_train(
            1, honest_messages() + [message(8, byzantine("signflip", 8))])
    for key in COMMON:
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-6, atol=1e-7)
        assert ours[key].dtype == GLOBAL[key].dtype
    assert ours["gen.steps"].dtype == np.int64 and ours["gen.steps"][0] == 3


def test_trimmed_mean_removes_extremes_per_coordinate():
    stack = [AcceptedReply(f"S{i}", 1.0, {"x": np.array([v], np.float32)}, {}) for i, v in
             enumerate([0.0, 1.0, 2.0, 3.0, 1000.0])]
    specs = specs_of(ArrayRecord({"x": Array(np.zeros(1, np.float32))}))
    assert trimmed_mean(stack, specs, 0.2)["x"][0] == pytest.approx(2.0)  # drops 0 and 1000
    assert coordinate_median(stack, specs)["x"][0] == pytest.approx(2.0)


# -- the norm screen ----------------------------------------------------------------------
def test_screen_rejects_scaled_and_random_updates_with_site_and_reason():
    messages = honest_messages() + [message(8, byzantine("scale", 8)), message(9, byzantine("random", 9))]
    accepted, _ = validated(messages)
    kept, rejected, _ = screen_norm_outliers(accepted, GLOBAL, RobustSettings())
    assert sorted(r.site for r in rejected) == ["S7", "S8"]
    assert all("update norm" in r.reason and "median" in r.reason for r in rejected)
    assert len(kept) == NUM_HONEST


def test_screen_keeps_honest_sites_with_nearly_equal_norms():
    accepted, _ = validated(honest_messages())
    kept, rejected, notes = screen_norm_outliers(accepted, GLOBAL, RobustSettings())
    assert rejected == [] and notes == [] and len(kept) == NUM_HONEST


def test_screen_needs_three_replies_and_can_be_disabled():
    accepted, _ = validated(honest_messages(1) + [message(8, byzantine("scale", 8))])
    assert screen_norm_outliers(accepted, GLOBAL, RobustSettings())[1] == []
    accepted, _ = validated(honest_messages() + [message(8, byzantine("scale", 8))])
    assert screen_norm_outliers(accepted, GLOBAL, RobustSettings(outlier_mads=0))[1] == []


def test_nan_update_is_rejected_by_validation_before_aggregation():
    accepted, rejected = validated(honest_messages() + [message(8, byzantine("nan", 8))])
    assert len(accepted) == NUM_HONEST and rejected[0].site == "S7"
    assert "non-finite" in rejected[0].reason


# -- Byzantine acceptance ---------------------------------------------------------------
@pytest.mark.parametrize("combine", ["mean", "median", "trimmed-mean"])
@pytest.mark.parametrize("attack", ["nan", "scale", "random", "signflip"])
def test_one_byzantine_site_leaves_model_near_honest_only(combine, attack):
    honest_only = weighted_average(validated(honest_messages())[0], SPECS)
    accepted, _ = validated(honest_messages() + [message(8, byzantine(attack, 8))])
    aggregator = RobustAggregator(RobustSettings(combine=combine))
    arrays, kept, rejected = robust_aggregate(aggregator, accepted)
    assert distance(arrays, honest_only) <= 0.5 * honest_step()
    if attack in ("scale", "random"):
        assert [r.site for r in rejected] == ["S7"]


@pytest.mark.parametrize("combine", ["median", "trimmed-mean"])
def test_all_four_attacks_at_once_against_a_honest_majority(combine):
    honest = honest_messages(NUM_HONEST)
    attackers = [message(8 + i, byzantine(kind, 8 + i))
                 for i, kind in enumerate(["nan", "scale", "random", "signflip"])]
    honest_only = weighted_average(validated(honest)[0], SPECS)
    accepted, rejected_by_validation = validated(honest + attackers)
    arrays, _, rejected = robust_aggregate(RobustAggregator(RobustSettings(combine=combine)), accepted)
    assert len(rejected_by_validation) == 1 and len(rejected) == 2
    assert distance(arrays, honest_only) <= 0.5 * honest_step()


def test_plain_fedavg_without_defences_is_broken_by_scaling():
    """Negative control: the tolerance above is tight enough to catch an undefended mean."""
    honest_only = weighted_average(validated(honest_messages())[0], SPECS)
    accepted, _ = validated(honest_messages() + [message(8, byzantine("scale", 8))])
    assert distance(weighted_average(accepted, SPECS), honest_only) > 1000 * honest_step()


@pytest.mark.parametrize("attack", ["scale", "random"])
def test_screen_off_still_bounds_an_update_by_scaling_it_down(attack):
    """norm-outlier-mads = 0 rejects nothing, but an update above (1 + slack) x median is
    scaled down to it: one site moves the mean by a bounded amount (issue 12: x100 moved
    the mean 49 honest steps)."""
    honest_only = weighted_average(validated(honest_messages())[0], SPECS)
    accepted, _ = validated(honest_messages() + [message(8, byzantine(attack, 8))])
    kept, rejected, notes = screen_norm_outliers(accepted, GLOBAL, RobustSettings(outlier_mads=0))
    assert rejected == [] and len(notes) == 1 and notes[0].startswith("S7")
    assert update_norms(kept, GLOBAL)[-1] == pytest.approx(3 * np.median(update_norms(accepted, GLOBAL)), rel=1e-5)
    assert distance(weighted_average(kept, SPECS), honest_only) <= 0.6 * honest_step()


def test_screen_measures_the_shared_update_not_the_site_rows():
    """A site's own row (a one-off release jumping from zero) is left out of its norm: an
    honest site releasing its row late is kept, and a x100 update is still caught although
    every site's rows changed in the same round (issue 12: round 1 was nearly blind)."""
    rows = {"rows": np.zeros((len(SITES), 32), np.float32)}
    base = {**GLOBAL, **rows}
    def with_row(arrays, site, value):
        table = np.zeros((len(SITES), 32), np.float32)
        table[site] = value
        return {**arrays, "rows": table}
    replies = [AcceptedReply(f"S{i}", 10.0, with_row(honest_arrays(i), i, 50.0), {}) for i in range(4)]
    late = AcceptedReply("S4", 10.0, with_row(honest_arrays(4), 4, 50.0), {})
    scaled = AcceptedReply("S5", 10.0, with_row({k: (GLOBAL[k] + 100 * (v - GLOBAL[k])).astype(v.dtype)
                                                 for k, v in honest_arrays(5).items()}, 5, 50.0), {})
    current = {**base, "rows": with_row(base, 0, 50.0)["rows"] + with_row(base, 1, 50.0)["rows"]}
    kept, rejected, _ = screen_norm_outliers(replies[:2] + [late, scaled], current, RobustSettings(), ("rows",))
    assert [r.site for r in rejected] == ["S5"] and "S4" in [r.site for r in kept]
    # without the split, the row release is the whole norm: the x100 update hides in it
    assert screen_norm_outliers(replies + [scaled], base, RobustSettings())[1] == []


@pytest.mark.parametrize("combine", ["mean", "median", "trimmed-mean"])
def test_a_site_row_change_is_bounded_by_the_other_sites_changes(combine):
    """Row k comes from site k alone under every rule, and its change is bounded: 1e6 in a
    Byzantine site's own row is scaled back to (1 + slack) x the median row change (issue
    12: 1e6-scale values reached the checkpoint under median and trimmed mean)."""
    current = np.random.default_rng(3).normal(size=(4, 8))
    new_rows = {0: current[0] + 0.1, 1: current[1] - 0.1, 2: current[2] + 0.05, 3: np.full(8, 1e6)}
    out, notes = RobustAggregator(RobustSettings(combine=combine)).site_rows(
        {"table": current.astype(np.float32)}, {"table": new_rows}, {"table": current.astype(np.float32)})
    changes = np.linalg.norm(out["table"].astype(np.float64) - current, axis=1)
    honest = [np.linalg.norm(new_rows[p] - current[p]) for p in range(3)]
    assert changes[3] == pytest.approx(3 * np.median(honest + [np.linalg.norm(new_rows[3] - current[3])]), rel=1e-4)
    np.testing.assert_allclose(out["table"][:3], np.stack([new_rows[p] for p in range(3)]), rtol=1e-6)
    assert len(notes) == 1 and "row 3 of table" in notes[0]


def test_a_released_row_nobody_changes_any_more_cannot_be_changed():
    current = np.random.default_rng(4).normal(1.0, 0.2, size=(4, 6))
    new_rows = {p: current[p].copy() for p in range(3)} | {3: current[3] * 50}
    out, notes = own_site_rows({"t": current}, {"t": new_rows}, {"t": current}, RobustSettings())
    np.testing.assert_allclose(out["t"], current)
    assert len(notes) == 1 and "change" in notes[0]


def test_a_late_release_row_is_accepted_at_the_size_of_the_others():
    current = np.zeros((4, 6))
    current[:3] = np.random.default_rng(0).normal(1.0, 0.2, size=(3, 6))  # three released rows
    out, notes = own_site_rows({"t": current}, {"t": {3: np.full(6, 1.1)}}, {"t": current}, RobustSettings())
    assert notes == [] and np.allclose(out["t"][3], 1.1)


# -- the trimmed mean at the default federation ---------------------------------------------
def test_trimmed_mean_trims_one_per_end_at_four_sites_where_flower_trims_nothing():
    """Default trim-fraction 0.2 with 4 sites: int(0.8) = 0 in Flower (x1e6 went straight
    into the model, issue 12); at least one per end is cut whenever n >= 3."""
    values = [1.0, 2.0, 3.0, 1e6]
    replies = [AcceptedReply(f"S{i}", 1.0, {"x": np.array([v], np.float32)}, {}) for i, v in enumerate(values)]
    specs = specs_of(ArrayRecord({"x": Array(np.zeros(1, np.float32))}))
    assert trimmed_mean(replies, specs, 0.2)["x"][0] == pytest.approx(2.5)
    theirs, _ = FedTrimmedAvg(beta=0.2).aggregate_train(1, [
        Message(RecordDict({"a": ArrayRecord({"x": Array(np.array([v], np.float32))}),
                            "m": MetricRecord({"num-examples": 1})}),
                metadata=Metadata(run_id=1, message_id=f"m{i}", src_node_id=i + 1, dst_node_id=0,
                                  reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                                  message_type="train")) for i, v in enumerate(values)])
    assert theirs["x"].numpy()[0] > 1e5  # the negative control: Flower's rule trims nothing here
    assert [trim_count(n, 0.2) for n in (2, 3, 4, 5, 10, 11)] == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="trims nothing"):
        RobustSettings(combine="trimmed-mean", trim_fraction=0.0)


def test_settings_from_run_config_and_bad_values():
    config = RunConfig(aggregation="trimmed-mean", trim_fraction=0.25, norm_outlier_mads=2.5)
    settings = RobustSettings.from_config(config)
    assert (settings.combine, settings.trim_fraction, settings.outlier_mads) == ("trimmed-mean", 0.25, 2.5)
    with pytest.raises(ConfigError, match="aggregation"):
        RunConfig(aggregation="krum")
    with pytest.raises(ConfigError, match="trim-fraction"):
        RunConfig(trim_fraction=0.5)
    with pytest.raises(ConfigError, match="aggregation"):
        RunConfig(secure_aggregation=True, aggregation="median")
    assert RunConfig.from_run_config(config.to_run_config()) == config


def test_validating_fedavg_with_the_aggregator_logs_every_rejection(tmp_path):
    """The server strategy with median: NaN excluded by validation, the scaled and random
    updates by the norm screen, each with site and reason in the run log."""
    from medgen.server.aggregation import AggregationPipeline
    from medgen.server.run_log import RunDir, read_metrics
    from medgen.server.strategy import ValidatingFedAvg

    config = RunConfig(sites=",".join(SITES), aggregation="median")
    strategy = ValidatingFedAvg(AggregationPipeline.for_run(config, SPECS, (), RunDir(tmp_path), resume=False))
    strategy.current = dict(GLOBAL)  # what configure_train records from the round's global weights
    attackers = [message(8 + i, byzantine(kind, 8 + i)) for i, kind in enumerate(["nan", "scale", "random"])]
    arrays, metrics = strategy.aggregate_train(1, honest_messages() + attackers)
    honest_only = weighted_average(validated(honest_messages())[0], SPECS)
    assert distance({k: a.numpy() for k, a in arrays.items()}, honest_only) <= 0.5 * honest_step()
    record = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"][0]
    assert sorted(e["site"] for e in record["excluded"]) == ["S7", "S8", "S9"]
    assert sorted(record["per_site"]) == [f"S{i}" for i in range(NUM_HONEST)]
    assert metrics["sites"] == NUM_HONEST
