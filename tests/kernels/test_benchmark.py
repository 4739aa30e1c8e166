"""The benchmark's contract: last stdout line is one JSON object with the issue's keys."""

import json
import subprocess
import sys

KEYS = {"keystream_vs_openssl", "quantize_vs_flower", "mask_vs_flower", "accumulate_vs_memcpy",
        "bytes_per_param"}


def test_quick_benchmark_prints_the_figures_as_a_final_json_line():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--json", "--quick"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) >= KEYS
    assert figures["bytes_per_param"] == 4 and figures["threads"] == 1
    assert all(figures[k] > 0 for k in KEYS)
