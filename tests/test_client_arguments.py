"""What the client SDK and `speed generate` say about arguments that cannot work, before anything is sent: a CA
certificate, client certificate or key that is not PEM, a coordinator address that is not HOST:PORT; and that a
request that fails has printed nothing of its prompt."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from cryptography.hazmat.primitives import serialization

from deploy.certs import Authority
from runtime.client import AsyncClient, Client, InvalidRequest
from runtime.core.errors import SpeedError
from tests.conftest import assert_one_line_error, free_port, run_speed

NOT_PEM = {
    "text": b"this is not a certificate\n",
    "empty": b"",
    "bad base64": b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    "not DER": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "binary": bytes(range(256)),
}
BAD_ADDRESSES = ["not an address", "127.0.0.1", ":50050", "host:", "host:0", "host:65536", "host:port", "::1:50050",
                 "[nonsense]:1", "", " 127.0.0.1:50050"]


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict:
    """A CA certificate, a client certificate and key it signed, the key encrypted, and the files that are not PEM."""
    directory = tmp_path_factory.mktemp("pem")
    authority = Authority("test", days=1)
    (directory / "ca.pem").write_bytes(authority.cert.public_bytes(serialization.Encoding.PEM))
    authority.issue(directory, "client", "speed client", [])
    (directory / "encrypted.key").write_bytes(authority.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")))
    for name, data in NOT_PEM.items():
        (directory / f"{name.replace(' ', '-')}.pem").write_bytes(data)
    return {"ca": directory / "ca.pem", "cert": directory / "client.pem", "key": directory / "client.key",
            "encrypted": directory / "encrypted.key",
            **{name: directory / f"{name.replace(' ', '-')}.pem" for name in NOT_PEM}}


# --- certificate and key files ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [*NOT_PEM, "key"])
def test_a_ca_file_that_is_not_a_certificate_is_refused_by_the_sdk(pem, bad):
    with pytest.raises(SpeedError, match=re.escape(f"the CA certificate {pem[bad]} is not a PEM certificate")):
        Client("127.0.0.1:50050", ca=pem[bad])


@pytest.mark.parametrize("cert, key, refused", [
    ("text", "key", "the client certificate {} is not a PEM certificate"),
    ("key", "key", "the client certificate {} is not a PEM certificate"),
    ("cert", "not DER", "the client key {} is not a PEM private key"),
    ("cert", "cert", "the client key {} is not a PEM private key"),
    ("cert", "encrypted", "the client key {} is not a PEM private key without a passphrase"),
])
def test_a_client_certificate_or_key_that_is_not_pem_is_refused_by_the_sdk(pem, cert, key, refused):
    named = pem[cert] if "certificate" in refused else pem[key]
    with pytest.raises(SpeedError, match=re.escape(refused.format(named))):
        Client("127.0.0.1:50050", ca=pem["ca"], cert=pem[cert], key=pem[key])


def test_valid_files_make_a_client(pem):
    with Client("127.0.0.1:50050", ca=pem["ca"], cert=pem["cert"], key=pem["key"]):
        pass


@pytest.mark.cluster
@pytest.mark.parametrize("bad", ["text", "not DER", "key"])
def test_speed_generate_says_the_ca_file_is_not_a_certificate_in_one_line(pem, bad):
    result = run_speed("generate", "--coordinator", f"127.0.0.1:{free_port()}", "--ca", str(pem[bad]), "Hello there")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, f"speed generate: error: the CA certificate {pem[bad]} is not a PEM certificate",
                          "-----BEGIN CERTIFICATE-----")


@pytest.mark.cluster
def test_speed_generate_says_the_client_key_is_not_pem_in_one_line(pem):
    result = run_speed("generate", "--coordinator", f"127.0.0.1:{free_port()}", "--ca", str(pem["ca"]),
                       "--cert", str(pem["cert"]), "--key", str(pem["text"]), "Hello there")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, f"the client key {pem['text']} is not a PEM private key")


# --- the coordinator's address -------------------------------------------------------------------------------


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_an_address_that_is_not_host_port_is_refused_by_the_sdk(address):
    sentence = re.escape(f"the coordinator address {address!r} is not a valid HOST:PORT")
    with pytest.raises(InvalidRequest, match=sentence) as refused:
        Client(address)
    assert "e.g. 127.0.0.1:50050" in str(refused.value)

    async def open_async():
        AsyncClient(address)

    with pytest.raises(InvalidRequest, match=sentence):
        asyncio.run(open_async())


def test_an_address_that_is_not_text_is_refused_by_the_sdk():
    with pytest.raises(InvalidRequest, match="the coordinator address 50050 is not a valid HOST:PORT"):
        Client(50050)


@pytest.mark.cluster
def test_speed_generate_says_the_address_is_not_host_port_in_one_line():
    result = run_speed("generate", "--coordinator", "not an address", "Hello there")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, "the coordinator address 'not an address' is not a valid HOST:PORT",
                          "e.g. 127.0.0.1:50050")


@pytest.mark.cluster
def test_a_host_name_that_does_not_resolve_is_said_so_in_one_line():
    result = run_speed("generate", "--coordinator", "no$such$host:50050", "--timeout", "30", "Hello there")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, "cannot resolve the host of the coordinator address no$such$host:50050")


# --- the prompt is printed once the request has started ------------------------------------------------------


@pytest.mark.cluster
def test_a_failed_request_prints_nothing_of_the_prompt():
    result = run_speed("generate", "--coordinator", f"127.0.0.1:{free_port()}", "Hello there")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, "cannot reach the coordinator")


@pytest.mark.cluster
def test_the_prompt_is_printed_before_the_text_and_not_before_a_refusal(serving_cluster):
    endpoint = serving_cluster.endpoint
    result = run_speed("generate", "--coordinator", endpoint, "--max-new-tokens", "4", "--json", "ROMEO.")
    text = json.loads(result.stdout)["text"]
    result = run_speed("generate", "--coordinator", endpoint, "--max-new-tokens", "4", "ROMEO.")
    assert result.returncode == 0 and result.stdout == f"ROMEO.{text}\n", result.stderr
    refused = run_speed("generate", "--coordinator", endpoint, "--max-new-tokens", "4", "ROMEO. " * 2000)
    assert refused.returncode == 1 and refused.stdout == ""
    assert_one_line_error(refused, "speed generate: error: the prompt has", "context holds")
