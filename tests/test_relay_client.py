"""relay.client against hand-scripted SMTP servers on loopback: what a broken or hostile remote
MX can do to a session once it is open (flood replies, send an endless line, go silent)."""
from __future__ import annotations

import asyncio

import pytest

from mailplat.mailauth.tlspolicy import TlsPolicy
from mailplat.relay import client
from mailplat.relay.mx import MxHost

pytestmark = pytest.mark.timeout(60)


async def scripted_mx(on_mail: bytes) -> tuple[asyncio.AbstractServer, int]:
    """Greets, answers EHLO with PIPELINING, then answers the first MAIL with `on_mail`."""
    async def handle(reader, writer):
        writer.write(b"220 mx.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-mx.test\r\n250 PIPELINING\r\n")
            elif line.upper().startswith(b"MAIL"):
                writer.write(on_mail)
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                break
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def attempt(on_mail: bytes, command_timeout: float = 10) -> client.DeliveryError:
    server, port = await scripted_mx(on_mail)
    try:
        session = await client.connect([MxHost("mx.test", 10, ["127.0.0.1"])], TlsPolicy(), port=port,
                                       ca_file="", helo="relay.test", connect_timeout=5,
                                       command_timeout=command_timeout)
        assert session.pipelining
        with pytest.raises(client.DeliveryError) as info:
            await session.send("a@example.test", "b@example.net", b"Subject: x\r\n\r\nhi\r\n")
        assert not session.open
        await session.close()
        return info.value
    finally:
        server.close()
        await server.wait_closed()


def test_a_flood_of_replies_ends_the_session():
    err = asyncio.run(attempt(b"250 ok\r\n" * 200))
    assert err.code == 451 and "more replies than commands" in err.message


def test_an_endless_reply_line_ends_the_session():
    err = asyncio.run(attempt(b"250-" + b"x" * (client.MAX_REPLY + 10)))
    assert err.code == 451 and "reply too long" in err.message


def test_a_silent_server_times_out_at_mail():
    err = asyncio.run(attempt(b"", command_timeout=0.3))
    assert err.code == 451 and err.stage == "mail" and "timed out" in err.message


def test_a_reply_that_is_neither_success_nor_refusal_ends_the_session():
    err = asyncio.run(attempt(b"250 ok\r\n250 ok\r\n250 not 354\r\n"))  # DATA answered 250
    assert err.code == 451 and err.stage == "data" and "unexpected reply 250 to DATA" in err.message
