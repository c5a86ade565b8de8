"""The console in the real `hlf-actors run` process: it answers beside /healthz, nothing secret reaches the log,
and SIGTERM still stops the process cleanly (uvicorn's own signal handlers are off; `run` owns the signals)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from hlf_actors.testing.http_server import free_port

from .support import World


def test_the_console_answers_in_the_real_process_and_sigterm_still_stops_it(world: World, tmp_path: Path) -> None:
    password = "acceptance-console-password"
    password_file = tmp_path / "console-password"
    password_file.write_text(password)
    mentor = world.add_mentor(name="Aksel Accept")
    port = free_port()
    service = world.start(
        HLF_HTTP_PORT=str(port), HLF_HTTP_HOST="127.0.0.1", HLF_CONSOLE_PASSWORD_FILE=str(password_file)
    )
    world.wait_state("in_sync", mentor)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client() as http:
        assert http.get(f"{base}/healthz").json()["role"] == "leader"
        login = http.get(f"{base}/login")
        token = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert token is not None
        assert http.post(f"{base}/login", data={"password": "guess-7f3a9", "csrf": token.group(1)}).status_code == 401
        assert http.post(f"{base}/login", data={"password": password, "csrf": token.group(1)}).status_code == 303
        story = http.get(f"{base}/mentors/{mentor.id}")
        assert story.status_code == 200 and "Aksel Accept" in story.text
    assert service.terminate() == 0
    log = service.log_text()
    assert password not in log and "guess-7f3a9" not in log
    assert "console: password signed in" in log and "failed password sign-in" in log
