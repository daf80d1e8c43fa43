"""CpuMeter, the per-process CPU accounting of `mmdist bench ingest`: a child that burns CPU and
exits between two polls is still counted, under its kind when a poll saw it, else as reaped."""

import subprocess
import sys

from mmdist.bench.cpu_meter import CpuMeter

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"


def test_a_child_that_exits_before_any_poll_is_counted_as_reaped():
    with CpuMeter(interval=60) as cpu:
        subprocess.run([sys.executable, "-c", BURN], check=True)
    used = cpu.by_kind()
    assert used.get("reaped children", 0) >= 0.35, used


def test_a_polled_child_keeps_its_kind_and_its_cpu_after_the_last_poll():
    with CpuMeter(interval=0.05) as cpu:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)\n" + BURN])
        child.wait()
    used = cpu.by_kind()
    assert "reaped children" not in used
    kind = max((k for k in used if k != "driver"), key=used.get)
    assert used[kind] >= 0.35, used
