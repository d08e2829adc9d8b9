"""The fleet against a Redis that speaks only TLS and asks for a password, as the locked-down deployments run it.

A real ``redis-server`` (its own, on a free loopback port: not the session's shared database) with a CA and a
server certificate made here; the fleet's own code connects to it: :mod:`shared.redis_options` clients, the Celery
app (kombu's broker and Celery's result backend), a real ``fleet worker`` process of each engine, and the producer
API serving a real predict.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import redis as redis_lib

from producer_api.app import create_app
from shared import redis_options
from shared.celery_app import create_celery_app
from shared.keys import Keys
from shared.settings import FleetSettings
from shared.stats import StatsReader
from tests.helpers import fleet_cmd, free_port, python_env, redis_server_binary, wait_for
from tests.integration.conftest import ENGINES
from workers.training.synthetic import generate_bars

pytestmark = pytest.mark.integration


# --- certificates -------------------------------------------------------------------------------------------


def _make_certs_with_cryptography(out: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    (out / "redis.crt").write_bytes(cert.public_bytes(pem))
    (out / "redis.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))


def _make_certs_with_openssl(out: Path) -> None:
    # NOTE: configs of our own: the system's default one may add extensions of its own to what we sign.
    (out / "ca.cnf").write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = fleet-test-ca\n[v3_ca]\n"
                                "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
                                "subjectKeyIdentifier = hash\n")
    (out / "server.cnf").write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = 127.0.0.1\n")
    (out / "server.ext").write_text("basicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n"
                                    "subjectAltName = IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-config", "ca.cnf", "-extensions", "v3_ca",
         "-keyout", "ca.key", "-out", "ca.crt"],
        ["req", "-new", "-newkey", "rsa:2048", "-nodes", "-config", "server.cnf", "-keyout", "redis.key",
         "-out", "redis.csr"],
        ["x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
         "-extfile", "server.ext", "-out", "redis.crt"],
    ):
        subprocess.run(["openssl", *argv], cwd=out, check=True, capture_output=True, timeout=60)


def make_certs(out: Path) -> None:
    """A CA (``ca.crt``) and a server certificate for 127.0.0.1 it signed (``redis.crt``, ``redis.key``)."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _make_certs_with_openssl(out)
    else:
        _make_certs_with_cryptography(out)


# --- the server ---------------------------------------------------------------------------------------------


@dataclass
class TlsRedis:
    """A TLS-only Redis with a password, and the fleet settings that reach it."""

    port: int
    password: str
    password_file: Path
    ca: Path

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def settings(self, **overrides: Any) -> FleetSettings:
        """Settings as a deployment gives them: the password from a file, the CA that signed Redis' certificate."""
        fields: dict[str, Any] = {"redis_url": self.url, "redis_password_file": self.password_file,
                                  "redis_ssl_ca_certs": self.ca}
        return FleetSettings(**{**fields, **overrides})

    def env(self) -> dict[str, str]:
        """The same settings for a fleet process, without any REDIS_* of the runner's own environment."""
        env = {k: v for k, v in python_env().items() if not k.startswith("REDIS_")}
        env.update(REDIS_URL=self.url, REDIS_PASSWORD_FILE=str(self.password_file), REDIS_SSL_CA_CERTS=str(self.ca))
        return env


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    root = tmp_path_factory.mktemp("tls-redis")
    make_certs(root)
    password = secrets.token_hex(16)
    (root / "redis-password").write_text(password + "\n")  # the trailing newline of `openssl rand -hex 24 > file`
    server = TlsRedis(port=free_port(), password=password, password_file=root / "redis-password", ca=root / "ca.crt")
    log = open(root / "redis.log", "w")
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--tls-port", str(server.port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(root / "redis.crt"), "--tls-key-file", str(root / "redis.key"),
         "--tls-ca-cert-file", str(server.ca), "--tls-auth-clients", "no", "--requirepass", password,
         "--save", "", "--appendonly", "no", "--dir", str(root)], stdout=log, stderr=subprocess.STDOUT)
    client = redis_options.client(server.settings(), socket_connect_timeout=1)
    try:
        wait_for(lambda: proc.poll() is None and client.ping(), 15, f"TLS redis-server ({root / 'redis.log'})")
        yield server
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        log.close()


# --- clients ------------------------------------------------------------------------------------------------


