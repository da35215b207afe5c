"""Small, fast blocking POP3 and LMTP clients for load generation.

Unlike ``poplib`` they never split a message into lines: a RETR body is consumed in large
``recv`` pieces, searching only for the ``CRLF.CRLF`` terminator, and then dropped, so one
client process can absorb hundreds of MB/s and a 25 MB message costs it no memory.
"""

import socket
import ssl
from pathlib import Path

HOST = "127.0.0.1"
RECV_SIZE = 256 * 1024
TERMINATOR = b"\r\n.\r\n"


class ProtocolError(Exception):
    """The server answered something other than what the bench expects (e.g. -ERR [IN-USE])."""


def tls_context(cafile: Path) -> ssl.SSLContext:
    """Trusts the bench's self-signed certificate and checks the name, like a real client."""
    return ssl.create_default_context(cafile=str(cafile))


class LineClient:
    """A socket with a receive buffer and a line reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    @classmethod
    def open(cls, port: int, context: ssl.SSLContext | None = None, timeout: float = 60.0) -> "LineClient":
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=HOST)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def line(self) -> bytes:
        """One reply line without its CRLF."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            self.fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def read_until_closed(self) -> None:
        """Drain until the server closes (it does so after releasing the session's resources)."""
        try:
            while self.sock.recv(RECV_SIZE):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass


class Pop3(LineClient):
    @classmethod
    def connect(cls, port: int, context: ssl.SSLContext | None = None, timeout: float = 60.0) -> "Pop3":
        client = cls.open(port, context, timeout)
        client.expect_ok(client.line())
        return client

    @staticmethod
    def expect_ok(line: bytes) -> bytes:
        if not line.startswith(b"+OK"):
            raise ProtocolError(line.decode(errors="replace"))
        return line

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.expect_ok(self.line())

    def login(self, username: str, password: str) -> None:
        self.command(f"USER {username}")
        self.command(f"PASS {password}")

    def stat(self) -> tuple[int, int]:
        _, count, size = self.command("STAT").split()[:3]
        return int(count), int(size)

    def multiline(self, text: str) -> int:
        """Send a command with a multi-line reply; consume the reply; return its body length."""
        self.command(text)
        return self.skip_body()

    def skip_body(self) -> int:
        """Consume a multi-line body after its status line, keeping at most one recv in memory.

        Dot-stuffing guarantees CRLF.CRLF appears only as the terminator; the status line's
        CRLF is put in front so an empty body ('.' right away) is found the same way.
        """
        pending = bytearray(b"\r\n") + self.buffer
        self.buffer.clear()
        consumed = 0
        while (found := pending.find(TERMINATOR)) < 0:
            keep = len(pending) - (len(TERMINATOR) - 1)
            if keep > 0:
                consumed += keep
                del pending[:keep]
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise EOFError("the server closed the connection inside a multi-line reply")
            pending += data
        self.buffer += pending[found + len(TERMINATOR) :]
        return consumed + found

    def retr(self, number: int) -> int:
        return self.multiline(f"RETR {number}")

    def retr_content(self, number: int) -> bytes:
        """RETR a message and return it whole, dot-stuffing removed: its bytes, to be checked."""
        self.command(f"RETR {number}")
        pending = bytearray(b"\r\n") + self.buffer
        self.buffer.clear()
        while (found := pending.find(TERMINATOR)) < 0:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise EOFError("the server closed the connection inside a multi-line reply")
            pending += data
        self.buffer += pending[found + len(TERMINATOR) :]
        body = bytes(pending[2 : found + 2])  # the status line's CRLF off, the last line's CRLF on
        if body.startswith(b"."):  # a first line starting with a dot came stuffed
            body = body[1:]
        return body.replace(b"\r\n..", b"\r\n.")

    def quit(self) -> None:
        """QUIT, then wait for the close: the server closes once the mailbox lock is released."""
        self.command("QUIT")
        self.read_until_closed()
        self.close()


class Lmtp(LineClient):
    @classmethod
    def connect(cls, port: int, timeout: float = 60.0) -> "Lmtp":
        client = cls.open(port, None, timeout)
        client.expect(b"220", client.reply())
        client.send(b"LHLO bench.test\r\n")
        client.expect(b"250", client.reply())
        return client

    def reply(self) -> bytes:
        """One (possibly multi-line) reply; returns its last line."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    @staticmethod
    def expect(code: bytes, line: bytes) -> None:
        if not line.startswith(code):
            raise ProtocolError(line.decode(errors="replace"))

    def deliver(self, sender: str, recipient: str, message: bytes) -> None:
        """One transaction; the 250 after DATA arrives only once the copy is committed.

        MAIL, RCPT and DATA go in one write, as Postfix's LMTP client sends them to a server
        that offers PIPELINING (RFC 2920); the message follows the 354.
        """
        self.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        self.expect(b"250", self.reply())
        self.expect(b"250", self.reply())
        self.expect(b"354", self.reply())
        self.send(dot_stuff(message) + b".\r\n")
        self.expect(b"250", self.reply())

    def quit(self) -> None:
        self.send(b"QUIT\r\n")
        self.reply()
        self.close()


def dot_stuff(message: bytes) -> bytes:
    """CRLF-terminated message bytes as sent after DATA (RFC 5321 section 4.5.2)."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed
