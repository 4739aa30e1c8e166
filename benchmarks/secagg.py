"""SecAgg+ round cost: plain FedAvg vs Flower's stock SecAgg+ vs privfed SecAgg+.

``python -m benchmarks.secagg [--json] [--clients 20] [--rounds 6] [--paired-rounds 16]``

Workload: a 1M-parameter linear model, one local SGD step, no evaluation, all sites every
round; privfed uses the same k neighbours and threshold t as stock's num_shares = k + 1 (odd:
Flower 1.41 crashes on an even num_shares < N). Each arm runs in its own process
(``benchmarks._secagg_arms``), so RSS is per arm.

* ``privfed_vs_plain`` (Flower's Simulation Engine, Ray, 2 ClientApp actors) and
  ``privfed_vs_plain_inprocess`` (privfed's ``InProcessGrid``, 2 worker processes): plain
  and privfed rounds alternate on ONE grid in one process (paired arm), so both see the same
  machine load; the figure is the median of the per-round ratios over rounds 2..R-1 (round 1
  sets up keys and starts the backend; privfed's last round sets up nothing), with their
  range; ``paired_*_round_s`` holds both arms' median round and privfed's median seconds
  per stage (``collect`` trip: model down, masked input up; ``unmask`` trip; ``finish``:
  last unmasking, decoding, new model). On Ray every InMemoryGrid pulls replies every
  ``--poll`` seconds, privfed's exchange too (checked: the run fails otherwise); Flower's
  engine hands pushed messages to the actors on a fixed 0.1 s tick
  (``vce_api.add_messages_to_queue``), which every round trip
  of every arm waits for. In process plain's ``send_and_receive`` blocks on the workers and
  privfed's exchange pulls every ``--poll`` seconds (at most ``--poll`` per round trip lost).
* ``stock_vs_plain``, ``server_peak_mb_*``, upload bytes: plain, stock and privfed each in
  their own Ray process (stock's legacy ClientApp cannot share a run with the others), at
  10 and ``--clients`` sites; round time is the median over rounds 2..R-1.
  ``privfed_vs_plain_separate`` is privfed's ratio measured that way.

Load-independent: ``client_cpu_ms_per_call``, the CPU time of one site call, all its threads
(plain train; privfed collect, whose masks are drawn on a second thread, and unmask), and
``client_cpu_privfed_vs_plain`` = (collect + unmask) / plain, the ratio a CPU-bound backend
cannot beat.

In process, 1 thread: client encode (clip, quantize, weight, k + 1 masks) and server
unmask + decode per 1M parameters for both implementations, and the unmask stage alone for
100 clients at t = 26 (k + 1 = 39 share holders).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import secrets
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks._common import emit, median_seconds
from shared.secagg import SecAggClient, SecAggParams, SecAggServer, decode, encode
from shared.secagg.contract import Direction, parse

D = 1_000_000


def _wire(msg, direction):
    return parse(msg.to_dict(), direction)


def privfed_session(n: int, k: int, t: int, d: int = D):
    """Run stages 1-2 for n clients; return (server, clients, collect ins, params)."""
    params = SecAggParams(n=n, k=k, t=t, bits=16, clip_range=1.0, max_weight=600)
    server = SecAggServer(params, 7, 1, n_params=d, n_metrics=1)
    clients = [SecAggClient(7, 1) for _ in range(n)]
    for make, act in ((server.advertise_keys_ins, lambda c, m: c.advertise_keys(m)),
                      (server.share_keys_ins, lambda c, m: c.share_keys(m))):  # fmt: skip
        for u, ins in make().items():
            server.receive(_wire(act(clients[u], _wire(ins, Direction.INS)), Direction.RES))
    return server, clients, server.collect_masked_ins(), params


def privfed_micro(n: int, k: int, t: int) -> dict[str, float]:
    """Client encode + mask, and server unmask + decode, per 1M parameters (ms)."""
    server, clients, ins, params = privfed_session(n, k, t)
    update = np.random.default_rng(0).normal(0, 0.01, D).astype(np.float32)
    state = clients[0].to_local_state()

    def client_encode():
        c = SecAggClient.from_local_state(state)
        c.collect_masked(ins[0], encode(update, 8, params, metrics=np.array([1.0])))

    encode_s = median_seconds(client_encode, repeat=5, warmup=1)
    vec = encode(update, 8, params, metrics=np.array([1.0]))
    for u, c in enumerate(clients):
        server.receive(_wire(c.collect_masked(ins[u], vec), Direction.RES))
    unmask = server.unmask_ins()
    replies = [_wire(c.unmask(unmask[u]), Direction.RES) for u, c in enumerate(clients)]

    def server_decode():  # the server removes self masks as unmask replies arrive: time it all
        s = copy.deepcopy(server)
        t0 = time.perf_counter()
        for res in replies:
            s.receive(res)
        decode(s.finalize(), params, D, 1)
        return time.perf_counter() - t0

    decode_s = statistics.median(server_decode() for _ in range(3))
    return {"encode_ms": 1e3 * encode_s, "decode_ms": 1e3 * decode_s}


def privfed_unmask_100(t: int = 26, k: int = 38, d: int = D) -> float:
    """Server unmask stage alone (take 100 unmask replies, reconstruct 100 seeds, remove 100
    self masks) in ms."""
    n = 100
    server, clients, ins, params = privfed_session(n, k, t, d)
    vec = np.zeros(d + 2, dtype=np.uint32)
    for u, c in enumerate(clients):
        server.receive(_wire(c.collect_masked(ins[u], vec), Direction.RES))
    unmask = server.unmask_ins()
    replies = [_wire(c.unmask(unmask[u]), Direction.RES) for u, c in enumerate(clients)]
    t0 = time.perf_counter()
    for res in replies:
        server.receive(res)
    server.finalize()
    return 1e3 * (time.perf_counter() - t0)


def stock_micro(n: int, k: int, t: int, unmask_clients: int | None = None) -> dict[str, float]:
    """Flower 1.41 SecAgg+ pieces, as its mod and workflow call them (ms per 1M params)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    mod, qrange, clip, dims = 1 << 32, 1 << 22, 8.0, [(1,), (D,)]  # weight factor, vector
    params = [np.random.default_rng(0).normal(0, 0.01, D).astype(np.float32)]
    seeds = [secrets.token_bytes(32) for _ in range(k + 1)]

    def client_encode():
        q_ratio = round(100 / 1000 * qrange)
        p = parameters_multiply(params, q_ratio / qrange)
        q = factor_combine(q_ratio, quantize(p, clip, qrange))
        q = parameters_addition(q, pseudo_rand_gen(seeds[0], mod, dims))
        for i, seed in enumerate(seeds[1:]):
            m = pseudo_rand_gen(seed, mod, dims)
            q = parameters_addition(q, m) if i % 2 else parameters_subtraction(q, m)
        return parameters_mod(q, mod)

    encode_s = median_seconds(client_encode, repeat=3, warmup=1)
    masked = client_encode()

    def unmask(clients: int) -> float:
        shares = [create_shares(secrets.token_bytes(32), t, k + 1)[:t] for _ in range(clients)]
        t0 = time.perf_counter()
        total = masked
        for share_list in shares:
            seed = combine_shares(share_list)
            total = parameters_subtraction(total, pseudo_rand_gen(seed, mod, dims))
        total = parameters_mod(total, mod)
        return time.perf_counter() - t0, total

    decode_s, total = unmask(n)
    t0 = time.perf_counter()
    ratio, vec = factor_extract(total)
    dequantize(vec, clip, qrange)
    decode_s += time.perf_counter() - t0
    out = {"encode_ms": 1e3 * encode_s, "decode_ms": 1e3 * decode_s}
    if unmask_clients:
        out["unmask_100_ms"] = 1e3 * unmask(unmask_clients)[0]
    return out


