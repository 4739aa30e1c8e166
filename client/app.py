"""The privfed ClientApp: what runs at a data-holding site.

``train`` loads the global weights, trains on the site's data with the run's
optimizer, epochs and batch size, and replies with the new weights and metrics
(``num-examples`` weights the server's average). ``evaluate`` reports loss and
accuracy of the global model on the site's validation hold-out.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import SiteData, preload_partitions, site_data
from client.faults import (
    SimulatedCrash,
    SimulatedDropout,
    byzantine_sites,
    crashes,
    dropout_stage,
    misbehave,
    straggler_delay,
)
from client.ledger import BudgetExhaustedError
from client.privacy import train_privately
from client.secagg_mod import secagg_mod
from shared.config import DropoutStage, RunConfig
from shared.models import InputSpec, get_model
from shared.training import (
    DEVICE_KEY,
    Batches,
    evaluate,
    make_optimizer,
    model_device,
    resolve_device,
    seed_torch,
    train,
)
from shared.wire import (
    ARRAYS,
    CONFIG,
    ERROR_PRIVACY_BUDGET_EXHAUSTED,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
    SITE,
    SITE_EPSILON,
    SITE_NAME,
    SITE_NAME_KEY,
    SITE_ROUND,
    load_into,
    record_at,
    to_record,
)

app = ClientApp(mods=[secagg_mod])  # SecAgg+ stages; plain train messages pass through


def _round_of(msg: Message) -> int:
    config = record_at(msg.content, CONFIG, ConfigRecord)
    return int(config.get(SERVER_ROUND, 0)) if config is not None else 0  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def _reusable_model(name: str, spec: InputSpec) -> torch.nn.Module:
    return get_model(name, spec)


def _model_for(
    config: RunConfig, data: SiteData, msg: Message, *, reuse: bool = False,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """The global model of ``msg`` on ``device`` (default CPU): a fresh module, or with
    ``reuse`` this process's one module of that architecture, every parameter and buffer
    overwritten (a simulation's worker runs many sites' calls; building the module cost
    more than its 7 SGD steps' worth of overhead). DP-SGD always gets a fresh module:
    Opacus attaches hooks to it.
    """
    if reuse:
        model = _reusable_model(config.model.name, data.spec)
        model.zero_grad(set_to_none=True)
    else:
        model = get_model(config.model.name, data.spec)
    target = device or torch.device("cpu")
    if model_device(model) != target:
        model.to(target)  # in place: a reused module stays there for the next call
    load_into(model, msg.content[ARRAYS])  # type: ignore[arg-type]
    return model


def site_device(context: Context) -> torch.device:
    """Where this site trains: node config ``device`` (``cpu``, ``cuda``, ``cuda:N`` or
    ``auto``; a deployed site's ``site.device``), CPU when absent (simulated sites).

    Raises:
        ValueError: naming the key, for an unknown name or a GPU torch cannot see.
    """
    return resolve_device(context.node_config.get(DEVICE_KEY, "cpu"),
                          key=f"node config {DEVICE_KEY}")


def warm_up(config: RunConfig) -> None:
    """Do once per process what a simulation's first train calls would otherwise pay for:
    load the run's partitions, build the reusable model and take one SGD step on it (torch
    sets up its kernels, allocator and autograd on first use: ~13 ms of a worker's first
    call). Nothing of the step survives: every call overwrites the model's weights, and
    the global RNG states are put back. DP runs train fresh models: only the data loads.
    """
    preload_partitions(config)
    if config.privacy.enabled:
        return
    with torch.random.fork_rng(devices=[]):
        data = site_data(config, {PARTITION_ID: 0, NUM_PARTITIONS: config.federation.clients})
        model = _reusable_model(config.model.name, data.spec)
        batches = Batches(data.train, config.train.batch_size, seed=0, shuffle=True)
        train(model, batches, make_optimizer(model, config.train), epochs=1)
        load_into(model, to_record(model.state_dict()))
        model.zero_grad(set_to_none=True)


def _drops_out(config: RunConfig, server_round: int, site_id: int) -> bool:
    """Whether this site drops out of this round while training (``client.faults``)."""
    return dropout_stage(config, server_round, site_id) is DropoutStage.TRAIN


def _training_seed(seed: int, server_round: int, site_id: int) -> int:
    """Seed of this site's shuffling and dropout masks in this round (reproducible)."""
    return int(np.random.SeedSequence([seed, server_round, site_id]).generate_state(1)[0])


def _site_name(context: Context) -> str:
    node_config = context.node_config
    for key in (SITE_NAME_KEY, PARTITION_ID):
        if key in node_config:
            return str(node_config[key])
    return str(context.node_id)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the global model locally (with DP-SGD if the run asks) and reply."""
    config = RunConfig.from_flat(context.run_config, complete=True)
    data = site_data(config, context.node_config)
    server_round = _round_of(msg)
    if _drops_out(config, server_round, data.site_id):
        raise SimulatedDropout(f"site {data.site_id} dropped out of round {server_round}")
    model = _model_for(config, data, msg, reuse=not config.privacy.enabled,
                       device=site_device(context))
    seed = _training_seed(config.federation.seed, server_round, data.site_id)
    seed_torch(seed)
    site = ConfigRecord({SITE_NAME: _site_name(context), SITE_ROUND: server_round})
    byzantine = data.site_id in byzantine_sites(config)  # a rehearsal of a misbehaving site
    global_state = {k: v.clone() for k, v in model.state_dict().items()} if byzantine else {}
    if config.privacy.enabled:
        try:
            result = train_privately(model, data.train, config, context.node_config,
                                     run_id=context.run_id, server_round=server_round, seed=seed)
        except BudgetExhaustedError as exc:  # nothing trained; the server carries on
            return Message(Error(ERROR_PRIVACY_BUDGET_EXHAUSTED, str(exc)), reply_to=msg)
        state, loss = result.state, result.train_loss
        site[SITE_EPSILON] = result.epsilon
    else:
        loader = Batches(data.train, config.train.batch_size, seed=seed, shuffle=True)
        loss = train(model, loader, make_optimizer(model, config.train), config.train.epochs)
        state = model.state_dict()
    if crashes(config, server_round, data.site_id):
        raise SimulatedCrash(f"site {data.site_id} crashed after training in round {server_round}")
    delay = straggler_delay(config, server_round, data.site_id)
    if delay > 0:
        time.sleep(delay)
    if byzantine:
        state = misbehave(config.faults.byzantine_kind, state, global_state)
    metrics = MetricRecord({"train_loss": loss, NUM_EXAMPLES: len(data.train)})
    content = RecordDict({ARRAYS: to_record(state), METRICS: metrics, SITE: site})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's validation hold-out."""
    config = RunConfig.from_flat(context.run_config, complete=True)
    data = site_data(config, context.node_config)
    model = _model_for(config, data, msg, reuse=True, device=site_device(context))
    result = evaluate(model, data.val)
    metrics = MetricRecord(
        {"eval_loss": result.loss, "eval_accuracy": result.accuracy, NUM_EXAMPLES: len(data.val)}
    )
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)

