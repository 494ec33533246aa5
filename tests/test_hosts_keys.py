"""``cellmux keys``, the front's authorised keys and its ZAP answers, and the
kernel hosts' settings."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
import zmq
import zmq.auth
from twisted.internet.task import Clock
from txzmq import ZmqFactory

from cellmux.cli import EXIT_SETTINGS
from cellmux.config import ConfigError, ServerConfig
from cellmux.server.zap import ZAP_DOMAIN, AuthorisedKeys, ZapHandler


def keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellmux", "keys", *args], capture_output=True, text=True
    )


def test_keys_new_writes_a_pair_with_a_private_secret(tmp_path) -> None:
    result = keys("new", "host1", "--dir", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    public, secret = tmp_path / "k" / "host1.key", tmp_path / "k" / "host1.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec and zmq.curve_public(sec) == pub
    assert zmq.auth.load_certificate(str(public)) == (pub, None)
    # Never replaced: a second run would lock the host out.
    again = keys("new", "host1", "--dir", str(tmp_path / "k"))
    assert again.returncode == EXIT_SETTINGS and "not replaced" in again.stderr
    assert zmq.auth.load_certificate(str(secret))[1] == sec
    assert keys("new", "../x", "--dir", str(tmp_path)).returncode == EXIT_SETTINGS


class _Reactor(Clock):
    """What txzmq asks of a reactor, on a Clock: nothing runs unless told."""

    def addReader(self, reader) -> None:
        pass

    def removeReader(self, reader) -> None:
        pass


def zap_request(key: bytes, domain: bytes = ZAP_DOMAIN, mechanism: bytes = b"CURVE") -> list:
    return [b"1.0", b"7", domain, b"10.0.0.9", b"", mechanism, key]


def test_zap_admits_listed_keys_and_rereads_the_directory(tmp_path) -> None:
    made = tmp_path / "made"
    listed = tmp_path / "listed"
    made.mkdir()
    listed.mkdir()
    for name in ("a", "b"):
        zmq.auth.create_certificates(str(made), name)
    shutil.copy(made / "a.key", listed)
    a_public = zmq.auth.load_certificate(str(made / "a.key"))[0]
    b_public = zmq.auth.load_certificate(str(made / "b.key"))[0]
    factory = ZmqFactory()
    factory.reactor = _Reactor()
    lines = []
    handler = ZapHandler(factory, AuthorisedKeys(str(listed)))
    handler.refusals._emit = lines.append
    try:
        a_raw, b_raw = zmq.utils.z85.decode(a_public), zmq.utils.z85.decode(b_public)
        assert handler.answer(zap_request(a_raw))[2:5] == [b"200", b"OK", a_public]
        assert handler.answer(zap_request(b_raw))[2] == b"400"
        assert handler.answer(zap_request(a_raw, mechanism=b"NULL"))[2] == b"400"
        assert handler.answer(zap_request(a_raw, domain=b"other"))[2] == b"400"
        assert handler.answer([b"1.0"])[2] == b"500"
        for _ in range(50):  # a host retrying: one line, counted
            handler.answer(zap_request(b_raw))
        assert len([line for line in lines if "key" in line.source]) == 1
        # Rotation: a key added or removed counts after the next re-read.
        shutil.copy(made / "b.key", listed)
        os.unlink(listed / "a.key")
        factory.reactor.advance(5.0)
        assert handler.answer(zap_request(b_raw))[2] == b"200"
        assert handler.answer(zap_request(a_raw))[2] == b"400"
    finally:
        handler.shutdown()
        factory.context.term()


def test_host_settings_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="hosts_secret_key"):
        ServerConfig(hosts_listen="tcp://127.0.0.1:8801")
    with pytest.raises(ConfigError, match="tcp://"):
        ServerConfig(
            hosts_listen="ipc:///x", hosts_secret_key="k", hosts_authorized_dir=str(tmp_path)
        )
    with pytest.raises(ConfigError, match="local_kernels"):
        ServerConfig(local_kernels=False)
    with pytest.raises(ConfigError, match="host_timeout"):
        ServerConfig(host_timeout=0)
    assert ServerConfig().hosts_listen == ""  # no remote hosts by default


def test_a_front_without_a_readable_secret_key_does_not_start(tmp_path) -> None:
    zmq.auth.create_certificates(str(tmp_path), "front")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "cellmux", "serve", "--port", "0", "--pool-size", "0"),
            *("--runtime-dir", str(tmp_path / "rt"), "--state-dir", str(tmp_path / "state")),
            *("--hosts-listen", "tcp://127.0.0.1:0", "--hosts-authorized-dir", str(tmp_path)),
            *("--hosts-secret-key", str(tmp_path / "front.key")),  # the public one
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "holds no secret key" in result.stderr


def test_cellmux_host_says_what_is_wrong_with_its_settings(tmp_path) -> None:
    zmq.auth.create_certificates(str(tmp_path), "front")
    zmq.auth.create_certificates(str(tmp_path), "h")
    good = [
        *("--front", "tcp://127.0.0.1:9", "--front-key", str(tmp_path / "front.key")),
        *("--key", str(tmp_path / "h.key_secret"), "--name", "h"),
    ]

    def host(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cellmux", "host", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for args, why in [
        ([*good[:-2], "--name", "no spaces"], "not a host name"),
        ([*good, "--label", "../x"], "not a host name or label"),
        (["--front", "ipc:///x", *good[2:]], "tcp://"),
        ([*good[:4], "--key", str(tmp_path / "h.key"), *good[6:]], "holds no secret key"),
        ([*good[:4], "--key", str(tmp_path / "missing"), *good[6:]], "cannot read a key file"),
        ([*good, "--front-key", good[3]], "one --front-key for all fronts or one per --front"),
    ]:
        result = host(*args)
        assert result.returncode == EXIT_SETTINGS, (args, result.stderr)
        assert why in result.stderr, (args, result.stderr)
