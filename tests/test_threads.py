"""fastspec's process-wide threading default: importing fastspec makes OpenMP threads wait passively (torch's and
numba's pools would otherwise spin against a busy neighbour, bench/results/busy-train-*.md) unless the user set
OMP_WAIT_POLICY. (The `fastspec` command is inside the package, so its process imports fastspec first.)"""
import os
import subprocess
import sys

PROBE = "import fastspec, os, torch; print(os.environ['OMP_WAIT_POLICY'])"


def _run(env_policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_passive_by_default_and_the_users_setting_wins():
    assert _run(None).strip() == "PASSIVE"
    assert _run("ACTIVE").strip() == "ACTIVE"
