"""The wire contract: record keys and model (de)serialisation both apps use.

Flower messages carry a ``RecordDict``; privfed puts the model under
:data:`ARRAYS`, the round's instructions under :data:`CONFIG` and a site's
reply metrics under :data:`METRICS`. Strategies weight replies by the metric
:data:`NUM_EXAMPLES`. Import these names; never retype the strings.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
#: ConfigRecord in a train reply with facts about the site, not its data: ``name``
#: and, with DP on, the site's cumulative ``epsilon`` (public by design: the site
#: reports its spend; it is not averaged).
SITE = "site"
SITE_NAME = "name"
SITE_EPSILON = "epsilon"
SITE_ROUND = "round"

#: Error code of a train reply refused because the site's privacy budget is spent
#: (Flower's own codes are small integers; privfed's start at 1000).
ERROR_PRIVACY_BUDGET_EXHAUSTED = 1001

# Node-config keys a simulation sets for every virtual site.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: Node-config key of a deployed site's display name.
SITE_NAME_KEY = "site-name"


def to_record(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    """A torch state dict as an ``ArrayRecord`` (CPU copies, exact bytes, key order kept)."""
    return ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items()))


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """The inverse of :func:`to_record`: bit-identical tensors, same keys and dtypes."""
    return record.to_torch_state_dict()


def load_into(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Load global weights into ``model``; keys and shapes must match exactly.

    Raises:
        ValueError: the record does not fit the model (names the keys at fault).
    """
    state = from_record(record)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"model weights do not fit: missing {missing}, unexpected {extra}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"model weights do not fit: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