def test_client_pings_with_the_ca_and_the_password(tls_redis: TlsRedis) -> None:
    client = redis_options.client(tls_redis.settings())
    try:
        assert client.ping() and client.connection_pool.connection_class is redis_lib.SSLConnection
    finally:
        client.close()


@pytest.mark.parametrize("overrides, error", [
    ({"redis_password_file": None}, redis_lib.AuthenticationError),  # NOAUTH
    ({"redis_password_file": None, "redis_password": "not-it"}, redis_lib.AuthenticationError),  # WRONGPASS
    ({"redis_ssl_ca_certs": None}, redis_lib.ConnectionError),  # the system's CAs never signed this server
], ids=["no-password", "wrong-password", "no-ca"])
def test_client_is_refused_without_the_password_or_the_ca(tls_redis: TlsRedis, overrides: dict,
                                                          error: type[Exception]) -> None:
    client = redis_options.client(tls_redis.settings(**overrides))
    try:
        with pytest.raises(error) as caught:
            client.ping()
        if error is redis_lib.ConnectionError:
            assert "certificate verify failed" in str(caught.value)
    finally:
        client.close()


def test_password_setting_wins_over_the_url(tls_redis: TlsRedis) -> None:
    settings = tls_redis.settings(redis_url=f"rediss://:stale@127.0.0.1:{tls_redis.port}/0")
    client = redis_options.client(settings)
    try:
        assert client.ping()
    finally:
        client.close()


def test_celery_broker_and_backend_connect_over_tls(tls_redis: TlsRedis) -> None:
    app = create_celery_app(tls_redis.settings(), name="tls-check")
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            assert conn.transport.driver_name == "redis" and conn.ssl
            channel = conn.default_channel
            assert channel.client.ping()
        assert app.backend.client.ping()
        assert app.backend.client.connection_pool.connection_class is redis_lib.SSLConnection
    finally:
        app.close()


def test_password_file_and_password_together_are_refused(tls_redis: TlsRedis) -> None:
    with pytest.raises(ValueError, match="not both"):
        redis_options.url(tls_redis.settings(redis_password="x"))


# --- a real worker and the API ------------------------------------------------------------------------------

SERIES = np.ascontiguousarray(generate_bars("AAPL", "1h", n_bars=700, seed=123).values[-200:], dtype="<f4")


def predict_body() -> bytes:
    return msgpack.packb({"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "adapter": "simple",
                          "device": "cpu", "inputs": {"tensor": {"dtype": "float32", "shape": list(SERIES.shape),
                                                                 "data": SERIES.tobytes()}}})


@pytest.fixture(params=ENGINES)
def tls_worker(request: pytest.FixtureRequest, tls_redis: TlsRedis, model_store: Path,
               tmp_path: Path) -> Iterator[FleetSettings]:
    """A real ``fleet worker`` of one engine on the TLS Redis, under a key prefix of its own."""
    engine = request.param
    settings = tls_redis.settings(model_store_dir=model_store, redis_key_prefix=f"tls-{uuid.uuid4().hex[:8]}",
                                  api_auth_enabled=False)
    env = {**tls_redis.env(), "REDIS_KEY_PREFIX": settings.redis_key_prefix, "MODEL_STORE_DIR": str(model_store),
           "LOG_LEVEL": "INFO", "WORKER_TORCH_THREADS": "1"}
    args = ["worker", "--engine", engine, "--adapter", "simple", "--device", "cpu", "-c", "1"]
    args += ["-P", "prefork"] if engine == "celery" else []
    log_path = tmp_path / "worker.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(fleet_cmd(*args), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    reader = StatsReader(redis_options.client(settings), Keys(settings.redis_key_prefix))

    def live() -> list[str]:
        assert proc.poll() is None, f"worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        return reader.live_workers()

    try:
        try:
            wait_for(live, 60, "a worker process on the TLS Redis")
        except TimeoutError:
            raise AssertionError(f"worker did not start:\n{log_path.read_text()[-3000:]}") from None
        yield settings
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        reader.redis.close()


async def test_api_and_worker_serve_a_predict_over_tls(aiohttp_client, tls_worker: FleetSettings) -> None:
    api = await aiohttp_client(create_app(tls_worker))
    resp = await api.post("/v1/predict?wait=30", data=predict_body(), headers={"Content-Type": "application/msgpack"})
    doc = await resp.json()
    assert resp.status == 200 and doc["status"] == "succeeded", doc.get("error")
    assert np.asarray(doc["result"]["predictions"]).shape[1] == SERIES.shape[1]
