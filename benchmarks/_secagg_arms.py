"""One arm of ``benchmarks.secagg``, run in its own process (so RSS is the arm's own).

usage: python -m benchmarks._secagg_arms ARM BACKEND N ROUNDS K T POLL
  ARM = plain   : Message-API FedAvg through privfed's round loop
        privfed : the same loop with ``SecAggPlus(FedAvg)`` and ``secagg_mod``
        paired  : plain and privfed rounds alternating on one grid (each its own model;
                  the ClientApp is privfed's, whose mod passes plain rounds through)
        stock   : Flower's legacy FedAvg + SecAggPlusWorkflow + secaggplus_mod
                  (num_shares = K + 1, reconstruction_threshold = T); Ray only
  BACKEND = ray       : Flower's Simulation Engine, 2 ClientApp actors; every InMemoryGrid
                        pulls replies every POLL seconds (privfed's exchange too)
            inprocess : privfed's ``InProcessGrid`` over a pool of 2 warm worker processes
                        (``simulations.workers``); plain's ``send_and_receive`` blocks until
                        replies are in, privfed's exchange pulls every POLL seconds
Model: nn.Linear(1000, 1000); local training: one SGD step on 8 random samples; no evaluation.
The ClientApps are module attributes (``plain_client``, ``privfed_client``) so that the
in-process worker pool can import them. Prints one line ``RESULT {json}``: per-round
seconds (paired: per arm, and the per-round ratios privfed / plain), privfed's per-stage
seconds, round trips, driver RSS, reply bytes (Ray).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from torch import nn  # noqa: E402

from client.secagg_mod import secagg_mod  # noqa: E402
from shared.config import RunConfig  # noqa: E402

torch.set_num_threads(1)
D_IN = D_OUT = 1000
D = D_IN * D_OUT + D_OUT
NEX = 8
RUN_CONFIG = RunConfig().to_flat()  # defaults: no dropout, no norm bound, seed 0
WORKERS = 2  # Ray: 2 CPUs, one ClientApp actor each; in-process: 2 worker processes
R: dict = {"round_trips": [], "reply_bytes": []}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Rss:
    """Peak driver RSS sampled every 10 ms while rounds run."""

    def __init__(self) -> None:
        self.start = self.peak = 0.0
        self._stop = threading.Event()

    def begin(self) -> None:
        self.start = self.peak = _rss_mib()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mib())

    def end(self) -> None:
        self._stop.set()
        R["server_start_mib"], R["server_peak_mib"] = round(self.start, 1), round(self.peak, 1)


RSS = Rss()


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


def one_step(net: nn.Module, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(NEX, D_IN, generator=g), torch.randn(NEX, D_OUT, generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    opt.zero_grad()
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _train(msg: Message, context: Context) -> Message:
    net = make_net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = one_step(net, int(context.node_config["partition-id"]))
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()),
                               "metrics": MetricRecord({"train_loss": loss,
                                                        "num-examples": NEX})}),
                   reply_to=msg)  # fmt: skip


def run_config_mod(msg: Message, context: Context, call_next) -> Message:
    """Give the site privfed's default run config for this call (``secagg_mod`` reads
    ``robust`` and ``faults`` from it); Flower's public ``run_simulation`` passes none, and
    Flower refuses a context whose run config changed, so the original is put back."""
    if context.run_config:
        return call_next(msg, context)
    original, context.run_config = context.run_config, dict(RUN_CONFIG)
    try:
        return call_next(msg, context)
    finally:
        context.run_config = original


plain_client = ClientApp(mods=[run_config_mod])
plain_client.train()(_train)
privfed_client = ClientApp(mods=[run_config_mod, secagg_mod])
privfed_client.train()(_train)


def patch_transport(poll: float) -> None:
    """Same poll interval in every InMemoryGrid; record the size of the first large replies."""
    from flwr.common.serde import message_to_proto
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    InMemoryGrid.__init__.__defaults__ = (poll,)
    pull = InMemoryGrid.pull_messages

    def pull_messages(self, message_ids):
        out = pull(self, message_ids)
        for msg in out:
            if len(R["reply_bytes"]) < 3 and msg.has_content():
                size = message_to_proto(msg).ByteSize()
                if size > D:
                    R["reply_bytes"].append(size)
        return out

    InMemoryGrid.pull_messages = pull_messages


class _Counted:
    """Mixin for ``SecAggPlus``: record round trips and where a round's time goes (seconds
    per round in ``R["stage_s"]``: ``setup`` trips, the ``collect`` trip (model down, masked
    input up), the ``unmask`` trip, ``finish`` (unmask leftovers, decode, new model));
    ``last`` is the run's last round (the paired arm runs one round per ``run_rounds`` call,
    which would call every round last)."""

    total_rounds = 0

    def train_round(self, rnd, arrays, grid, *, last):  # noqa: ANN001, ANN201
        self._stages = {"setup": 0.0, "collect": 0.0, "unmask": 0.0, "finish": 0.0}
        out = super().train_round(rnd, arrays, grid, last=rnd == self.total_rounds)
        R["round_trips"].append(out.round_trips)
        R.setdefault("stage_s", []).append({k: round(v, 4) for k, v in self._stages.items()})
        return out

    def _trip(self, grid, legs, payload, out):  # noqa: ANN001, ANN202
        kind = "unmask" if self._stages["collect"] else "setup"
        kind = "collect" if payload is not None else kind
        start = time.perf_counter()
        try:
            return super()._trip(grid, legs, payload, out)
        finally:
            self._stages[kind] += time.perf_counter() - start

    def _finish(self, *args):  # noqa: ANN002, ANN202
        start = time.perf_counter()
        try:
            return super()._finish(*args)
        finally:
            self._stages["finish"] += time.perf_counter() - start


def _strategies(n: int, rounds: int, k: int, t: int, poll: float):
    """(plain FedAvg, SecAggPlus(FedAvg)) with the arms' settings."""
    from flwr.serverapp.strategy import FedAvg

    from server.secagg import SecAggPlus
    from shared.config import SecAggConfig

    class Counted(_Counted, SecAggPlus):
        pass

    def fedavg() -> FedAvg:
        return FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

    config = SecAggConfig(enabled=True, k=k, threshold=t)
    secure = Counted(fedavg(), config, expected_sites=n, poll_interval=poll)
    secure.total_rounds = rounds
    R["k"], R["t"], R["bits"] = k, t, config.bits
    return fedavg(), secure


