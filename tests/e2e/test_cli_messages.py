"""Start-up messages name what the user wrote: the flag, its file, or the variable."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trustme

from relay import cli
from relay.cliparse import join_negative_values
from relay.config import Config

LIMIT = 20


def relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """relay as a subprocess that is expected to stop at start-up."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=LIMIT,
    )


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A certificate, its key, another key, their combination and a non-PEM file."""
    root = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    other = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    other.private_key_pem.write_to_path(str(root / "other-key.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(root / "both.pem"))
    (root / "notes.txt").write_text("not a PEM file\n")
    return {p.name: str(p) for p in root.iterdir()}


BASE = ("--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0")


def test_a_missing_tls_key_names_the_key_flag_and_path(pem):
    """A --tls-key that does not exist is reported against --tls-key and its path, not the cert."""
    missing = str(Path(pem["key.pem"]).with_name("absent-key.pem"))
    err = one_error(relay(*BASE, "--tls-cert", pem["server.pem"], "--tls-key", missing))
    assert "argument --tls-key:" in err and "absent-key.pem" in err
    assert "No such file or directory" in err and "server.pem" not in err


def test_an_unreadable_tls_key_names_the_key_flag(pem, tmp_path):
    """A --tls-key that is a directory (unreadable) names --tls-key and the path."""
    err = one_error(relay(*BASE, "--tls-cert", pem["server.pem"], "--tls-key", str(tmp_path)))
    assert f"argument --tls-key: cannot read {tmp_path}" in err


def test_a_certificate_without_a_key_asks_for_tls_key(pem):
    """A --tls-cert holding no private key, with no --tls-key, says that --tls-key is missing."""
    err = one_error(relay(*BASE, "--tls-cert", pem["server.pem"]))
    assert "argument --tls-key:" in err and "server.pem holds no PEM private key" in err


def test_a_key_that_is_not_pem_names_the_key(pem):
    """A --tls-key file with no PEM key in it names --tls-key and that file."""
    err = one_error(relay(*BASE, "--tls-cert", pem["server.pem"], "--tls-key", pem["notes.txt"]))
    assert "argument --tls-key:" in err and "notes.txt holds no PEM private key" in err


def test_a_mismatched_pair_names_both_files(pem):
    """A key that does not belong to the certificate names the key flag and both files."""
    err = one_error(
        relay(*BASE, "--tls-cert", pem["server.pem"], "--tls-key", pem["other-key.pem"])
    )
    assert "argument --tls-key:" in err
    assert "other-key.pem" in err and "server.pem" in err and "does not match" in err


def test_a_missing_certificate_names_the_certificate(pem):
    """A --tls-cert that does not exist is reported against --tls-cert and its path."""
    missing = str(Path(pem["server.pem"]).with_name("absent.pem"))
    err = one_error(relay(*BASE, "--tls-cert", missing, "--tls-key", pem["key.pem"]))
    assert f"argument --tls-cert: cannot read {missing}: No such file or directory" in err


def test_a_non_pem_certificate_names_the_certificate(pem):
    """A --tls-cert that holds no certificate names --tls-cert, even with a good key."""
    err = one_error(relay(*BASE, "--tls-cert", pem["notes.txt"], "--tls-key", pem["key.pem"]))
    assert "argument --tls-cert:" in err and "notes.txt holds no PEM certificate" in err


def test_a_combined_pem_file_is_enough(pem):
    """A --tls-cert holding both the chain and the key passes the start-up checks."""
    result = relay(*BASE, "--tls-cert", pem["both.pem"], "--api-key-file", "absent-keys.txt")
    # The TLS files passed; the next check (the key file) is what stops it.
    assert "argument --api-key-file" in one_error(result)


def test_a_busy_admin_port_names_admin_listen():
    """An --admin-listen port in use is reported against --admin-listen and its address."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = relay(*BASE, "--admin-listen", f"127.0.0.1:{port}")
    err = one_error(result)
    assert f"argument --admin-listen: cannot listen on 127.0.0.1:{port}" in err
    assert "--listen:" not in err


