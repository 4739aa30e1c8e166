"""One arm of ``benchmarks.secagg`` on Flower's Simulation Engine (run in its own process).

usage: python -m benchmarks._secagg_arms ARM N ROUNDS D_IN D_OUT K T POLL
  ARM = plain   : Message-API FedAvg through privfed's round loop
        privfed : the same loop with ``SecAggPlus(FedAvg)`` and ``secagg_mod``
        stock   : Flower's legacy FedAvg + SecAggPlusWorkflow + secaggplus_mod
                  (num_shares = K + 1, reconstruction_threshold = T)
Model: nn.Linear(D_IN, D_OUT); local training: one SGD step on 8 random samples; no evaluation.
Every arm's InMemoryGrid polls every POLL seconds (privfed's exchange too): same transport.
Prints one line ``RESULT {json}``: per-round seconds, round trips, driver RSS, reply bytes.
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
from torch import nn  # noqa: E402

torch.set_num_threads(1)
ARM, N, ROUNDS, D_IN, D_OUT, K, T = sys.argv[1], *map(int, sys.argv[2:8])
POLL = float(sys.argv[8])
NEX = 8
R: dict = {"arm": ARM, "N": N, "rounds": ROUNDS, "d": D_IN * D_OUT + D_OUT, "round_s": [],
           "round_trips": [], "reply_bytes": []}  # fmt: skip


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


def patch_transport() -> None:
    """Same poll interval everywhere; record the size of the first large replies."""
    from flwr.common.serde import message_to_proto
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    InMemoryGrid.__init__.__defaults__ = (POLL,)
    pull = InMemoryGrid.pull_messages

    def pull_messages(self, message_ids):
        out = pull(self, message_ids)
        for msg in out:
            if len(R["reply_bytes"]) < 3 and msg.has_content():
                size = message_to_proto(msg).ByteSize()
                if size > R["d"]:
                    R["reply_bytes"].append(size)
        return out

    InMemoryGrid.pull_messages = pull_messages


def build_msg(secure: bool):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from client.secagg_mod import secagg_mod
    from server.loop import LoopSettings, run_rounds
    from server.secagg import SecAggPlus
    from shared.config import SecAggConfig
    from shared.training import EvalResult

    client = ClientApp(mods=[secagg_mod] if secure else None)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        net = make_net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = one_step(net, int(context.node_config["partition-id"]))
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()),
                                   "metrics": MetricRecord({"train_loss": loss,
                                                            "num-examples": NEX})}),
                       reply_to=msg)  # fmt: skip

    server = ServerApp()

    class Counted(SecAggPlus):
        def train_round(self, *args, **kwargs):
            out = super().train_round(*args, **kwargs)
            R["round_trips"].append(out.round_trips)
            return out

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N)
        if secure:
            config = SecAggConfig(enabled=True, k=K, threshold=T)
            strategy = Counted(strategy, config, expected_sites=N, poll_interval=POLL)
            R["k"], R["t"], R["bits"] = K, T, config.bits
        RSS.begin()
        run_rounds(strategy, grid, ArrayRecord(make_net().state_dict()),
                   LoopSettings(rounds=ROUNDS), lambda a: EvalResult(0.0, 0.0, 0),
                   lambda report, a: R["round_s"].append(report.seconds))  # fmt: skip
        RSS.end()

    return server, client


def build_stock():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared", "baselines"))
    from flwr.app import Context
    from flwr.client import ClientApp, NumPyClient
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

    client = ClientApp(client_fn=lambda ctx: Client(ctx.node_config["partition-id"]).to_client(),
                       mods=[secaggplus_mod])  # fmt: skip
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=N,
                          min_available_clients=N,
                          initial_parameters=ndarrays_to_parameters(weights(make_net())))
        workflow = SecAggPlusWorkflow(num_shares=K + 1, reconstruction_threshold=T, timeout=600)
        R["num_shares"], R["threshold"] = K + 1, T

        def fit(g, c):
            t = time.perf_counter()
            workflow(g, c)
            R["round_s"].append(time.perf_counter() - t)
            R["round_trips"].append(4)

        RSS.begin()
        DefaultWorkflow(fit_workflow=fit)(grid, LegacyContext(
            context=context, config=ServerConfig(num_rounds=ROUNDS), strategy=strategy))
        RSS.end()

    return server, client


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    patch_transport()
    server_app, client_app = build_stock() if ARM == "stock" else build_msg(ARM == "privfed")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "include_dashboard": False}}  # fmt: skip
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=N,
                   backend_config=backend)  # fmt: skip
    rs = R["round_s"]
    R["round_s"] = [round(x, 3) for x in rs]
    steady = rs[1:-1] if len(rs) > 2 else rs  # excl. round 1 (setup) and the last round
    R["median_round_s"] = round(float(np.median(steady)), 3)
    print("RESULT " + json.dumps(R), flush=True)
