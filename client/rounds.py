"""One round at one site: the work behind a train or evaluate message, wherever it runs.

Both trainer paths run exactly these functions: the ClientApp in its own per-message
process (the cold path, client/app.py) and the hospital's long-lived warm trainer
(client/worker.py), to which the ClientApp forwards the round's content. The ClientApp
has already resolved the node and checked the hospital's allow-list (deploy/allowlist.py)
before either runs, so nothing here is reached for a refused run.

``answer(verb, config, node, content)``: the reply content, or a Flower ``Error`` whose
reason is a fixed, path-free sentence (full detail stays in the node's log), because
exception texts may name local files.

Per train message (``train_round``): replayed request? send the stored reply
(client/local_state.py) -> load the site's data (cached tensors) and the public anatomy
bank -> derive the round seed, once -> ONE privacy round (privacy/round.py: plan once,
composed with the recipe's one-off releases; refuse before any training if the round would
pass the budget; commit atomically on a clean exit) around recipe.train_local(model,
RoundContext) -> persist local state -> reply: ONE ArrayRecord (the recipe's shared
weights) and ONE MetricRecord of scalars (num-examples, epsilon, delta, site-index, steps,
the recipe's public-input metrics). Nothing else: no strings, no paths, no patient ids, no
images.

Per evaluate message (``evaluate_round``): the same replay check; the site's reserved
evaluation patients (data/eval_split.py, excluded from every training round) score the
incoming global generator; ONE planned, budget-checked Gaussian release
(privacy/eval_release.py, evaluation/federated_eval.py) -> a reply of ONE MetricRecord of
scalars (the DP-released scores, epsilon, delta, site-index).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict

from medgen.client.codes import BUDGET_EXCEEDED, EVALUATION_FAILED, SITE_DATA_REFUSED, TRAINING_FAILED
from medgen.client.local_state import (LocalState, ReplyStore, StoredReply, load_local_state,
                                       request_id, save_local_state)
from medgen.client.node import NodeSetup
from medgen.config import ConfigError, RunConfig
from medgen.data.eval_split import patient_subset, split_patients, training_part
from medgen.data.site_data import PatientDataset, SiteData, load_public_bank, load_site
from medgen.data.site_records import SiteDataError
from medgen.evaluation import federated_eval
from medgen.models.capabilities import SiteDataRefused
from medgen.models.recipe import Recipe, RoundContext
from medgen.models.registry import build_recipe
from medgen.privacy.accounting import sample_rate_for
from medgen.privacy.eval_release import planned_eval_releases, release_for_evaluation
from medgen.privacy.ledger import BudgetExceeded, PrivacyLedger
from medgen.privacy.round import PrivacyRound, PrivacySchedule

log = logging.getLogger(__name__)

EVAL_REPLIES = "eval_replies"  # beside replies/: an evaluation never evicts a training reply


def answer(verb: str, config: RunConfig, node: NodeSetup, content: RecordDict) -> RecordDict | Error:
    """Run the ``verb`` ("train" or "evaluate") round; every failure becomes a clean,
    path-free ``Error`` (the details, which may name local files, go to the node log)."""
    work, failed_code = (train_round, TRAINING_FAILED) if verb == "train" else \
        (evaluate_round, EVALUATION_FAILED)
    site = node.site
    try:
        if node.simulated:
            torch.set_num_threads(1)  # 2 cores, 2 clients at once: oversubscribing is costly
        return work(config, node, content)
    except SiteDataRefused as err:  # a fixed, path-free sentence of the recipe's (capabilities.py)
        log.warning("site %s: %s", site, err)
        return Error(SITE_DATA_REFUSED, f"site {site}: refused before any privacy budget was "
                     f"spent: {err}")
    except BudgetExceeded as err:
        log.warning("%s", err)
        return Error(BUDGET_EXCEEDED, f"site {site}: refused to {verb}, its privacy budget would "
                     "be exceeded (see the node log)")
    except Exception as err:  # noqa: BLE001 - every failure becomes a clean error reply
        log.error("site %s: %s failed:\n%s", site, verb, traceback.format_exc())
        noun = "training" if verb == "train" else "evaluation"
        return Error(failed_code, f"site {site}: {noun} failed with {type(err).__name__} "
                     "(details in the node log)")


def train_round(config: RunConfig, node: NodeSetup, content: RecordDict) -> RecordDict:
    """Train one round at this node; returns the reply content (replayed if seen before)."""
    incoming = content["arrays"]
    settings = content["config"]
    run_key, server_round = str(settings["run-key"]), int(settings["absolute-round"])
    request = request_id(run_key, server_round, incoming)
    replies = ReplyStore(node.replies_dir)
    stored = replies.load(request)
    if stored is not None:
        log.info("site %s: round %d already answered; replaying the stored reply (no new "
                 "training, no new privacy cost)", node.site, server_round)
        return _reply(stored)

    recipe = build_recipe(config)
    model = recipe.build()
    shared = incoming.to_torch_state_dict()
    expected = set(recipe.shared_keys(model))
    if set(shared) != expected:
        raise ValueError(f"incoming weights do not match recipe {config.recipe!r}: "
                         f"{len(set(shared) ^ expected)} keys differ")
    local = load_local_state(node.local_state_path, run_key)
    model.load_state_dict({**model.state_dict(), **local.weights, **shared})

    site_data = _site_for(recipe, node, config)
    recipe.check_site(site_data)  # plan time: a recipe that needs label maps refuses before the ledger
    # the federated-evaluation patients never train (data/eval_split.py): the dataset,
    # num-examples and the sample rate below count training patients only
    data = training_part(site_data, node.site, config.federated_eval_fraction)
    public = load_public_bank(node.public_dir, config.image_size)
    cap = node.target_epsilon(config)  # the run's target, tightened by the site's own cap
    schedule = _schedule(config, recipe, data, cap)
    seed = _round_seed(config, node, server_round)  # the one seed of every draw this round
    privacy = PrivacyRound.at(node.ledger_path, node.site, schedule, run_id=request,
                              server_round=server_round, steps=config.local_steps, cap_epsilon=cap,
                              seed=seed if node.simulated else None)
    with privacy as private:  # BudgetExceeded here: nothing trains, the ledger is untouched
        ctx = RoundContext(PatientDataset(data, generator_seed=seed), public, private, node.site_index,
                           config.local_steps, local.recipe_state, _device(config), seed)
        recipe_metrics = recipe.train_local(model, ctx)
    model.cpu()
    save_local_state(node.local_state_path,
                     LocalState(run_key, recipe.local_only_state(model), local.recipe_state))
    metrics: dict[str, float | int] = {
        **{k: float(v) for k, v in recipe_metrics.items() if _is_scalar(v)},
        "num-examples": int(data.num_patients), "epsilon": float(privacy.epsilon),
        "delta": float(privacy.plan.delta), "site-index": int(node.site_index),
        "steps": int(privacy.steps_taken),
    }
    reply = StoredReply({k: v.detach().cpu() for k, v in recipe.shared_state(model).items()}, metrics)
    replies.save(request, reply)
    log.info("site %s: round %d trained %d steps, epsilon %.3f (delta %g, %s accountant, unit "
             "patient)", node.site, server_round, privacy.steps_taken, privacy.epsilon,
             privacy.plan.delta, privacy.plan.accountant)
    return _reply(reply)


def _schedule(config: RunConfig, recipe, train_data: SiteData, cap: float) -> PrivacySchedule:
    """The site's whole schedule: DP-SGD on the training patients, the recipe's one-off
    releases and every planned federated-evaluation release (privacy/eval_release.py)."""
    own = recipe.one_off_releases()
    return PrivacySchedule(target_epsilon=cap, delta=config.delta, accountant=config.accountant,
                           sample_rate=sample_rate_for(train_data.num_patients, config.batch_size),
                           total_steps=config.num_rounds * config.local_steps,
                           max_grad_norm=config.max_grad_norm,
                           releases=own + planned_eval_releases(config, own))


def _site_for(recipe: Recipe, node: NodeSetup, config: RunConfig) -> SiteData:
    """The site read as the recipe consumes it (slices or volumes, whatever dataset.toml's
    dims). A site with nothing usable for it is refused before any budget is spent, with a
    path-free reason (the full one, naming files, stays in the node log)."""
    try:
        return load_site(node.data_dir, config.image_size, cache_dir=node.cache_dir,
                         consumes=recipe.consumes)
    except SiteDataError as err:
        log.warning("site %s: %s", node.site, err)
        raise SiteDataRefused(f"no usable records for recipe {recipe.name!r}, which consumes "
                              f"{recipe.consumes} (the node log lists each file and why)") from None


def evaluate_round(config: RunConfig, node: NodeSetup, content: RecordDict) -> RecordDict:
    """Score the incoming global generator on this site's evaluation patients; ONE DP
    release (evaluation/federated_eval.py, privacy/eval_release.py); scalars back."""
    if config.federated_eval_fraction == 0:
        raise ConfigError("run-config field 'federated-eval-fraction' is 0: this run reserved no "
                          "evaluation patients, so the site cannot evaluate")
    incoming = content["arrays"]
    settings = content["config"]
    run_key, server_round = str(settings["run-key"]), int(settings["absolute-round"])
    request = request_id(run_key, server_round, incoming)
    replies = ReplyStore(node.state_dir / EVAL_REPLIES)
    stored = replies.load(request)
    if stored is not None:  # the same evaluation again: its scalars, at no new cost
        return RecordDict({"metrics": MetricRecord(dict(stored.metrics))})

    recipe = build_recipe(config)
    model = recipe.build()
    shared = incoming.to_torch_state_dict()
    expected = set(recipe.shared_keys(model))
    if set(shared) != expected:
        raise ValueError(f"incoming weights do not match recipe {config.recipe!r}: "
                         f"{len(set(shared) ^ expected)} keys differ")
    model.load_state_dict({**model.state_dict(), **shared})  # the GLOBAL generator only
    model.to(_device(config))
    site_data = _site_for(recipe, node, config)
    recipe.check_site(site_data)
    split = split_patients(node.site, site_data.num_patients, config.federated_eval_fraction)
    cap = node.target_epsilon(config)
    schedule = _schedule(config, recipe, patient_subset(site_data, split.train), cap)
    seed = _round_seed(config, node, server_round) ^ 0x5EED_E7A1  # not the training round's draws
    vectors = federated_eval.patient_vectors(
        recipe, model, patient_subset(site_data, split.half_a), patient_subset(site_data, split.half_b),
        node.site_index, config.num_classes, seed)
    noise = torch.Generator().manual_seed(seed) if node.simulated else None
    release = release_for_evaluation(PrivacyLedger.open(node.ledger_path, site=node.site), schedule,
                                     vectors, clip_norm=federated_eval.CLIP_NORM,
                                     noise_multiplier=config.federated_eval_noise, request=request,
                                     server_round=server_round, cap_epsilon=cap, generator=noise)
    metrics: dict[str, float | int] = {
        **federated_eval.scalars(release.values, config.num_classes, config.federated_eval_noise, seed),
        "epsilon": float(release.epsilon), "delta": float(release.delta),
        "site-index": int(node.site_index)}
    replies.save(request, StoredReply({}, metrics))
    log.info("site %s: round %d evaluated on %d held-out patients, epsilon now %.3f (%s accountant)",
             node.site, server_round, len(split.evaluation), release.epsilon, release.accountant)
    return RecordDict({"metrics": MetricRecord(metrics)})


def _reply(reply: StoredReply) -> RecordDict:
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in reply.arrays.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(dict(reply.metrics))})


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _round_seed(config: RunConfig, node: NodeSetup, server_round: int) -> int:
    # distinct per (run seed, site, round): reproducible simulations, fresh draws per round
    return (config.seed * 1_000_003 + node.site_index * 10_007 + server_round) % 2**31


def _device(config: RunConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)