def msg_server(arm: str, n: int, rounds: int, k: int, t: int, poll: float):
    """privfed's round loop as a ServerApp: ``plain`` FedAvg, ``privfed`` SecAggPlus(FedAvg),
    or ``paired``: both on the same grid, alternating round by round (each keeps its own
    model), so that both see the same load; round r's order alternates too."""
    from flwr.serverapp import Grid, ServerApp

    from server.loop import LoopSettings, run_rounds
    from shared.training import EvalResult

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        R["grid_pull_interval_s"] = getattr(grid, "pull_interval", None)  # Ray: the same POLL
        plain, secure = _strategies(n, rounds, k, t, poll)
        arms = {"plain": plain, "privfed": secure}
        order = ["plain", "privfed"] if arm == "paired" else [arm]
        models = {a: ArrayRecord(make_net().state_dict()) for a in order}
        RSS.begin()
        for rnd in range(1, rounds + 1):
            for a in order if rnd % 2 else order[::-1]:
                key = "round_s" if arm != "paired" else f"{a}_round_s"
                models[a] = run_rounds(
                    arms[a], grid, models[a], LoopSettings(rounds=rnd, start_round=rnd),
                    lambda m: EvalResult(0.0, 0.0, 0),
                    lambda report, m, key=key: R.setdefault(key, []).append(report.seconds))
        RSS.end()

    return server


