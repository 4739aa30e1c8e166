"""The centralized reference: the same model trained on the pooled training data.

Same seed, same initial weights as the federation's global model, same optimizer
and batch size, and as many epochs as each example gets in the federation
(``rounds * train.epochs``), evaluated on the same test split. Federated vs
centralized is then one number apart in ``summary.json``.
"""

from __future__ import annotations

import torch

from shared.config import RunConfig
from shared.data import load
from shared.models import get_model
from shared.training import Batches, EvalResult, evaluate, make_optimizer, train


def train_centrally(config: RunConfig) -> EvalResult:
    """Train on all training data at once and evaluate on the test split."""
    torch.manual_seed(config.federation.seed)
    dataset = load(config.data)
    model = get_model(config.model.name, dataset.spec)  # same init as the server's model
    loader = Batches(dataset.train, config.train.batch_size, seed=config.federation.seed,
                     shuffle=True)
    epochs = config.federation.rounds * config.train.epochs
    train(model, loader, make_optimizer(model, config.train), epochs)
    return evaluate(model, dataset.test)
