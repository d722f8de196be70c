"""benchmarks/device_check.sh runs end to end in its CPU test mode (--tiny)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_runs_on_the_cpu_and_appends_its_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    env = {
        **os.environ,
        "DEVICE_CHECK_RESULTS": str(results),
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, nothing lost
    assert "### device_check.sh on cpu" in text
    for config in ("tetrominoes", "multidsprites", "clevr6"):  # one batch size in --tiny
        for precision in ("32", "bf16"):
            line = rf"batch=2 config={config} precision={precision} compile=0 img_per_s=[\d.]+"
            assert re.search(line + r" peak_mb=\d+", text), (config, precision)
    for precision in ("32", "bf16"):  # the compiled encoder (ResNet-8 in --tiny)
        line = rf"batch=2 config=tetrominoes/resnet8 precision={precision} compile=1 img_per_s="
        assert re.search(line, text), precision
    for config in ("multidsprites", "clevr6"):  # candidates scored on the coarse grid
        for precision in ("32", "bf16"):
            line = rf"batch=2 config={config} precision={precision} compile=0 select_downscale=2 "
            assert re.search(line + r"img_per_s=[\d.]+", text), (config, precision)
    for config in ("tetrominoes", "tetrominoes_fast"):
        section = text.split(f"convergence {config} ")[1]
        # step 4: seconds, ARI-FG, ARI, mACC, mIoU, sprites in use
        assert re.search(r"= 4,[\d.]+,[\d.]+,-?[\d.]+,[\d.]+,[\d.]+,\d+", section), section
    assert not list(tmp_path.glob("*.partial"))