@pytest.mark.parametrize("flag", ["--api-key-file", "--model-map-file", "--upstream-api-key-file"])
def test_an_unreadable_file_is_named(flag, tmp_path):
    """A file flag that cannot be read names the flag and the file."""
    missing = tmp_path / "nope.txt"
    err = one_error(relay(*BASE, flag, str(missing)))
    assert f"argument {flag}: cannot read {missing}: No such file or directory" in err


def test_an_invalid_environment_value_names_the_variable():
    """A bad RELAY_* value names the variable and its value, not a flag never typed."""
    err = one_error(relay(*BASE, env={"RELAY_MAX_BODY_BYTES": "lots"}))
    assert err.startswith("relay: error: RELAY_MAX_BODY_BYTES=lots: expected a size")
    err = one_error(relay(*BASE, env={"RELAY_WORKERS": "many"}))
    assert "RELAY_WORKERS=many:" in err
    err = one_error(relay(*BASE, env={"RELAY_CLIENT_HEAD_TIMEOUT": "0"}))
    assert "RELAY_CLIENT_HEAD_TIMEOUT=0: must be a positive duration" in err


def test_a_flag_that_overrides_a_bad_variable_is_the_one_named():
    """When the command line sets the flag, its error names the flag, not the variable."""
    result = relay(*BASE, "--max-body-bytes", "huge", env={"RELAY_MAX_BODY_BYTES": "1m"})
    assert "argument --max-body-bytes:" in one_error(result)
    fine = relay(
        *BASE, "--max-body-bytes", "2m", "--print-config", env={"RELAY_MAX_BODY_BYTES": "x"}
    )
    assert fine.returncode == 0 and "--max-body-bytes 2m" in fine.stdout


def test_an_unknown_relay_variable_is_warned_about_with_a_suggestion():
    """A typo such as RELAY_LISTN gets one warning line naming it and the likely variable."""
    env = {"RELAY_LISTN": ":5000", "RELAY_UPSTREAM": "127.0.0.1:1", "RELAY_ZZZZZZZZZ": "1"}
    result = relay("--print-config", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        "relay: warning: ignoring unknown environment variable RELAY_LISTN "
        "(did you mean RELAY_LISTEN?)",
        "relay: warning: ignoring unknown environment variable RELAY_ZZZZZZZZZ",
    ]


def test_known_variables_draw_no_warning():
    """Every flag's variable and the key variables are known."""
    parser = cli.build_parser()
    env = {name: "x" for name, _, _ in cli._env_flags(parser)}
    env.update(dict.fromkeys(cli.OTHER_ENVS, "x"))
    assert cli.environment_warnings(parser, env) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--client-head-timeout", "-5s"], "argument --client-head-timeout: must be a positive"),
        (
            ["--upstream-idle-timeout", "-.5"],
            "argument --upstream-idle-timeout: must be a positive",
        ),
        (["--max-body-bytes", "-1k"], "argument --max-body-bytes: must be a positive size"),
        (["--max-connections", "-3"], "argument --max-connections: must not be negative"),
        (["--workers", "-2"], "argument --workers: must not be negative"),
    ],
)
def test_a_negative_value_reaches_its_validator(argv, message):
    """A negative-looking value is the flag's value, so the validator says what is wrong."""
    assert message in one_error(relay(*BASE, *argv))


def test_join_negative_values():
    """Only a negative-looking word right after a long option without '=' is joined to it."""
    assert join_negative_values(["--a", "-5s", "-x", "-5"]) == ["--a=-5s", "-x", "-5"]
    assert join_negative_values(["--a=1", "-5s"]) == ["--a=1", "-5s"]
    assert join_negative_values(["--", "--a", "-5"]) == ["--", "--a", "-5"]
    assert join_negative_values(["--a", "--b"]) == ["--a", "--b"]


