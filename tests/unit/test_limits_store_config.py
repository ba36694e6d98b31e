"""The shared limit store's sans-IO side: its URL, its flags, its password, the scripts'
answers and key names, and the default install that never imports the redis client."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relay import cli
from relay.config import Config, ConfigError, StoreAddress, parse_limits_store
from relay.http.sharedlimits import (
    ACQUIRE,
    PREFIX,
    RELEASE,
    RENEW,
    Answer,
    bucket_key,
    debited_key,
    leases_key,
    marker_key,
    read_answer,
)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("redis://cache:6380/2", StoreAddress("cache", 6380, 2)),
        ("redis://cache", StoreAddress("cache", 6379, 0)),
        ("redis://cache/", StoreAddress("cache", 6379, 0)),
        ("rediss://cache:6380", StoreAddress("cache", 6380, 0, tls=True)),
        ("REDIS://10.0.0.1:7000/15", StoreAddress("10.0.0.1", 7000, 15)),
        ("redis://relay@cache:6379/1", StoreAddress("cache", 6379, 1, username="relay")),
        ("redis://[::1]:6379/0", StoreAddress("::1", 6379, 0)),
        ("redis://[::1]", StoreAddress("::1", 6379, 0)),
    ],
)
def test_store_urls(text, address):
    """redis:// and rediss:// URLs give host, port (6379), database (0), TLS and user."""
    assert parse_limits_store(text) == address
    assert parse_limits_store(str(address)) == address


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cache:6379", "expected redis://"),
        ("http://cache:6379", "expected redis://"),
        ("redis://:secret@cache:6379", "must not hold a password"),
        ("redis://user:secret@cache", "must not hold a password"),
        ("redis://cache:6379/zero", "database must be a number"),
        ("redis://cache:99999", "port out of range"),
        ("redis://:6379", "missing host"),
        ("redis://cache?password=x", "takes no query"),
    ],
)
def test_bad_store_urls_name_the_flag(text, says):
    """Every refusal names --limits-store; a password in the URL is refused, not used."""
    with pytest.raises(ConfigError) as caught:
        parse_limits_store(text)
    assert caught.value.flag == "--limits-store" and says in caught.value.message
    assert "secret" not in str(caught.value)


def test_store_settings_are_checked_where_they_are_defined():
    """The failure mode is open or closed; a lease must outlast three timeouts and 1 s."""
    assert Config.default("limits_store_failure") == "open"
    assert Config.default("limits_store_timeout") <= 0.1
    with pytest.raises(ConfigError, match="open or closed"):
        Config(limits_store_failure="ajar")
    with pytest.raises(ConfigError, match="--limits-store-lease"):
        Config(limits_store_lease=0.5)
    with pytest.raises(ConfigError, match="--limits-store-lease"):
        Config(limits_store_timeout=1.0, limits_store_lease=2.0)
    assert "secret" not in repr(Config(limits_store_password="secret"))


def test_the_password_comes_from_a_file_or_the_environment_never_a_flag(tmp_path, monkeypatch):
    """--limits-store-password-file (newline stripped) wins over the environment; no flag
    takes the password itself; the printed configuration masks it."""
    parser = cli.build_parser()
    assert not any("password" in o and "file" not in o for o in parser._option_string_actions)
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    monkeypatch.setenv(cli.STORE_PASSWORD_ENV, "from-env")
    base = ["--upstream", "u:1", "--limits-store", "redis://cache/1"]
    config = cli.config_from_args(parser.parse_args(base))
    assert config.limits_store_password == "from-env"
    args = parser.parse_args([*base, "--limits-store-password-file", str(secret)])
    config = cli.config_from_args(args)
    assert config.limits_store_password == "from-file"
    described = cli.describe_config(config)
    assert "from-file" not in described and "limits store password: set" in described
    assert "--limits-store redis://cache:6379/1" in described


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--limits-store-password-file", "/nonexistent"], "needs --limits-store"),
        (
            ["--limits-store", "redis://c", "--limits-store-password-file", "/nonexistent"],
            "cannot read /nonexistent",
        ),
        (["--limits-store", "redis://c", "--limits-store-failure", "maybe"], "invalid choice"),
        (["--limits-store", "redis://c", "--limits-store-timeout", "0"], "positive duration"),
    ],
)
def test_store_flag_errors_are_one_line_and_exit_2(argv, says, capsys):
    """Each mistake with the store's flags is one line naming the flag, exit 2."""
    try:
        code = cli.main(["--upstream", "u:1", *argv])
    except SystemExit as exc:  # argparse's own errors (a choice) exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_the_default_install_never_imports_the_redis_client():
    """Starting the CLI, building a server's state and admitting a request, without
    --limits-store, imports nothing of redis (it is an optional extra)."""
    code = (
        "import sys\n"
        "from relay import cli\n"
        "from relay.config import Config\n"
        "from relay.core.state import ServerState\n"
        "from relay.ops import service, workers\n"
        "state = ServerState(Config(key_rpm=5, max_inflight=2))\n"
        "state.admission.admit(None, '10.0.0.1')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'hiredis')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_answers_of_the_acquire_script():
    """[0, 0] admits; 1-3 name the key limit with whole seconds (at least 1); 4 is the
    upstream's slots; anything else is an error."""
    assert read_answer([0, 0]) == Answer("", 0)
    assert read_answer([1, 1000]) == Answer("concurrent", 1)
    assert read_answer([2, 5001]) == Answer("rpm", 6)
    assert read_answer([3, 1]) == Answer("tpm", 1)
    assert read_answer([4, 0]) == Answer("upstream", 1)
    for bad in ([9, 0], [0], "OK", None):
        with pytest.raises(ValueError):
            read_answer(bad)


def test_every_key_shares_one_hash_slot():
    """All keys carry the {relay} hash tag (one slot on Redis Cluster, so each script's
    keys are on one shard), whatever the key's name holds."""
    for name in (
        leases_key("key:team{x}"),
        bucket_key("addr:10.0.0.1"),
        leases_key("up:http://u:1"),
        marker_key("1-ab"),
        debited_key("1-ab:7"),
    ):
        assert name.startswith(PREFIX) and name.index("{") == name.index("{relay}")
    for script in (ACQUIRE, RELEASE, RENEW):
        # The store's clock, not the relays': relays whose clocks differ agree.
        assert "redis.call('TIME')" in script
