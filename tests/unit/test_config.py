"""``load_config``: the defaults of the contract, one clear line per bad value, and secrets that never show."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from hlf_actors.config import Secret, load_config
from hlf_actors.env_values import parse_duration
from hlf_actors.errors import ConfigError

SECRET = "hlf-TEST-SECRET-7f3a9c0e"


def test_defaults_match_the_contract() -> None:
    config = load_config({}, dotenv=None)

    assert config.database_url is None
    assert config.dynamics_url is None
    assert config.dynamics_token_url is None
    assert config.dynamics_client_id is None
    assert config.dynamics_client_secret is None
    assert config.dynamics_entity_set == "hlf_mentorlistings"
    assert config.dynamics_listed_field == "hlf_publiclisting"
    assert config.dynamics_key_field == "hlf_mentorlistingid"
    assert config.max_attempts == 5
    assert config.backoff_base_ms == 2000
    assert config.backoff_max_ms == 300_000
    assert config.portal_concurrency == 10
    assert config.fcm_credentials is None
    assert config.fcm_url is None  # None means Google's own endpoint
    assert config.ops_topic == "hlf-ops"
    assert config.timezone == "Europe/Oslo"
    assert config.zone.key == "Europe/Oslo"
    assert config.nightly_at == time(2, 0)
    assert config.reconcile_every_s == 900.0
    assert config.http_port == 8080
    assert config.public_listing_url is None
    assert config.public_listing_deadline_s == 1200.0
    assert config.public_listing_min_interval_s == 30.0
    assert config.public_listing_marker is None and config.public_listing_page_param is None
    assert config.app_schema == "public"


def test_scope_defaults_to_the_org_root_and_can_be_set() -> None:
    config = load_config({"HLF_DYNAMICS_URL": "https://org.crm4.dynamics.com/"}, dotenv=None)
    assert config.dynamics_url == "https://org.crm4.dynamics.com"
    assert config.scope == "https://org.crm4.dynamics.com/.default"

    config = load_config(
        {"HLF_DYNAMICS_URL": "https://org.crm4.dynamics.com", "HLF_DYNAMICS_SCOPE": "api://other/.default"},
        dotenv=None,
    )
    assert config.scope == "api://other/.default"


def test_fcm_credentials_fall_back_to_google_application_credentials() -> None:
    assert load_config({"GOOGLE_APPLICATION_CREDENTIALS": "/g.json"}, dotenv=None).fcm_credentials == "/g.json"
    both = {"GOOGLE_APPLICATION_CREDENTIALS": "/g.json", "HLF_FCM_CREDENTIALS": "/h.json"}
    assert load_config(both, dotenv=None).fcm_credentials == "/h.json"


def test_good_values_are_read() -> None:
    config = load_config(
        {
            "HLF_MAX_ATTEMPTS": "3",
            "HLF_BACKOFF_BASE_MS": "10",
            "HLF_BACKOFF_MAX_MS": "10",
            "HLF_PORTAL_CONCURRENCY": "1",
            "HLF_TIMEZONE": "UTC",
            "HLF_NIGHTLY_AT": "23:59",
            "HLF_RECONCILE_EVERY": "30s",
            "HLF_HTTP_PORT": "0",
            "HLF_PUBLIC_LISTING_DEADLINE": "1h",
            "HLF_PUBLIC_LISTING_MIN_INTERVAL": "2m",
            "HLF_PUBLIC_LISTING_MARKER": "<!-- hlf-listing-end -->",
            "HLF_PUBLIC_LISTING_PAGE_PARAM": "page",
        },
        dotenv=None,
    )
    assert config.max_attempts == 3
    assert (config.backoff_base_ms, config.backoff_max_ms) == (10, 10)
    assert config.portal_concurrency == 1
    assert config.timezone == "UTC"
    assert config.nightly_at == time(23, 59)
    assert config.reconcile_every_s == 30.0
    assert config.http_port == 0  # 0 turns the endpoint off: allowed
    assert config.public_listing_deadline_s == 3600.0
    assert config.public_listing_min_interval_s == 120.0
    assert config.public_listing_marker == "<!-- hlf-listing-end -->"
    assert config.public_listing_page_param == "page"


BAD_VALUES = [
    ("HLF_MAX_ATTEMPTS", {"HLF_MAX_ATTEMPTS": "abc"}),
    ("HLF_MAX_ATTEMPTS", {"HLF_MAX_ATTEMPTS": "0"}),
    ("HLF_BACKOFF_MAX_MS", {"HLF_BACKOFF_BASE_MS": "5000", "HLF_BACKOFF_MAX_MS": "4999"}),
    ("HLF_TIMEZONE", {"HLF_TIMEZONE": "Mars/Olympus"}),
    ("HLF_NIGHTLY_AT", {"HLF_NIGHTLY_AT": "25:00"}),
    ("HLF_RECONCILE_EVERY", {"HLF_RECONCILE_EVERY": "soon"}),
    ("HLF_DYNAMICS_URL", {"HLF_DYNAMICS_URL": "ftp://x"}),
    ("HLF_DYNAMICS_ENTITY_SET", {"HLF_DYNAMICS_ENTITY_SET": "hlf_mentor'listings"}),
    ("HLF_HTTP_PORT", {"HLF_HTTP_PORT": "70000"}),
    ("HLF_PORTAL_CONCURRENCY", {"HLF_PORTAL_CONCURRENCY": "0"}),
    ("HLF_PUBLIC_LISTING_MIN_INTERVAL", {"HLF_PUBLIC_LISTING_MIN_INTERVAL": "often"}),
    ("HLF_PUBLIC_LISTING_PAGE_PARAM", {"HLF_PUBLIC_LISTING_PAGE_PARAM": "page=2&x"}),
    ("HLF_APP_SCHEMA", {"HLF_APP_SCHEMA": "public; DROP TABLE mentors"}),
    ("HLF_APP_SCHEMA", {"HLF_APP_SCHEMA": "hlf"}),
]


@pytest.mark.parametrize(("variable", "env"), BAD_VALUES, ids=[f"{v}={e[v]}" for v, e in BAD_VALUES])
def test_a_bad_value_names_its_variable_in_one_line(variable: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**env, "HLF_DYNAMICS_CLIENT_SECRET": SECRET}, dotenv=None)
    message = str(caught.value)
    assert message.startswith(f"{variable}:"), message
    assert "\n" not in message
    assert len(message) > len(variable) + 2  # says what is wrong, not just the name
    assert SECRET not in message


def test_a_zero_duration_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^HLF_RECONCILE_EVERY:"):
        load_config({"HLF_RECONCILE_EVERY": "0s"}, dotenv=None)


# -- the client secret ------------------------------------------------------------------------------------------


def test_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"  {SECRET}\n")
    config = load_config({"HLF_DYNAMICS_CLIENT_SECRET_FILE": str(path)}, dotenv=None)
    assert config.dynamics_client_secret is not None
    assert config.dynamics_client_secret.reveal() == SECRET


def test_a_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "secret"
    with pytest.raises(ConfigError) as caught:
        load_config({"HLF_DYNAMICS_CLIENT_SECRET_FILE": str(path)}, dotenv=None)
    message = str(caught.value)
    assert message.startswith("HLF_DYNAMICS_CLIENT_SECRET_FILE:")
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_an_empty_secret_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"^HLF_DYNAMICS_CLIENT_SECRET_FILE:.*empty"):
        load_config({"HLF_DYNAMICS_CLIENT_SECRET_FILE": str(path)}, dotenv=None)


def test_the_secret_never_shows_in_the_config(tmp_path: Path) -> None:
    from_env = load_config(
        {"HLF_DYNAMICS_URL": "https://org.crm4.dynamics.com", "HLF_DYNAMICS_CLIENT_SECRET": SECRET}, dotenv=None
    )
    path = tmp_path / "secret"
    path.write_text(SECRET)
    from_file = load_config({"HLF_DYNAMICS_CLIENT_SECRET_FILE": str(path)}, dotenv=None)
    for config in (from_env, from_file):
        assert config.dynamics_client_secret is not None
        assert config.dynamics_client_secret.reveal() == SECRET  # the value is there...
        for shown in (repr(config), str(config), f"{config}", repr(config.dynamics_client_secret)):
            assert SECRET not in shown  # ...but never printed
            assert "********" in shown


def test_secret_equality_does_not_need_printing() -> None:
    assert Secret(SECRET) == Secret(SECRET)
    assert Secret(SECRET) != Secret("other")
    assert not Secret("")


def test_a_malformed_dotenv_line_does_not_echo_the_secret(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# settings\nHLF_DYNAMICS_CLIENT_SECRET {SECRET}\n")
    with pytest.raises(ConfigError) as caught:
        load_config({}, dotenv=dotenv)
    message = str(caught.value)
    assert f"{dotenv}:2:" in message
    assert SECRET not in message


def test_secret_file_errors_do_not_echo_a_secret_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_config({"HLF_DYNAMICS_CLIENT_SECRET": SECRET, "HLF_DYNAMICS_CLIENT_SECRET_FILE": str(path)}, dotenv=None)
    assert SECRET not in str(caught.value)


# -- .env -------------------------------------------------------------------------------------------------------


def test_dotenv_supplies_values_and_the_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment\n"
        "\n"
        "export HLF_OPS_TOPIC=from-dotenv\n"
        'HLF_MAX_ATTEMPTS="7"\n'
        "HLF_TIMEZONE='UTC'\n"
        "HLF_HTTP_PORT=9000\n"
        f"HLF_DYNAMICS_CLIENT_SECRET={SECRET}\n"
    )
    config = load_config({"HLF_HTTP_PORT": "9100"}, dotenv=dotenv)
    assert config.ops_topic == "from-dotenv"
    assert config.max_attempts == 7
    assert config.timezone == "UTC"
    assert config.http_port == 9100  # the environment wins over .env
    assert config.dynamics_client_secret is not None
    assert config.dynamics_client_secret.reveal() == SECRET
    assert SECRET not in repr(config)


def test_a_missing_dotenv_is_no_error(tmp_path: Path) -> None:
    config = load_config({"HLF_MAX_ATTEMPTS": "2"}, dotenv=tmp_path / "absent.env")
    assert config.max_attempts == 2
    assert config.ops_topic == "hlf-ops"


def test_a_bad_value_from_dotenv_names_its_variable(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("HLF_MAX_ATTEMPTS=abc\n")
    with pytest.raises(ConfigError, match=r"^HLF_MAX_ATTEMPTS:"):
        load_config({}, dotenv=dotenv)
    # ...and the environment can override the bad line.
    assert load_config({"HLF_MAX_ATTEMPTS": "4"}, dotenv=dotenv).max_attempts == 4


# -- parse_duration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("2d", 172_800.0),
        ("250ms", 0.25),
        ("45", 45.0),
        ("1.5h", 5400.0),
        (" 10 m ", 600.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "", "-5s", "5 minutes", "m", "1w", "1h30m", "1,5h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# -- alert channels (issue 21) -----------------------------------------------------------------------------------

WEBHOOK = "https://prod.westeurope.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=" + SECRET


def test_alerts_are_on_by_default_and_run_needs_a_channel() -> None:
    config = load_config({}, dotenv=None)
    assert config.alerts_off is False and config.ops_webhook_url is None and config.ops_email_to == ()
    with pytest.raises(ConfigError) as refused:
        config.require_alerts()
    assert str(refused.value).startswith("HLF_ALERTS: no alert channel configured")
    assert "\n" not in str(refused.value)
    for enough in ({"HLF_ALERTS": "off"}, {"HLF_FCM_CREDENTIALS": "/sa.json"}, {"HLF_OPS_WEBHOOK_URL": WEBHOOK}):
        load_config(enough, dotenv=None).require_alerts()


def test_the_webhook_url_is_a_secret_and_must_be_https() -> None:
    config = load_config({"HLF_OPS_WEBHOOK_URL": WEBHOOK}, dotenv=None)
    assert config.ops_webhook_url is not None and config.ops_webhook_url.reveal() == WEBHOOK
    assert SECRET not in repr(config)
    assert load_config({"HLF_OPS_WEBHOOK_URL": "http://127.0.0.1:8081/hook"}, dotenv=None).ops_webhook_url
    for bad in ("http://hooks.example.org/x?sig=" + SECRET, "not a url " + SECRET):
        with pytest.raises(ConfigError) as refused:
            load_config({"HLF_OPS_WEBHOOK_URL": bad}, dotenv=None)
        assert str(refused.value).startswith("HLF_OPS_WEBHOOK_URL:") and SECRET not in str(refused.value)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"HLF_ALERTS": "maybe"}, "HLF_ALERTS"),
        ({"HLF_OPS_EMAIL_TO": "ops@hlf.example"}, "HLF_OPS_EMAIL_TO"),
        (
            {"HLF_OPS_EMAIL_TO": "not-an-address", "HLF_OPS_EMAIL_FROM": "a@b.c", "HLF_OPS_EMAIL_SMTP_HOST": "smtp"},
            "HLF_OPS_EMAIL_TO",
        ),
        ({"HLF_OPS_EMAIL_SMTP_PORT": "0"}, "HLF_OPS_EMAIL_SMTP_PORT"),
    ],
)
def test_a_bad_alert_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env, dotenv=None)
    assert str(refused.value).startswith(variable) and "\n" not in str(refused.value)


def test_email_settings_are_read(tmp_path: Path) -> None:
    password = tmp_path / "smtp-password"
    password.write_text(SECRET + "\n")
    config = load_config(
        {
            "HLF_OPS_EMAIL_TO": "ops@hlf.example, oncall@hlf.example",
            "HLF_OPS_EMAIL_FROM": "hlf-actors@hlf.example",
            "HLF_OPS_EMAIL_SMTP_HOST": "smtp.office365.com",
            "HLF_OPS_EMAIL_SMTP_USER": "hlf-actors@hlf.example",
            "HLF_OPS_EMAIL_SMTP_PASSWORD_FILE": str(password),
        },
        dotenv=None,
    )
    assert config.ops_email_to == ("ops@hlf.example", "oncall@hlf.example")
    assert config.ops_email_smtp_port == 587
    assert config.ops_email_smtp_password is not None and config.ops_email_smtp_password.reveal() == SECRET
    assert SECRET not in repr(config)