def test_print_config_is_flags_that_parse_back_to_the_same_config():
    """--print-config prints one flag a line as a user types them, and they parse back."""
    argv = [
        "--upstream", "gpu1:30000", "--upstream", "gpu2:30000",
        "--route", "big=gpu2:30000", "--strict-models", "--model-map", "a=b c",
        "--model", "m", "--admin-listen", "127.0.0.1:4001", "--client-head-timeout", "500ms",
        "--max-body-bytes", "1m", "--workers", "2", "--health-check", "/health",
    ]  # fmt: skip
    result = relay(*argv, "--print-config", env={"RELAY_API_KEYS": "sk-very-secret"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[:3] == ["--listen :4000", "--upstream gpu1:30000", "--upstream gpu2:30000"]
    for line in ("--client-head-timeout 0.5s", "--max-body-bytes 1m", "--model-map 'a=b c'"):
        assert line in lines
    assert "# RELAY_API_KEYS: 1 key (masked)" in lines
    assert "sk-very-secret" not in out and "None" not in out
    flag_lines = [line for line in lines if not line.startswith("#")]
    assert all(line.startswith("--") and "_" not in line for line in flag_lines), out
    flags = [word for line in flag_lines for word in shlex.split(line)]
    parsed = cli.config_from_args(cli.build_parser().parse_args(flags))
    expected = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert parsed == expected


def test_print_config_shows_every_config_field():
    """Every Config field with a flag appears in --print-config (a new limit cannot be missed)."""
    import dataclasses

    out = cli.describe_config(Config())
    for spec in dataclasses.fields(Config):
        if "flag" in spec.metadata:
            assert spec.metadata["flag"] + " " in out


def test_an_unresolvable_upstream_host_is_warned_about():
    """An --upstream host name that does not resolve gets a warning; relay starts anyway."""
    failed = cli.unresolved_hosts(["relay-test.invalid", "127.0.0.1", "localhost"])
    assert [host for host, _ in failed] == ["relay-test.invalid"]


def test_a_hanging_resolver_does_not_hold_up_the_start():
    """Lookups that never answer are reported after the timeout, all waited for together."""
    release = threading.Event()

    def hang(host: str) -> None:
        release.wait(LIMIT)

    hosts = [f"{name}.example" for name in "abcde"]
    started = time.monotonic()
    try:
        failed = cli.unresolved_hosts(hosts, timeout=0.4, resolve=hang)
    finally:
        release.set()
    # Together: 0.4 s; one after another: 2 s (five timeouts); a hang: 10 s.
    assert time.monotonic() - started < 1.4
    assert failed == [(host, "no answer within 0.4s") for host in hosts]


def bad_configurations(pem: dict[str, str], root: Path) -> dict[str, list[str]]:
    """Configurations start-up refuses, one for each kind of check it runs."""
    (root / "typo.keys").write_text("alice sk-alice-1 concurent=16\n")
    (root / "twice.keys").write_text("alice sk-alice-1\nalice sk-alice-2\n")
    (root / "map.json").write_text('["not", "a", "map"]')
    return {
        "missing key file": ["--api-key-file", str(root / "absent.keys")],
        "limit typo": ["--api-key-file", str(root / "typo.keys")],
        "duplicate name": ["--api-key-file", str(root / "twice.keys")],
        "missing certificate": ["--tls-cert", str(root / "absent.pem")],
        "certificate not PEM": ["--tls-cert", pem["notes.txt"], "--tls-key", pem["key.pem"]],
        "mismatched key": ["--tls-cert", pem["server.pem"], "--tls-key", pem["other-key.pem"]],
        "bad model map": ["--model-map-file", str(root / "map.json")],
        "missing upstream CA": ["--upstream", "https://127.0.0.1:1", "--upstream-ca", "/absent"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing key file",
        "limit typo",
        "duplicate name",
        "missing certificate",
        "certificate not PEM",
        "mismatched key",
        "bad model map",
        "missing upstream CA",
    ],
)
def test_check_and_print_config_refuse_what_start_up_refuses(pem, tmp_path, case):
    """--check and --print-config exit 2 with the very line start-up exits with."""
    argv = [*BASE, *bad_configurations(pem, tmp_path)[case]]
    started = one_error(relay(*argv))
    checked = relay(*argv, "--check")
    assert one_error(checked) == started and checked.stdout == ""
    printed = relay(*argv, "--print-config")
    assert one_error(printed) == started and printed.stdout == ""


def test_check_says_ok_in_one_line_and_binds_nothing(pem, tmp_path):
    """A good configuration: --check prints one OK line and exits 0, even with its ports
    taken (it binds nothing, so a relay running on them can be checked)."""
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice-1 concurrent=16\nbob sk-bob-1 rpm=60\n")
    with socket.socket() as listen, socket.socket() as admin:
        for sock in (listen, admin):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        result = relay(
            "--upstream", "127.0.0.1:1",
            "--listen", f"127.0.0.1:{listen.getsockname()[1]}",
            "--admin-listen", f"127.0.0.1:{admin.getsockname()[1]}",
            "--tls-cert", pem["server.pem"], "--tls-key", pem["key.pem"],
            "--api-key-file", str(keys), "--check",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "relay: configuration OK\n" and result.stderr == ""


def start_up_lines(*args: str, until: str = "relay listening on") -> list[str]:
    """What a relay logs up to and including the first line holding ``until`` (then it
    is stopped); the lines of a relay that stopped on its own fail the test."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "--upstream", "127.0.0.1:1", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=clean,
    )
    assert process.stderr is not None
    lines: list[str] = []
    timer = threading.Timer(LIMIT, process.kill)  # bounds the reads below
    timer.start()
    try:
        while not lines or until not in lines[-1]:
            line = process.stderr.readline()
            assert line, f"relay stopped: {lines}"
            lines.append(line.rstrip("\n"))
    finally:
        timer.cancel()
        process.terminate()
        process.communicate(timeout=LIMIT)
    return lines


def test_the_start_up_line_says_what_started(tmp_path):
    """One line names the listener, the admin address, the upstreams, how many keys
    were loaded and the limits in force."""
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice-1 concurrent=3\nbob sk-bob-1\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin = probe.getsockname()[1]
    lines = start_up_lines(
        "--listen", "127.0.0.1:0", "--admin-listen", f"127.0.0.1:{admin}",
        "--upstream", "127.0.0.2:1", "--api-key-file", str(keys),
        "--max-inflight", "4", "--key-rpm", "60", "--max-body-bytes", "1m",
    )  # fmt: skip
    line = lines[-1]
    assert "relay listening on 127.0.0.1:" in line and f"admin 127.0.0.1:{admin}" in line
    assert "forwarding to http://127.0.0.1:1, http://127.0.0.2:1 (least-requests)" in line
    assert "2 API keys" in line and "1 key with its own limits" in line
    assert "max-body-bytes 1m" in line and "max-inflight 4 per upstream" in line
    assert "per key rpm 60" in line
    assert not any("WARNING" in entry for entry in lines), lines


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serving_beyond_loopback_without_keys_is_one_warning(workers):
    """Listening on every interface with no API keys draws one warning line (not one per
    worker): anyone who can reach the port can use the GPU."""
    until = "relay listening on" if workers == "1" else "workers)"
    lines = start_up_lines("--listen", "0.0.0.0:0", "--workers", workers, until=until)
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1, lines
    assert "0.0.0.0:" in warnings[0] and "no API keys" in warnings[0]
    assert "anyone who can reach the port can use the GPU" in warnings[0]
    assert "no API keys" in next(line for line in lines if "relay listening on" in line)


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["--upstrem", "127.0.0.1:1"], " (did you mean --upstream?)"),
        (["--upstream", "127.0.0.1:1", "--lisen=:0"], " (did you mean --listen?)"),
        (["--upstream", "127.0.0.1:1", "--api-keyfile", "k"], " (did you mean --api-key-file?)"),
        (["probe", "--acept-encoding", "gzip", "http://x"], " (did you mean --accept-encoding?)"),
        (["--upstream", "127.0.0.1:1", "--frobnicate"], ""),
    ],
)
def test_a_mistyped_flag_gets_a_did_you_mean(argv, suggestion):
    """An unknown flag is one line naming it, with the closest real flag when one is close."""
    err = one_error(relay(*argv))
    assert "unrecognized arguments: " in err
    assert err.endswith(f"{suggestion}\n") and err.count("did you mean") == (1 if suggestion else 0)
