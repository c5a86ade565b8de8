"""What `hlf-actors run` loads before its first PATCH: firebase-admin (with google-auth, requests and cryptography)
only once FCM is configured, Starlette and uvicorn only once HLF_HTTP_PORT is on, so a service without them starts
sooner and smaller (issue 25)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("firebase_admin", "google.auth", "requests", "cryptography", "starlette", "uvicorn")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_service_imports_no_firebase_until_fcm_is_configured() -> None:
    assert _loaded_after("import hlf_actors.cli, hlf_actors.service") == set()
    assert _loaded_after("from hlf_actors.fcm import build_alert_sender\nbuild_alert_sender(None, None)") == set()


def test_a_configured_fcm_and_the_http_side_still_load_them() -> None:
    # The other half, so the test above cannot pass because the probe sees nothing at all.
    assert "firebase_admin" in _loaded_after(
        "from hlf_actors.fcm import check_firebase_internals\ncheck_firebase_internals()"
    )
    assert {"starlette", "uvicorn"} <= _loaded_after("from hlf_actors.web import build_app")
