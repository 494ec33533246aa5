"""TLS served by the server itself (--tls-cert/--tls-key): real handshakes
on a self-signed certificate made for the test, with the Python client, a
raw ssl-wrapped websocket, urllib and the terminal commands."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cellmux.client import CellmuxError, Client
from conftest import start_server
from terminal_helpers import cellmux, cellmux_env

EXIT_SETTINGS = 2


def make_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cellmux test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}-cert.pem"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(certificate):
    cert, key = certificate
    running = start_server("--pool-size", "1", "--tls-cert", str(cert), "--tls-key", str(key))
    yield running
    running.stop()


def test_the_server_prints_an_https_url(tls_server):
    assert tls_server.url.startswith("https://127.0.0.1:")


def test_the_python_client_runs_code_over_https_and_wss(tls_server, certificate):
    with Client(tls_server.url, token=tls_server.token, cafile=str(certificate[0])) as client:
        model = client.create_kernel()
        try:
            with client.connect(model.id) as kernel:
                assert kernel.execute("1+1").result_text == "2"
        finally:
            client.delete_kernel(model.id)


def test_the_client_takes_its_ca_file_from_the_environment(tls_server, certificate, monkeypatch):
    monkeypatch.setenv("CELLMUX_CAFILE", str(certificate[0]))
    with Client(tls_server.url, token=tls_server.token) as client:
        assert client.get_status()["state"] == "ok"


def test_a_certificate_nobody_trusts_is_refused_by_the_client(tls_server, monkeypatch):
    monkeypatch.delenv("CELLMUX_CAFILE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with (
        Client(tls_server.url, token=tls_server.token) as client,
        pytest.raises(CellmuxError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.version()


def _https(url: str, cafile: Path, headers: dict[str, str] | None = None):
    context = ssl.create_default_context(cafile=str(cafile))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        return urllib.request.urlopen(request, context=context, timeout=30)
    except urllib.error.HTTPError as e:
        return e


@pytest.mark.parametrize("path", ["/", "/api", "/api/kernels", "/nowhere", "/static/nothing"])
def test_every_response_over_tls_carries_hsts(tls_server, certificate, path):
    with _https(tls_server.url.rstrip("/") + path, certificate[0]) as response:
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_the_login_cookie_is_secure_over_tls(tls_server, certificate):
    context = ssl.create_default_context(cafile=str(certificate[0]))
    request = urllib.request.Request(
        tls_server.url + "login",
        data=b"",
        method="POST",
        headers={"Authorization": f"token {tls_server.token}"},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        cookie = response.headers["Set-Cookie"]
    assert "cellmux-login=" in cookie and "Secure" in cookie and "HttpOnly" in cookie


def wss_upgrade(server, cafile: Path, origin: str | None = None) -> bytes:
    """The websocket handshake itself, over an ssl-wrapped socket: its head."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    context = ssl.create_default_context(cafile=str(cafile))
    extra = f"Origin: {origin}\r\n" if origin else ""
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
        conn.sendall(
            (
                f"GET /ws?token={server.token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"{extra}\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            assert chunk, head
            head += chunk
    return head


def test_a_raw_wss_upgrade_on_the_same_port(tls_server, certificate):
    head = wss_upgrade(tls_server, certificate[0])
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's sample accept key


def test_an_http_page_of_the_same_host_may_not_open_a_wss(tls_server, certificate):
    own = tls_server.url.rstrip("/")
    assert wss_upgrade(tls_server, certificate[0], own).startswith(b"HTTP/1.1 101")
    plain = own.replace("https://", "http://")
    assert wss_upgrade(tls_server, certificate[0], plain).startswith(b"HTTP/1.1 403")


def test_plain_http_on_the_tls_port_gets_no_answer(tls_server):
    host, port = tls_server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = conn.recv(4096)
    assert not reply.startswith(b"HTTP/")  # a TLS alert or nothing, never a page


def test_cellmux_run_and_kernels_over_https(tls_server, certificate, tmp_path):
    env = cellmux_env(tls_server, tmp_path / "state")
    script = tmp_path / "x.py"
    script.write_text("print(6 * 7)\n")
    done = cellmux(env, "run", str(script), "--kernel", "t", "--cafile", str(certificate[0]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"
    listing = cellmux(env, "kernels", "--cafile", str(certificate[0]))
    assert listing.returncode == 0, listing.stderr
    names = json.loads((tmp_path / "state" / "cellmux" / "kernels.json").read_text())
    kernel_id = next(iter(next(iter(names.values())).values()))
    assert kernel_id in listing.stdout
    # Without the CA file: the one-line error of a server that cannot be reached.
    refused = cellmux(env, "kernels")
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    with Client(tls_server.url, token=tls_server.token, cafile=str(certificate[0])) as client:
        client.delete_kernel(kernel_id)


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellmux", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_bad_certificates_and_keys_are_one_line_and_exit_2(certificate, tmp_path):
    cert, key = certificate
    _, other_key = make_certificate(tmp_path, "other")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases = [
        (["--tls-cert", str(cert), "--tls-key", str(other_key)], "does not belong to the cert"),
        (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(key)], "cannot read the TLS"),
        (["--tls-cert", str(key), "--tls-key", str(key)], "has no PEM certificate"),
        (["--tls-cert", str(cert), "--tls-key", str(cert)], "is not a PEM private key"),
        (["--tls-cert", str(cert), "--tls-key", str(encrypted)], "is encrypted"),
        (["--tls-cert", str(cert)], "TLS needs both tls_cert and tls_key"),
    ]
    for args, message in cases:
        result = serve(*args)
        assert result.returncode == EXIT_SETTINGS, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("cellmux serve: ") and message in lines[0], lines[0]


def test_twistd_exits_2_for_a_key_that_does_not_fit(certificate, tmp_path):
    twistd = Path(sys.executable).with_name("twistd")
    _, other_key = make_certificate(tmp_path, "other")
    result = subprocess.run(
        [
            *(str(twistd), "-n", "cellmux", "--port", "0"),
            *("--tls-cert", str(certificate[0]), "--tls-key", str(other_key)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_SETTINGS, result.stdout + result.stderr
    assert "does not belong to the certificate" in result.stderr
