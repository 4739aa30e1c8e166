"""Test-wide settings: no telemetry, no update checks, quiet Ray, few threads."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


import pytest  # noqa: E402


@pytest.fixture
def flower_task():
    """Flower 1.41 needs a task identity to build a Message outside its runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 5, 0
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
