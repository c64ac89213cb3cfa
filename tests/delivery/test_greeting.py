"""How a connection to the relay opens: EHLO as it is opened, HELO when the relay refuses EHLO,
and MAIL and RCPT sent with the addresses as they were validated.

The relay here is a small SMTP server on loopback that answers EHLO with 502, as a relay that
speaks only RFC 821 does (aiosmtpd always offers EHLO), and keeps every line it was sent.
"""

from __future__ import annotations

import asyncio

from dispatcher.delivery.message import Envelope
from dispatcher.delivery.transports.smtp import SMTPConfig, SMTPTransport

MESSAGE = b"From: a@kw.example.com\r\nTo: pat@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


class OldRelay:
    """An SMTP server that refuses EHLO, accepts HELO, and keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.messages: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.example SMTP\r\n")
        while line := await reader.readline():
            command = line.decode().rstrip("\r\n")
            self.lines.append(command)
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                writer.write(b"502 5.5.1 EHLO not implemented\r\n")
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")
                body = b""
                while (part := await reader.readline()) != b".\r\n":
                    body += part
                self.messages.append(body)
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 OK\r\n")
            await writer.drain()
        writer.close()


def test_a_relay_that_refuses_ehlo_is_greeted_with_helo_and_takes_the_message() -> None:
    relay = OldRelay()

    async def scenario() -> int:
        server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = SMTPTransport(SMTPConfig("127.0.0.1", port, tls="off"), pool_size=1)
        envelope = Envelope(mail_from="bounce+s1=x@kw.example.com", recipients=("pat@example.org",))
        try:
            delivery = await transport.send(envelope, MESSAGE)
            await transport.shutdown()
        finally:
            server.close()
            await server.wait_closed()
        return delivery.code

    # When a message goes to a relay that answers EHLO with 502
    code = asyncio.run(scenario())

    # Then the connection was greeted with HELO before MAIL, and the relay has the message,
    # its envelope as validated
    assert code == 250
    verbs = [line.split(" ", 1)[0] for line in relay.lines]
    assert verbs[:3] == ["EHLO", "HELO", "MAIL"]
    assert "MAIL FROM:<bounce+s1=x@kw.example.com>" in relay.lines
    assert "RCPT TO:<pat@example.org>" in relay.lines
    assert relay.messages == [MESSAGE]
