"""The README's first command: `hlf-actors demo` runs end to end on its embedded PostgreSQL and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_demo_plays_every_step_and_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HLF_")}
    done = subprocess.run(
        [sys.executable, "-m", "hlf_actors", "demo", "--dir", str(tmp_path / "demo")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in ("[start]", "[pause]", "[resume]", "[outage]", "[refuse]", "[requeue]"):
        assert step in out, f"step {step} missing from the demo's output:\n{out}"
    assert "PostgreSQL 18" in out  # the embedded server, not the machine's
    assert "'type': 'hlf_sync_failure'" in out
    assert "every step happened as described" in out
