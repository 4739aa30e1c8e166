"""SecAgg+ (Bell et al., CCS 2020) protocol core: pure, transport-free.

Modules:
    params: validated, frozen protocol parameters (``SecAggParams``).
    contract: versioned stage messages, stage names, record keys, (de)serialisation.
    codec: canonical bytes for the flat message dicts.
    shamir: vectorised Shamir secret sharing over GF(2^61 - 1).
    graph: k-regular neighbourhood graph from a public seed.
    crypto: X25519 key agreement, HKDF key derivation, ChaCha20-Poly1305 share bundles.
    encoding: weighted input encoding into Z_2^32 and decoding of the sum (kernels quantize).
    client / server: the protocol state machines.
    driver: the stage loops with the transport injected (for a ServerApp and a client mod).

Stage flow for one (run, round), n clients, k neighbours, threshold t, vector length
L = n_params + 1 + n_metrics:

1. advertise-keys: server -> each client: parameters and its index; client -> server: two
   X25519 public keys (channel, mask).
2. share-keys: server -> client: its neighbours' public keys; client -> server: per neighbour
   a ChaCha20-Poly1305 bundle with Shamir shares of its self-mask seed and mask private key.
3. collect-masked: server -> client: the bundles addressed to it; client -> server: its
   encoded input plus self mask plus signed pairwise masks (4 bytes per element). The server
   folds each reply into one Z_2^32 accumulator.
4. unmask: server -> client: survivors and dropped; client -> server: seed shares of
   survivors, key shares of dropped. ``finalize`` rebuilds seeds and keys and removes masks.

Nothing here imports Flower; the transport lives in ``server/`` and ``client/``.
"""

from shared.secagg.client import SecAggClient
from shared.secagg.contract import PROTOCOL_VERSION, Direction, Stage, parse, record_name
from shared.secagg.driver import client_step, run_server_round
from shared.secagg.encoding import Aggregate, decode, encode, vector_length
from shared.secagg.errors import (
    ContractError,
    SecAggAbort,
    ShareDecryptionError,
    StaleMessageError,
)
from shared.secagg.params import SecAggParams
from shared.secagg.server import SecAggServer

__all__ = [
    "PROTOCOL_VERSION",
    "Aggregate",
    "ContractError",
    "Direction",
    "SecAggAbort",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "ShareDecryptionError",
    "StaleMessageError",
    "Stage",
    "client_step",
    "decode",
    "encode",
    "parse",
    "record_name",
    "run_server_round",
    "vector_length",
]
