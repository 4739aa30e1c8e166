"""SecAgg+ (Bell et al., CCS 2020) protocol core: pure, transport-free.

Modules:
    params: validated, frozen protocol parameters (``SecAggParams``).
    contract: versioned stage messages, stage names, record keys, (de)serialisation.
    shamir: vectorised Shamir secret sharing over GF(2^61 - 1).
    graph: k-regular neighbourhood graph from a public seed.
    crypto: X25519 key agreement, HKDF key derivation, ChaCha20-Poly1305 share bundles.
    encoding: weighted input encoding into Z_2^32 and decoding of the sum.
    client / server: the protocol state machines.

Nothing here imports Flower; the transport (``Grid.send_and_receive`` and client mods)
lives in ``server/`` and ``client/``.
"""

from shared.secagg.errors import ContractError, SecAggAbort, ShareDecryptionError

__all__ = ["ContractError", "SecAggAbort", "ShareDecryptionError"]