def client_cpu_ms(n: int, k: int, t: int, rounds: int = 5) -> dict[str, float]:
    """CPU time of one site call, every thread of the process (``time.process_time``: the
    collect call draws its masks on a second thread), in ms, median; load-independent: a
    plain train call, privfed's collect call (train + encode + k + 1 masks) and unmask call
    (unmask + next round's share keys), run inline (``--workers 0``: messages copied as the
    pool's pipe copies them) on the in-process grid; rounds 3..``rounds`` (steady state)."""
    from flwr.app import ArrayRecord

    from benchmarks._secagg_arms import RUN_CONFIG, _strategies, make_net
    from server.loop import LoopSettings, run_rounds
    from shared.secagg.transport import is_stage_record
    from shared.training import EvalResult
    from simulations.inprocess import InProcessGrid, VirtualSites
    from simulations.runner import new_run
    from simulations.workers import make_executor

    logging.getLogger("flwr").setLevel(logging.WARNING)  # the JSON stays the last line
    executor = make_executor(0, "benchmarks._secagg_arms:privfed_client")
    calls: dict[str, list[float]] = {"plain": [], "collect": [], "unmask": []}
    submit, steady = executor.submit, [False]

    def timed_submit(task_id, message, context):
        start = time.process_time()
        submit(task_id, message, context)
        if steady[0]:
            secure = any(is_stage_record(name) for name in message.content.config_records)
            kind = "plain" if not secure else "collect" if "arrays" in message.content else "unmask"
            calls[kind].append(time.process_time() - start)

    executor.submit = timed_submit
    run = new_run(RUN_CONFIG)
    grid = InProcessGrid(VirtualSites(n, run.run_id, RUN_CONFIG), executor)
    grid.set_run(run)
    plain, secure = _strategies(n, rounds, k, t, 0.0)
    secure.total_rounds = rounds
    arrays = ArrayRecord(make_net().state_dict())
    for rnd in range(1, rounds + 1):
        steady[0] = rnd >= 3
        for strategy in (plain, secure):
            run_rounds(strategy, grid, arrays, LoopSettings(rounds=rnd, start_round=rnd),
                       lambda a: EvalResult(0.0, 0.0, 0), lambda report, a: None)  # fmt: skip
    executor.close()
    return {kind: round(1e3 * statistics.median(v), 2) for kind, v in calls.items()}


