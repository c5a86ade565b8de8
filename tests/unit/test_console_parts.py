"""The console's pure parts: the chart's geometry, the sign-in limiter, the password check, its configuration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from hlf_actors.config import Secret, load_config
from hlf_actors.console_auth import LoginLimiter, PasswordCheck, csrf_token, csrf_valid, is_loopback_url
from hlf_actors.console_chart import chart
from hlf_actors.errors import ConfigError

NOW = datetime(2026, 3, 1, 12, 40, tzinfo=UTC)
HOUR = NOW.replace(minute=0)


def test_the_chart_has_24_hours_ending_with_the_current_one_and_scales_to_the_busiest() -> None:
    rows = [(HOUR, 8, 2, 45_000), (HOUR - timedelta(hours=5), 3, 0, 15_000), (HOUR - timedelta(hours=30), 99, 99, 1)]
    c = chart(rows, NOW, ZoneInfo("Europe/Oslo"))
    assert len(c.hours) == 24 and c.hours[-1].label == "13:00" and c.hours[0].label == "14:00"  # UTC+1 in March
    assert c.peak == 10  # the busiest hour in the window: 8 + 2; the row 30 h ago is outside
    last = c.hours[-1]
    assert (last.synced, last.failed) == (8, 2)
    assert last.failed_y == pytest.approx(c.height - (c.height - 10))  # the full bar reaches the top margin
    assert last.synced_h == pytest.approx(4 * last.failed_h)
    assert c.exposure_peak_s == 45.0 and len(c.exposure_points.split()) == 2
    quiet = chart([], NOW)
    assert quiet.peak == 1 and quiet.exposure_points == "" and all(h.synced_h == 0 for h in quiet.hours)


def test_the_limiter_allows_five_failures_a_minute_per_client_and_thirty_overall() -> None:
    limiter = LoginLimiter(failures=5, window_s=60, overall=30)
    for _ in range(5):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failed("10.0.0.1")
    wait = limiter.retry_after("10.0.0.1")
    assert wait is not None and 59 < wait <= 60
    assert limiter.retry_after("10.0.0.2") is None  # another client is not punished for the first one
    for i in range(25):
        limiter.failed(f"10.0.1.{i}")
    assert limiter.retry_after("10.0.0.3") is not None  # a spray from many addresses hits the overall cap


def test_the_password_check_keeps_no_password_and_compares_whole_values() -> None:
    check = PasswordCheck(Secret("s3cret pass"))
    assert check.matches("s3cret pass")
    assert not check.matches("s3cret pas") and not check.matches("s3cret pass ") and not check.matches("")
    assert "s3cret" not in repr(vars(check))


def test_csrf_tokens_belong_to_their_session() -> None:
    session: dict[str, object] = {}
    token = csrf_token(session)
    assert csrf_token(session) == token and csrf_valid(session, token)
    assert not csrf_valid(session, token[:-1]) and not csrf_valid(session, None) and not csrf_valid({}, token)


def test_loopback_urls() -> None:
    assert is_loopback_url("http://127.0.0.1:8080/") and is_loopback_url("http://localhost")
    assert not is_loopback_url("https://ops.hlf.example")


def test_console_configuration(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("client-secret\n")
    assert not load_config({}, dotenv=None).console_enabled
    oidc = {
        "HLF_CONSOLE_OIDC_ISSUER": "https://login.microsoftonline.com/tenant/v2.0/",
        "HLF_CONSOLE_OIDC_CLIENT_ID": "app",
        "HLF_CONSOLE_OIDC_CLIENT_SECRET_FILE": str(secret),
        "HLF_CONSOLE_ALLOWED_GROUP": "group-id",
    }
    config = load_config(oidc, dotenv=None)
    assert config.console_enabled and config.console_oidc_issuer == "https://login.microsoftonline.com/tenant/v2.0"
    assert config.console_oidc_client_secret == Secret("client-secret") and "client-secret" not in repr(config)
    for missing in oidc:
        with pytest.raises(ConfigError, match=f"^{missing}: required"):
            load_config({k: v for k, v in oidc.items() if k != missing}, dotenv=None)
    with pytest.raises(ConfigError, match=r"^HLF_CONSOLE_OIDC_ISSUER: must be https://"):
        load_config({**oidc, "HLF_CONSOLE_OIDC_ISSUER": "http://idp.example/v2.0"}, dotenv=None)
    with pytest.raises(ConfigError, match=r"^HLF_CONSOLE_PASSWORD_FILE: cannot read"):
        load_config({"HLF_CONSOLE_PASSWORD_FILE": str(tmp_path / "absent")}, dotenv=None)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"^HLF_CONSOLE_PASSWORD_FILE: .* is empty"):
        load_config({"HLF_CONSOLE_PASSWORD_FILE": str(tmp_path / "empty")}, dotenv=None)
