"""End-to-end authentication of a deployment's messages, independent of Flower's transport (Ed25519).

Flower's Fleet API authenticates a SuperNode's HTTP calls but not the messages it pushes: a node can store a
message without ``reply_to`` (which its destination then runs as an instruction) or a reply in another node's
name. So, in a deployment, the operator signs every instruction and every site signs every reply:

- an instruction statement binds the run id, the run whose folder the site works in (``origin``: the run itself,
  or the run a resume continues), the round, the message type, the destination site and the digest of the
  message's content; the site verifies it against the operator's public key in its policy (``operator-key``)
  and refuses a statement that is not later in the run than the last one it accepted (replay, reordering);
- a reply statement binds the run id, the id of the instruction it answers, the site and the digest of the
  reply's content; the server verifies it against the site's public key (the server-side trust file).

Keys are raw Ed25519 keys: private keys in PEM (PKCS 8) files made by ``deploy/make_signing_key.sh``, public keys as
the base64 text of their 32 bytes (one line, for YAML files). Library code: no Flower here; the content digest of
a Flower record is ``fl_covid.records.content_digest``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"fl-covid signed statement v1\n"
PHASES = ("evaluate", "train")  # a round's summary message comes before its train message


class NotTrusted(ValueError):
    """A signature, key or statement that must not be trusted; the message says which and why."""


@dataclass(frozen=True)
class Instruction:
    """What the operator signs for one message to one site."""

    run_id: int
    origin: int  # the run whose folder the site works in: run_id, or the run a resume continues
    round: int
    message_type: str
    site: str
    content: str  # SHA-256 (Flower object id) of the message's content without its signature record

    @property
    def position(self) -> int:
        """Order of the instruction within its run: a round's summary, then its training."""
        if self.message_type not in PHASES:
            raise NotTrusted(f"message type {self.message_type!r} is not one of {PHASES}")
        return 2 * self.round + PHASES.index(self.message_type)


@dataclass(frozen=True)
class Reply:
    """What a site signs for its reply to one instruction."""

    run_id: int
    answers: str  # the message id of the instruction
    site: str
    content: str  # SHA-256 (Flower object id) of the reply's content without its signature record


def statement(what: Instruction | Reply) -> bytes:
    """The bytes signed: a domain tag, the statement's kind and its fields as canonical JSON."""
    body = {"kind": type(what).__name__.lower(), **asdict(what)}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def load_private_key(file: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; NotTrusted naming the file when it is unreadable, of another
    type, or readable by others than its owner."""
    file = Path(file).expanduser()
    try:
        if file.stat().st_mode & 0o077:
            raise NotTrusted(f"signing key {file} is readable by others: chmod 600 {file}")
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, NotTrusted):
            raise
        raise NotTrusted(f"signing key {file} cannot be read as a PEM private key ({type(e).__name__}); make one "
                         "with deploy/make_signing_key.sh") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise NotTrusted(f"signing key {file} is not an Ed25519 key; make one with deploy/make_signing_key.sh")
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The base64 text of a public key's 32 bytes (what policies and the trust file hold)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)).decode()


def parse_public_key(text: str, what: str = "public key") -> Ed25519PublicKey:
    """A public key from the base64 text of its 32 bytes; NotTrusted naming ``what`` otherwise."""
    try:
        raw = base64.b64decode(str(text).strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise NotTrusted(f"{what} is not base64 text") from e
    if len(raw) != 32:
        raise NotTrusted(f"{what} must be the 32 bytes of an Ed25519 public key in base64, got {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, what: Instruction | Reply) -> str:
    """The base64 signature of a statement."""
    return base64.b64encode(key.sign(statement(what))).decode()


def verify(key: Ed25519PublicKey, what: Instruction | Reply, signature: object) -> None:
    """NotTrusted unless ``signature`` is a valid signature of ``what`` by ``key``."""
    if not isinstance(signature, str):
        raise NotTrusted("the message is not signed")
    try:
        key.verify(base64.b64decode(signature, validate=True), statement(what))
    except (InvalidSignature, binascii.Error, ValueError):
        raise NotTrusted(f"the signature does not match this {type(what).__name__.lower()} (its content, run, "
                         "round, type or site differ from what was signed, or another key signed it)") from None


class InstructionLog:
    """The last instruction position a site accepted in each run (a JSON file in its state folder), so that a
    replayed or reordered instruction is refused. Recorded before any data is read."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)

    def _load(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads(self.file.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            raise NotTrusted(f"the instruction log {self.file} is unreadable; move it away only if no run is "
                             "in progress") from e

    def accept(self, instruction: Instruction) -> None:
        """Record ``instruction`` as the last of its run; NotTrusted when it is not later than the last one."""
        seen = self._load()
        last = seen.get(str(instruction.run_id), -1)
        if instruction.position <= last:
            raise NotTrusted(f"instruction {instruction.message_type} of round {instruction.round} of run "
                             f"{instruction.run_id} is not later than the last one this site accepted (position "
                             f"{last}): a replayed or reordered instruction")
        seen[str(instruction.run_id)] = instruction.position
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(self.file.name + ".new")
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
        os.replace(tmp, self.file)