def run_arm(arm: str, backend: str, n: int, rounds: int, k: int, t: int, poll: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks._secagg_arms", arm, backend, str(n), str(rounds),
           str(k), str(t), str(poll)]  # fmt: skip
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    match = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if match is None:
        raise RuntimeError(f"arm {arm} on {backend} N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(match.group(1))


def paired_ratio(result: dict) -> dict[str, object]:
    """Median and range of the per-round ratios privfed / plain of a paired run, and the
    median seconds per privfed stage next to plain's round (steady rounds)."""
    ratios = result["ratios"]
    steady = result["stage_s"][1:-1] or result["stage_s"]
    stages = {k: round(statistics.median(r[k] for r in steady), 3) for k in steady[0]}
    return {"median": round(statistics.median(ratios), 2),
            "range": [round(min(ratios), 2), round(max(ratios), 2)],
            "plain_round_s": result["median_plain_round_s"],
            "privfed_round_s": result["median_privfed_round_s"],
            "privfed_stage_s": {k: v for k, v in stages.items() if k != "setup"}}  # fmt: skip


def shares_for(n: int) -> tuple[int, int]:
    """Neighbours k (k + 1 odd and < n, as stock needs) and threshold t = round(2(k+1)/3)."""
    k = min(n - 2, 10)
    k -= k % 2
    return k, max(2, round(2 * (k + 1) / 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--paired-rounds", type=int, default=16)
    ap.add_argument("--poll", type=float, default=0.01)
    args = ap.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, object] = {"clients": args.clients, "rounds": args.rounds, "d": 1_001_000,
                                  "paired_rounds": args.paired_rounds,
                                  "poll_interval_s": args.poll, "threads": 1}  # fmt: skip
    n = args.clients
    k, t = shares_for(n)
    paired = {b: run_arm("paired", b, n, args.paired_rounds, k, t, args.poll)
              for b in ("ray", "inprocess")}  # fmt: skip
    for b, r in paired.items():
        print(f"# paired {b:9s} N={n:3d} k={k} t={t} plain={r['plain_round_s']} "
              f"privfed={r['privfed_round_s']} ratios={r['ratios']}", file=sys.stderr)
    arms: dict[tuple[str, int], dict] = {}
    for m in sorted({10, n}):
        km, tm = shares_for(m)
        for arm in ("plain", "stock", "privfed"):
            arms[(arm, m)] = run_arm(arm, "ray", m, args.rounds, km, tm, args.poll)
            r = arms[(arm, m)]
            print(f"# {arm:8s} ray N={m:3d} k={km} t={tm} round_s={r['round_s']} "
                  f"peak={r['server_peak_mib']} MiB", file=sys.stderr)  # fmt: skip
    pulls = {r.get("grid_pull_interval_s") for r in [*arms.values(), paired["ray"]]}
    if pulls != {args.poll}:  # every Ray arm must poll its grid at the same interval
        raise RuntimeError(f"Ray arms pulled replies every {pulls} s, expected {args.poll}")
    plain, stock, ours = (arms[(a, n)]["median_round_s"] for a in ("plain", "stock", "privfed"))
    mine, theirs = privfed_micro(n, k, t), stock_micro(n, k, t, unmask_clients=100)
    cpu = client_cpu_ms(n, k, t)
    ray, inproc = paired_ratio(paired["ray"]), paired_ratio(paired["inprocess"])
    trips = paired["ray"]["round_trips"]
    figures.update({
        "k": k, "threshold": t,
        "privfed_vs_plain": ray["median"], "privfed_vs_plain_range": ray["range"],
        "privfed_vs_plain_inprocess": inproc["median"],
        "privfed_vs_plain_inprocess_range": inproc["range"],
        "paired_ray_round_s": {"plain": ray["plain_round_s"], "privfed": ray["privfed_round_s"],
                               **ray["privfed_stage_s"]},
        "paired_inprocess_round_s": {"plain": inproc["plain_round_s"],
                                     "privfed": inproc["privfed_round_s"],
                                     **inproc["privfed_stage_s"]},
        "plain_round_s": plain, "stock_round_s": stock, "privfed_round_s": ours,
        "privfed_vs_plain_separate": round(ours / plain, 2),
        "stock_vs_plain": round(stock / plain, 2),
        "client_cpu_ms_per_call": cpu,
        "client_cpu_privfed_vs_plain": round((cpu["collect"] + cpu["unmask"]) / cpu["plain"], 2),
        "round_trips_per_round": statistics.median(trips[1:]),
        "round_trips_round1": trips[0],
        "stock_round_trips_per_round": 4,
        "encode_ms": round(mine["encode_ms"], 1), "stock_encode_ms": round(theirs["encode_ms"], 1),
        "decode_ms": round(mine["decode_ms"], 1), "stock_decode_ms": round(theirs["decode_ms"], 1),
        "unmask_100_clients_t26_ms": round(privfed_unmask_100(), 1),
        "stock_unmask_100_clients_t26_ms": round(theirs["unmask_100_ms"], 1),
    })  # fmt: skip
    for arm in ("plain", "stock", "privfed"):
        sizes = arms[(arm, n)]["reply_bytes"]
        key = "upload_bytes_per_param" if arm == "privfed" else f"{arm}_upload_bytes_per_param"
        figures[key] = round(max(sizes) / 1_001_000, 3) if sizes else None
        for m in sorted({10, n}):
            a = arms[(arm, m)]
            prefix = "" if arm == "privfed" else f"{arm}_"
            figures[f"{prefix}server_peak_mb_{m}"] = a["server_peak_mib"]
            figures[f"{prefix}server_growth_mb_{m}"] = round(
                a["server_peak_mib"] - a["server_start_mib"], 1)
    emit(figures, as_json=args.json)


if __name__ == "__main__":
    main()
