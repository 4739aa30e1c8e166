"""benchmarks.dpsgd smoke run: every mode steps, ratios are over the non-private step."""

import warnings

import pytest
import torch

from benchmarks.dpsgd import noise_timings, run_one

warnings.filterwarnings("ignore", module="opacus")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmark pins torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore")
def test_run_one_reports_every_mode_and_ratio():
    res = run_one("cnn1d", threads=1, rounds=1, inner=1)
    assert res["nonprivate_variant"] == res["privfed_variant"] == "nchw"
    for mode in ("nonprivate", "opacus_hooks", "opacus_ghost", "privfed", "privfed_csprng"):
        assert res[f"{mode}_ms"] > 0
    for mode in ("opacus_hooks", "opacus_ghost", "privfed", "privfed_csprng"):
        # one round: the paired ratio is the ratio of the (single) figures
        assert res[f"{mode}_ratio"] == pytest.approx(res[f"{mode}_ms"] / res["nonprivate_ms"],
                                                     rel=2e-3, abs=2e-3)
    assert res["clock"] == "thread_cpu"


def test_noise_timings_keys():
    out = noise_timings(1001, repeat=3)
    assert out["params"] == 1001 and out["chacha20_gaussian_ms"] > 0 and out["torch_normal_ms"] > 0


def test_group_norm_on_nchw_baseline_computes_the_same_gradients():
    """The non-private 'channels_last+gn_nchw' variant only moves data: same loss and
    parameter gradients as the stock channels-last model."""
    from benchmarks.dpsgd import CPU, _batch, _group_norm_on_nchw, _model

    grads = []
    for relaid in (False, True):
        model, (x, y) = _model("cnn2d", True, CPU), _batch("cnn2d", True, CPU)
        model = model.double()
        x = x.double().contiguous(memory_format=torch.channels_last)
        if relaid:
            _group_norm_on_nchw(model)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cuda_device_without_a_gpu_is_refused_by_name(monkeypatch, capsys):
    from benchmarks.dpsgd import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--quick"])
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
