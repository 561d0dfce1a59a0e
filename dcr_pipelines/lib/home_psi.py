"""Matching with a party that keeps its identifiers at home (`matching.home_parties`).

Such a party never uploads an identifier or a key. On its own machine
(`dcr psi prepare`) it normalises its identifiers, replaces them in its
upload files by its staging tokens (HMAC under its own key) and writes a
*setup* message: each of its people as (token, H(id)^b), where b is its
own PSI key. The operator's client half sends it a *request*, the client's
identifiers blinded with the operator's key a, H(x)^a; the party answers
(`dcr psi respond`) with H(x)^ab. The operator raises the setup elements to
a as well, H(y)^ba, and equal values are the people both hold (the
Diffie-Hellman PSI of Huberman, Franklin and Hogg, with the party's token
attached to its elements). The operator learns the intersection (as it
does with any client half) and never an identifier of the party outside
it; the party learns only the size of the request. Every message is a
file with a header naming its collaboration, party, kind and the request it
answers, and a body checksum.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import psi
from .identifiers import normalise, token
from .processes import map_chunks, worker_pool

MAGIC = b"DCRPSI1\n"
ELEMENT_BYTES = 33  # a compressed P-256 point
TOKEN_BYTES = 32  # a raw HMAC-SHA256 token
SUFFIX = ".dcrpsi"
PARALLEL_FROM = 20_000  # below this, process start-up costs more than it saves


class MessageError(ValueError):
    """A protocol file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Message:
    kind: str  # setup | request | response
    collaboration: str
    party: str
    elements: list[bytes]
    tokens: list[str]  # setup only: the party's staging token of each element
    request_id: str = ""  # request and response: which client set this is about
    sha256: str = ""  # of the whole file


@dataclass(frozen=True)
class HomeMatch:
    """One home party's side of the match: its tokens, and its token for each matched client item."""

    party: str
    tokens: Sequence[str]
    by_client_index: Mapping[int, str]
    setup_sha256: str


@dataclass(frozen=True)
class HomeKeys:
    """A home party's two secrets; they stay on its machine."""

    hmac_key: bytes
    psi_key: bytes

    def __repr__(self) -> str:
        return "HomeKeys(<redacted>)"


# --- files -------------------------------------------------------------------------------