def build_stock(n: int, rounds: int, k: int, t: int):
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    def weights(net):
        return [v.detach().numpy() for v in net.state_dict().values()]

    class Client(NumPyClient):
        def __init__(self, pid):
            self.pid = pid

        def fit(self, parameters, config):
            net = make_net()
            net.load_state_dict({k: torch.from_numpy(np.asarray(w))
                                 for k, w in zip(net.state_dict(), parameters, strict=True)})
            return weights(net), NEX, {"train_loss": one_step(net, self.pid)}

        def evaluate(self, parameters, config):
            return 0.0, NEX, {}

    client = LegacyClientApp(
        client_fn=lambda ctx: Client(ctx.node_config["partition-id"]).to_client(),
        mods=[secaggplus_mod])  # fmt: skip
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                          min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters(weights(make_net())))
        R["grid_pull_interval_s"] = getattr(grid, "pull_interval", None)
        workflow = SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=t, timeout=600)
        R["num_shares"], R["threshold"] = k + 1, t

        def fit(g, c):
            start = time.perf_counter()
            workflow(g, c)
            R.setdefault("round_s", []).append(time.perf_counter() - start)
            R["round_trips"].append(4)

        RSS.begin()
        DefaultWorkflow(fit_workflow=fit)(grid, LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy))
        RSS.end()

    return server, client


def run_ray(arm: str, n: int, rounds: int, k: int, t: int, poll: float) -> None:
    from flwr.simulation import run_simulation

    patch_transport(poll)
    if arm == "stock":
        server_app, client_app = build_stock(n, rounds, k, t)
    else:
        server_app = msg_server(arm, n, rounds, k, t, poll)
        client_app = plain_client if arm == "plain" else privfed_client
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": WORKERS, "include_dashboard": False}}  # fmt: skip
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config=backend)  # fmt: skip


def run_inprocess(arm: str, n: int, rounds: int, k: int, t: int, poll: float) -> None:
    """The arm on privfed's in-process backend, through its public classes."""
    from simulations.inprocess import InProcessGrid, VirtualSites
    from simulations.runner import new_run
    from simulations.workers import make_executor

    if arm == "stock":
        raise SystemExit("the stock arm runs on Ray only")
    # Workers are forked before any thread starts (the RSS sampler starts in the server).
    client = "plain" if arm == "plain" else "privfed"
    executor = make_executor(WORKERS, f"benchmarks._secagg_arms:{client}_client")
    try:
        flat = dict(RUN_CONFIG)
        run = new_run(flat)
        grid = InProcessGrid(VirtualSites(n, run.run_id, flat), executor)
        grid.set_run(run)
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(flat))  # fmt: skip
        msg_server(arm, n, rounds, k, t, poll)(grid=grid, context=context)
    finally:
        executor.close()


def main(argv: list[str]) -> None:
    arm, backend = argv[0], argv[1]
    n, rounds, k, t = map(int, argv[2:6])
    poll = float(argv[6])
    R.update({"arm": arm, "backend": backend, "N": n, "rounds": rounds, "d": D})
    {"ray": run_ray, "inprocess": run_inprocess}[backend](arm, n, rounds, k, t, poll)
    for key in [k for k in R if k.endswith("round_s")]:
        rs = R[key]
        R[key] = [round(x, 3) for x in rs]
        steady = rs[1:-1] if len(rs) > 2 else rs  # excl. round 1 (setup) and the last round
        R["median_" + key] = round(float(np.median(steady)), 3)
    if arm == "paired":  # per-round ratios, steady rounds
        pairs = list(zip(R["privfed_round_s"], R["plain_round_s"], strict=True))[1:-1]
        R["ratios"] = [round(a / b, 3) for a, b in pairs]
    print("RESULT " + json.dumps(R), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
