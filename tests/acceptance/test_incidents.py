"""Tenant-wide incidents against the real `hlf-actors run`: a secret rotated by the tenant's IT, then by the operator.

What the operator's runbook promises (docs/operations.md, "Credential rotation"): write the new secret to the file;
the service heals within a minute, with no restart and no requeue, and nobody's phone rang about it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hlf_actors.testing.process import service_env

from .support import DEVICES, TOPIC, World

NEW_SECRET = "the-secret-it-rotated-at-3am-7f3a"


def _ops_alerts(world: World) -> list[str]:
    return [m.data["type"] for m in world.fcm.messages() if m.message.get("topic") == "hlf-ops"]


def _pushes_to_coordinators(world: World) -> int:
    return sum(1 for m in world.fcm.messages() if m.message.get("token") in DEVICES or m.message.get("topic") == TOPIC)


def test_a_revoked_secret_holds_every_change_and_the_new_secret_in_the_file_heals_it(
    world: World, tmp_path: Path
) -> None:
    secret_file = tmp_path / "dynamics-secret"
    secret_file.write_text(world.portal.client_secret + "\n")
    mentors = [world.add_mentor(name=f"Mentor {i}") for i in range(20)]
    world.start(HLF_DYNAMICS_CLIENT_SECRET="", HLF_DYNAMICS_CLIENT_SECRET_FILE=str(secret_file))
    world.wait_state("in_sync", *mentors)

    revoked_at = time.monotonic()
    world.portal.rotate_secret(NEW_SECRET)  # IT rotated it in Entra ID: the old secret and its tokens stop working
    world.portal.revoke_tokens()
    world.set_status("paused", *mentors)
    world.wait(lambda: _ops_alerts(world) == ["hlf_credential_failure"], "the one ops alert")
    alerted_s = time.monotonic() - revoked_at
    time.sleep(1.0)  # three times the sum of the backoff delays, many times over
    assert world.dead_letters() == []
    assert _pushes_to_coordinators(world) == 0
    rows = world.conn.execute(
        "SELECT attempts, last_error FROM sync_status WHERE mentor_id = ANY(%s)", ([m.id for m in mentors],)
    ).fetchall()
    assert {attempts for attempts, _ in rows} == {0}
    assert all("held: tenant-wide incident (credentials)" in error for _, error in rows)

    rotated_at = time.monotonic()
    secret_file.write_text(NEW_SECRET + "\n")
    world.wait(
        lambda: (
            all(world.portal.listed(m.record) is False for m in mentors)
            and all(world.state(m) == "in_sync" for m in mentors)
        ),
        "all 20 removed after the new secret was written",
        timeout=60,
    )
    healed_s = time.monotonic() - rotated_at
    world.wait(lambda: _ops_alerts(world) == ["hlf_credential_failure", "hlf_credential_restored"], "the all-clear")
    assert world.dead_letters() == []
    assert _pushes_to_coordinators(world) == 0
    assert len(world.processes) == 1 and world.processes[0].running  # no restart
    print(f"revocation → ops alert {alerted_s:.2f} s; new secret → all 20 in sync {healed_s:.2f} s")


def test_a_plain_http_dynamics_url_stops_start_up_with_one_line(world: World) -> None:
    env = service_env(world.db_url, world.portal.env(), HLF_DYNAMICS_URL="http://org.crm4.dynamics.com")
    done = subprocess.run(
        [sys.executable, "-m", "hlf_actors", "run"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "HLF_DYNAMICS_URL: must be https://" in lines[0]
