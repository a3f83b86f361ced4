"""Client bearer tokens: a file of salted hashes, one line per named client, `NAME SALT SHA256`.

A token is 32 random bytes (URL-safe base64), so a salted SHA-256 is enough to keep the file useless
to a reader: a slow password hash guards guessable secrets, and these are not guessable. The file is
read again when it changes, so `speed tokens add` takes effect on a running coordinator.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from runtime.core.errors import SpeedError

TOKENS_FILE = "tokens.txt"
TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _digest(salt: bytes, token: str) -> bytes:
    return hashlib.sha256(salt + token.encode()).digest()


def add_token(path: Path, name: str) -> str:
    """Append a new token for `name` to the file (made readable by its owner only); returns the token."""
    if not TOKEN_NAME.fullmatch(name):
        raise SpeedError(f"a token name may use only letters, digits, '-', '_' and '.', got {name!r}")
    if name in read_tokens(path):
        raise SpeedError(f"{path} already has a token named {name}; remove it first or choose another name")
    token, salt = secrets.token_urlsafe(32), secrets.token_bytes(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as file:
        file.write(f"{name} {salt.hex()} {_digest(salt, token).hex()}\n")
    return token


def remove_token(path: Path, name: str) -> None:
    entries = read_tokens(path)
    if name not in entries:
        raise SpeedError(f"{path} has no token named {name}; its tokens are {', '.join(sorted(entries)) or 'none'}")
    lines = [line for line in path.read_text().splitlines() if line.split(" ", 1)[0] != name]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.touch(mode=0o600)
    temporary.write_text("".join(f"{line}\n" for line in lines))
    temporary.replace(path)


def read_tokens(path: Path) -> dict[str, tuple[bytes, bytes]]:
    """name -> (salt, digest); an absent file holds no token."""
    if not path.exists():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        try:
            name, salt, digest = fields
            entries[name] = (bytes.fromhex(salt), bytes.fromhex(digest))
        except ValueError:
            raise SpeedError(f"{path} line {number} is not `NAME SALT SHA256`; make tokens with speed tokens add") from None
    return entries


class TokenFile:
    """Checks presented tokens against the file, reading it again whenever it changed."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, tuple[bytes, bytes]] = {}

    def owner(self, token: str) -> str | None:
        """The name of the client the token belongs to, or None."""
        self._refresh()
        for name, (salt, digest) in self._entries.items():
            if hmac.compare_digest(_digest(salt, token), digest):
                return name
        return None

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._entries = read_tokens(self.path) if stamp else {}
            self._stamp = stamp
