"""Where a site computes: node config ``device`` -> torch device; training on a GPU."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.app import site_device
from shared.data import ArrayDataset
from shared.models import get_model
from shared.training import Batches, evaluate, resolve_device, train
from shared.wire import ARRAYS, CONFIG, SERVER_ROUND, from_record, to_record
from simulations.scenario import app_defaults

GPU = torch.cuda.is_available()


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" AUTO ") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but torch sees no CUDA"):
        resolve_device("cuda")


def test_auto_takes_a_gpu_torch_sees_and_indices_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"sees 2 CUDA device\(s\) \(0\.\.1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("raw", ["gpu", "cuda:", "cuda:x", "mps", "", "cpu:0"])
def test_unknown_device_names_are_refused_with_the_key(raw):
    with pytest.raises(ValueError, match=r"^site\.device: unknown device .*cpu, cuda, cuda:N "
                                         r"or auto$"):
        resolve_device(raw, key="site.device")


def test_simulated_sites_without_a_device_key_train_on_the_cpu():
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    assert site_device(context) == torch.device("cpu")
    context.node_config["device"] = "tpu"
    with pytest.raises(ValueError, match="node config device: unknown device 'tpu'"):
        site_device(context)


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, 40)).astype(np.float32),
                        rng.integers(0, 10, n).astype(np.int64))


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_training_and_evaluation_on_a_gpu_match_the_cpu():
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = get_model("mlp").to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = train(model, Batches(_data(), 16, seed=3, shuffle=True), opt, epochs=2)
        results[device] = (loss, evaluate(model, _data(seed=1)),
                           {k: v.cpu() for k, v in model.state_dict().items()})
    (cpu_loss, cpu_eval, cpu_state), (gpu_loss, gpu_eval, gpu_state) = results.values()
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert gpu_eval.accuracy == cpu_eval.accuracy
    for k, v in gpu_state.items():
        torch.testing.assert_close(v, cpu_state[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("private", [False, True])
def test_a_site_with_device_cuda_trains_there_and_replies_plain_cpu_arrays(tmp_path, private,
                                                                          flower_task):
    torch.manual_seed(0)
    model = get_model("mlp")
    states = {}
    for device in ("cpu", "cuda"):
        content = RecordDict({ARRAYS: to_record(model.state_dict()),
                              CONFIG: ConfigRecord({SERVER_ROUND: 1})})
        msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
        flat = {**app_defaults(), "output.dir": str(tmp_path / device), "data.samples": 300,
                "model.name": "mlp", "privacy.enabled": private, "federation.rounds": 3}
        node = {"partition-id": 0, "num-partitions": 3, "device": device}
        context = Context(run_id=5, node_id=1, node_config=node, state=RecordDict(),
                          run_config=flat)
        reply = client_app(msg, context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        states[device] = from_record(reply.content[ARRAYS])
    for k, v in states["cuda"].items():
        assert v.device.type == "cpu"
        if private:  # independent CSPRNG noise: only the shapes agree
            assert v.shape == states["cpu"][k].shape and torch.isfinite(v).all()
        else:
            torch.testing.assert_close(v, states["cpu"][k], rtol=1e-4, atol=1e-5)