def write_message(path: Path, message: Message) -> Path:
    """Write atomically (a temporary name, then a rename), so a reader never sees half a file."""
    if any(len(e) != ELEMENT_BYTES for e in message.elements):
        raise MessageError(f"{path.name}: an element is not a {ELEMENT_BYTES}-byte curve point")
    body = b"".join(bytes.fromhex(t) + e for t, e in zip(message.tokens, message.elements, strict=False)) if message.kind == "setup" else b"".join(message.elements)
    header = {
        "kind": message.kind,
        "collaboration": message.collaboration,
        "party": message.party,
        "count": len(message.elements),
        "request_id": message.request_id,
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    partial.write_bytes(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body)
    partial.replace(path)
    return path


def read_message(path: Path, kind: str, collaboration: str, party: str, request_id: str | None = None) -> Message:
    """Read and check a protocol file: kind, collaboration, party, request, size and checksum."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MessageError(f"{path}: cannot be read ({exc.strerror})") from None
    if not data.startswith(MAGIC) or b"\n" not in data[len(MAGIC):]:
        raise MessageError(f"{path.name}: not a dcr PSI message (it must start with {MAGIC!r})")
    line, body = data[len(MAGIC):].split(b"\n", 1)
    try:
        header = json.loads(line)
    except ValueError:
        raise MessageError(f"{path.name}: the header line is not JSON") from None
    expected = {"kind": kind, "collaboration": collaboration, "party": party}
    for field, want in expected.items():
        if header.get(field) != want:
            raise MessageError(f"{path.name}: header {field} is {header.get(field)!r}, expected {want!r}")
    if request_id is not None and header.get("request_id") != request_id:
        raise MessageError(
            f"{path.name}: answers request {str(header.get('request_id'))[:16]}, not the current request {request_id[:16]} "
            "(the client's identities changed since; answer the new request)"
        )
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise MessageError(f"{path.name}: the body does not match its checksum (truncated or altered)")
    width = ELEMENT_BYTES + (TOKEN_BYTES if kind == "setup" else 0)
    count = int(header.get("count", -1))
    if len(body) != count * width:
        raise MessageError(f"{path.name}: {len(body)} body bytes for {count} records of {width} bytes")
    records = [body[i : i + width] for i in range(0, len(body), width)]
    if kind == "setup":
        tokens, elements = [r[:TOKEN_BYTES].hex() for r in records], [r[TOKEN_BYTES:] for r in records]
        if len(set(tokens)) != len(tokens):
            raise MessageError(f"{path.name}: a token appears twice")
    else:
        tokens, elements = [], records
    return Message(kind, collaboration, party, elements, tokens, str(header.get("request_id", "")), hashlib.sha256(data).hexdigest())


# --- keys --------------------------------------------------------------------------------


def generate_keys(path: Path) -> HomeKeys:
    """Create a key file readable by its owner only; refuses to overwrite one."""
    keys = HomeKeys(os.urandom(32), psi.new_key())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"hmac_key": keys.hmac_key.hex(), "psi_key": keys.psi_key.hex()}, fh)
        fh.write("\n")
    return keys


def load_keys(path: Path) -> HomeKeys:
    try:
        data = json.loads(path.read_text())
        return HomeKeys(bytes.fromhex(data["hmac_key"]), bytes.fromhex(data["psi_key"]))
    except OSError as exc:
        raise MessageError(f"{path}: cannot be read ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise MessageError(f"{path}: not a key file written by `dcr psi keygen`") from None


def operator_key(pairing_key: bytes, collaboration: str, party: str, request_id: str) -> bytes:
    """The operator's client key for one request, derived so that no key file is kept (a valid scalar)."""
    for counter in range(256):
        candidate = hmac.new(pairing_key, f"dcr-home-psi\0{collaboration}\0{party}\0{request_id}\0{counter}".encode(), hashlib.sha256).digest()
        try:
            psi.blind(candidate, ["probe"])
            return candidate
        except RuntimeError:
            continue
    raise RuntimeError("could not derive a PSI key")  # pragma: no cover - probability 2**-8192


# --- the elliptic-curve work, on every core ------------------------------------------------


def _parallel(fn: Callable[[bytes, Sequence[Any]], list[bytes]], key: bytes, seq: Sequence[Any], workers: int | None) -> list[bytes]:
    lanes = max(1, min(workers or os.cpu_count() or 1, len(seq) // (PARALLEL_FROM // 2) or 1))
    if lanes == 1 or len(seq) < PARALLEL_FROM:
        return fn(key, seq)
    with worker_pool(lanes) as pool:
        return map_chunks(pool, fn, key, seq, lanes)


def blind_all(key: bytes, items: Sequence[str], workers: int | None = None) -> list[bytes]:
    return _parallel(psi.blind, key, list(items), workers)


def reblind_all(key: bytes, elements: Sequence[bytes], workers: int | None = None) -> list[bytes]:
    return _parallel(psi.reblind, key, list(elements), workers)


# --- the operator's side -------------------------------------------------------------------


def request_id(collaboration: str, party: str, client_identifiers: Sequence[str]) -> str:
    """Names the client set a request is about; a new client set needs a new answer."""
    digest = hashlib.sha256(f"dcr-home-psi-request\0{collaboration}\0{party}\0v1\0".encode())
    for identifier in client_identifiers:
        digest.update(identifier.encode("utf-8") + b"\n")
    return digest.hexdigest()


def client_request(collaboration: str, party: str, client_identifiers: Sequence[str], pairing_key: bytes, workers: int | None = None) -> Message:
    rid = request_id(collaboration, party, client_identifiers)
    key = operator_key(pairing_key, collaboration, party, rid)
    return Message("request", collaboration, party, blind_all(key, client_identifiers, workers), [], rid)


def complete(setup: Message, response: Message, pairing_key: bytes, client_count: int, workers: int | None = None) -> HomeMatch:
    """The home party's token for each client item it also holds (index into the request's items)."""
    if len(response.elements) != client_count:
        raise MessageError(f"response of {setup.party}: {len(response.elements)} elements for a request of {client_count}")
    key = operator_key(pairing_key, setup.collaboration, setup.party, response.request_id)
    theirs = dict(zip(reblind_all(key, setup.elements, workers), setup.tokens, strict=False))
    found = {i: theirs[e] for i, e in enumerate(response.elements) if e in theirs}
    return HomeMatch(setup.party, setup.tokens, found, setup.sha256)


# --- the home party's side ------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDataset:
    dataset: str
    source: Path
    output: Path
    rows_in: int
    rows_out: int
    rejected: dict[str, int]  # reason -> rows dropped (the matching column could not be normalised)


def prepare(
    loaded: Any, party: str, keys: HomeKeys, files: Mapping[str, Path], out_dir: Path, workers: int | None = None
) -> tuple[list[PreparedDataset], Path]:
    """Tokenise the party's upload files and write its setup message; nothing leaves the party's machine."""
    import pandas as pd

    from .dbt_codegen import identifier_options, matching_column

    c = loaded.name
    owned = {name: ds for name, ds in loaded.collaboration.datasets.items() if ds.owner == party}
    unknown = sorted(set(files) - set(owned))
    if unknown:
        raise MessageError(f"{party} owns no dataset {unknown[0]!r} in {c} (its datasets: {', '.join(sorted(owned))})")
    missing = sorted(set(owned) - set(files))
    if missing:
        raise MessageError(f"no file given for {party}'s dataset {missing[0]!r} (--dataset {missing[0]}=PATH)")
    people: dict[str, str] = {}
    prepared = []
    for name, path in sorted(files.items()):
        ds = owned[name]
        fmt = ds.format
        if fmt.type == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=fmt.delimiter, quotechar=fmt.quote, encoding=fmt.encoding)
        elif fmt.type == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_parquet(path)
        match_col = matching_column(loaded, ds)
        keep = [True] * len(frame)
        rejected: dict[str, int] = {}
        for col, spec in ds.identifier_columns.items():
            if col not in frame.columns:
                raise MessageError(f"{path.name}: no column {col!r} (dataset {name} declares it)")
            options = identifier_options(loaded, spec.identifier.value)
            out_col = []
            for i, raw in enumerate(frame[col].tolist()):
                value, reason = normalise(None if raw is None or (isinstance(raw, float) and raw != raw) else str(raw), spec.identifier.value, options)
                if value is None:
                    out_col.append("")
                    if col == match_col:
                        keep[i] = False
                        rejected[reason or "invalid"] = rejected.get(reason or "invalid", 0) + 1
                    continue
                tok = token(keys.hmac_key, value)
                out_col.append(tok)
                if col == match_col:
                    people[tok] = value
            frame[col] = out_col
        kept = frame[keep]
        invalid = sum(rejected.values()) - (rejected.get("missing", 0) if ds.columns[match_col].nullable else 0)
        allowed = ds.columns[match_col].max_invalid_fraction
        if len(frame) and invalid / len(frame) > allowed:
            raise MessageError(
                f"{path.name}: {invalid} of {len(frame)} rows have an invalid {match_col} ({invalid / len(frame):.2%}, "
                f"the contract allows {allowed:.2%}); nothing written"
            )
        output = out_dir / f"{name}{'.csv' if fmt.type == 'csv' else '.jsonl' if fmt.type == 'jsonl' else '.parquet'}"
        output.parent.mkdir(parents=True, exist_ok=True)
        if fmt.type == "csv":
            kept.to_csv(output, index=False, sep=fmt.delimiter, quotechar=fmt.quote, encoding=fmt.encoding)
        elif fmt.type == "jsonl":
            kept.to_json(output, orient="records", lines=True, force_ascii=False)
        else:
            kept.to_parquet(output, index=False)
        prepared.append(PreparedDataset(name, path, output, len(frame), len(kept), rejected))
    tokens = sorted(people)  # token order: random-looking, says nothing about the input order
    elements = blind_all(keys.psi_key, [people[t] for t in tokens], workers)
    setup = write_message(out_dir / f"{party}-setup{SUFFIX}", Message("setup", c, party, elements, tokens))
    return prepared, setup


def respond(keys: HomeKeys, request_path: Path, collaboration: str, party: str, out_dir: Path, workers: int | None = None) -> Path:
    """Answer the operator's request with this party's key: H(x)^a -> H(x)^ab, same order."""
    request = read_message(request_path, "request", collaboration, party)
    answered = reblind_all(keys.psi_key, request.elements, workers)
    name = f"{party}-response-{request.request_id[:16]}{SUFFIX}"
    return write_message(out_dir / name, Message("response", collaboration, party, answered, [], request.request_id))
