"""What the asyncdiag .pth file costs every Python start-up while ASYNCDIAG_ENABLED is unset.

site.py processes each .pth file of site-packages at start-up; ours adds one file read and one
environment lookup. This measures exactly that work (site.addpackage on our .pth, with the
variable unset), then a whole ``python -c pass`` start-up for scale, and prints the ratio.

    python benchmarks/startup_cost.py
"""

from __future__ import annotations

import os
import site
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def find_pth() -> Path:
    for directory in {sysconfig.get_paths()["purelib"], *site.getsitepackages()}:
        candidate = Path(directory) / "asyncdiag_autostart.pth"
        if candidate.is_file():
            return candidate
    raise SystemExit("asyncdiag_autostart.pth not found: install asyncdiag first")


def per_call(func: object, repeat: int = 7, number: int = 2000) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            func()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def main() -> None:
    os.environ.pop("ASYNCDIAG_ENABLED", None)
    pth = find_pth()
    known: set[str] = set()

    def process_pth() -> None:
        site.addpackage(str(pth.parent), pth.name, known)

    pth_cost = per_call(process_pth)
    env = {k: v for k, v in os.environ.items() if k != "ASYNCDIAG_ENABLED"}
    startups = []
    for _ in range(15):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        startups.append(time.perf_counter() - start)
    startup = statistics.median(startups)
    print(f"asyncdiag .pth, agent off: {pth_cost * 1e6:8.1f} µs per interpreter start")
    spread = statistics.stdev(startups)
    print(f"python -c pass           : {startup * 1e3:8.1f} ms (median of 15,"
          f" run-to-run stdev {spread * 1e3:.1f} ms)")
    print(f"added start-up cost      : {pth_cost / startup * 100:8.3f} %")


if __name__ == "__main__":
    main()
