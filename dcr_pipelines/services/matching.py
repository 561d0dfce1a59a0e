"""Matching, start to end, with no Dagster in it: the cross-reference and bucket assets (defs/matching.py) are its adapters.

:func:`cross_reference` builds the collaboration's cross-reference: the builder's identity tables checked untouched,
then under the collaboration's matching lock the identities read (streamed bucket by bucket where it can), no PSI
work when they are unchanged, else PSI in this process, in the bucket steps' results, inside a key epoch or with the
answers of parties that keep their identifiers at home; several identifiers or party subsets go through the identity
graph. Then what the members learn of the overlap. :func:`bucket_step` is one hash bucket's PSI as a step of its own.

Each way to stop is a value or one exception: :class:`Matched` (metadata for the event log, the data version),
:class:`WaitingForParty` (an expected outcome: a home party's message has not arrived, the previous cross-reference
stays) and :class:`MatchingFailed` (a failure of the run; the previous cross-reference stays).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lib import home_psi, identity_graph, matching, naming
from ..lib.database import advisory_lock
from ..lib.policy import LoadedCollaboration
from ..store import Connection, builder, ledger, open_connection
from ..store import approvals as store_approvals
from ..store import key_epoch as store_key_epoch
from ..store import matching as store_matching
from . import key_epoch
from ._log import Log
from .release import release_overlap


@dataclass(frozen=True)
class Matched:
    """A finished step: its metadata (plain values), its data version, and the overlap release it stored, if any."""

    metadata: dict[str, Any]
    digest: str
    overlap_release: ledger.StoredRelease | None = None


class MatchingFailed(Exception):
    """The step failed (a tampered table, a refused PSI message, a stale bucket): the previous cross-reference is kept."""


class WaitingForParty(Exception):
    """A party that keeps its identifiers at home has not sent its PSI message yet: matching waits, nothing fails."""

    def __init__(self, parties: list[str], message: str) -> None:
        super().__init__(message)
        self.parties = parties


Connect = Callable[[], AbstractContextManager[Connection]]


def at_operator(loaded: LoadedCollaboration) -> list[str]:
    """The parties whose identities the operator holds, the PSI client first."""
    client = loaded.matching_client()
    return [client] + [p for p in loaded.parties() if not loaded.at_home(p) and p != client]


def _sealed(url: str, loaded: LoadedCollaboration) -> None:
    with open_connection(url) as conn:
        try:
            builder.verify(conn, loaded)
        except builder.BuilderTampered as exc:
            raise MatchingFailed(str(exc)) from None


def bucket_step(loaded: LoadedCollaboration, bucket: int, *, url: str, connect: Connect, log: Log) -> Matched:
    """One hash bucket's PSI of the parties at the operator: the matched people's tokens, no match_id yet."""
    client, buckets, parties = loaded.matching_client(), loaded.collaboration.matching.buckets, at_operator(loaded)
    _sealed(url, loaded)
    inputs = store_matching.read_identities(url, loaded, parties, bucket)
    digest = matching.bucket_digest(inputs, client, buckets, bucket)
    columns = [naming.party_token_column(p) for p in parties]
    with connect() as conn:
        previous = store_matching.bucket_build(conn, loaded, columns, bucket)
    if previous is not None and previous[0] == digest:
        log.info(f"bucket {bucket}: identities unchanged, no PSI work")
        return Matched({"recomputed": False, "matched": previous[1]}, digest)
    if len(inputs) == 1:  # only parties at home besides the client: their answer is applied when the buckets are assembled
        pairs: list[tuple[str, ...]] = [(t,) for t in inputs[0].tokens]
        exchanged = 0
    else:
        result = matching.match(inputs, client, buckets=1, workers=1)
        assert result.parties == tuple(parties)
        pairs, exchanged = [row[1:] for row in result.rows], result.bytes_exchanged
    with connect() as conn:
        store_matching.write_bucket(conn, loaded, columns, bucket, pairs, digest, exchanged)
    log.info(f"bucket {bucket}: {len(pairs)} matched")
    return Matched({"recomputed": True, "matched": len(pairs), "bytes_exchanged": exchanged,
                    **{f"input_rows_{inp.party}": len(inp.tokens) for inp in inputs}}, digest)


def cross_reference(loaded: LoadedCollaboration, *, url: str, connect: Connect, pairing_key: Callable[[], bytes], landing: Path,
                    exports: Path, run_id: str, log: Log) -> Matched:
    """The collaboration's cross-reference (see the module's docstring); raises :class:`WaitingForParty` or :class:`MatchingFailed`."""
    _sealed(url, loaded)  # the identity lists are the dbt login's models: nothing else of it runs as their readers
    with advisory_lock(url, f"dcr-matching:{loaded.name}"):  # two runs at once: the second finds the identities matched
        if loaded.graph_matching():
            return _graph_match(loaded, url=url, connect=connect, run_id=run_id, log=log)
        return _Match(loaded, url, connect, log).run(pairing_key, landing, exports, run_id)


class _Match:
    """One collaboration's PSI match (one identifier kind, every party)."""

    def __init__(self, loaded: LoadedCollaboration, url: str, connect: Connect, log: Log) -> None:
        self.loaded, self.url, self.connect, self.log = loaded, url, connect, log
        self.c, self.client, self.parties = loaded.name, loaded.matching_client(), at_operator(loaded)

    def run(self, pairing_key: Callable[[], bytes], landing: Path, exports: Path, run_id: str) -> Matched:
        loaded, c, client, spec = self.loaded, self.c, self.client, self.loaded.collaboration.matching
        setups = _home_inputs(loaded, landing)
        epoch_seconds = 0 if (spec.bucket_steps or spec.home_parties) else spec.key_epoch_seconds()
        with store_matching.identity_snapshot(self.url, loaded, self.parties) as snapshot:
            # PSI in this step and bucket steps stream the identities bucket by bucket, a key epoch in token order;
            # home parties work on every identity at once (see docs/operations.md, Scale).
            streamed = not (setups or epoch_seconds)
            if not setups:
                digest, counts = snapshot.digest(client)
                inputs: list[matching.PartyInput] = []
            else:
                inputs = snapshot.inputs()
                digest = matching.input_digest(inputs, client, spec.buckets, [m.sha256 for m in setups.values()], spec.padding)
                counts = {inp.party: len(inp.tokens) for inp in inputs}
            with self.connect() as conn:
                # Before anything else, so that it happens on unchanged identities too: an epoch whose time is up, or a
                # setting without epochs (key_epoch: run, bucket steps), deletes the kept keys and blinded values.
                store_key_epoch.expire(conn, c, epoch_seconds)
                previous = store_matching.previous_match(conn, c)
            input_rows = {**{f"input_rows_{p}": n for p, n in counts.items()}, **{f"input_rows_{p}": len(m.tokens) for p, m in setups.items()}}
            if previous is not None and previous[0] == digest:
                self.log.info("identities unchanged since the last match: no PSI work, cross-reference and match_ids kept")
                return Matched({"recomputed": False, "matched": previous[1], "input_digest": digest, **input_rows,
                                "policy_sha256": loaded.policy_sha256}, digest)
            epoch_metadata: dict[str, Any] = {"key_epoch": spec.key_epoch}
            if streamed:
                matched, written, exchanged, epoch_metadata["work_buckets"] = self._streamed(snapshot, counts, digest)
            elif epoch_seconds:
                matched, written, exchanged, epoch_metadata = self._in_epoch(snapshot, epoch_seconds, digest)
            else:
                client_input = next(inp for inp in inputs if inp.party == client)
                home = _home_matches(loaded, setups, client_input, pairing_key(), landing, exports)
                if spec.bucket_steps:
                    with self.connect() as conn:
                        result = _assemble_buckets(conn, loaded, inputs, home)
                else:
                    result = matching.match(inputs, client, buckets=spec.buckets, padding=spec.padding, home=home)
                with self.connect() as conn:
                    store_matching.write_cross_reference(conn, c, result, digest, client)
                matched, written, exchanged = result.matched, len(result.rows), result.bytes_exchanged
        with self.connect() as conn:
            overlap, stored = _release_overlap(conn, loaded, matched, digest, run_id, self.log)
        self.log.info(f"matched {matched} people across {len(loaded.parties())} parties")
        at_home = [p for p in loaded.parties() if loaded.at_home(p)]
        return Matched({**input_rows, **overlap, "matched": matched, "cross_reference_rows": written, "recomputed": True,
                        "input_digest": digest, "psi_client": client, "buckets": spec.buckets, "home_parties": ", ".join(at_home) or "none",
                        "bytes_exchanged": exchanged, **epoch_metadata, "policy_sha256": loaded.policy_sha256}, digest, stored)

    def _streamed(self, snapshot: store_matching.IdentitySnapshot, counts: dict[str, int], digest: str) -> tuple[int, int, int, int]:
        """PSI bucket by bucket, each bucket's rows written as it finishes; the new cross-reference replaces the old one at the end.

        Returns (matched, rows written, bytes exchanged, buckets worked in). More buckets than the policy's when a
        party is large (the result is the same for any count), so no bucket holds more than about
        ``matching.BUCKET_IDENTITIES`` of a party's identities.
        """
        spec = self.loaded.collaboration.matching
        work = spec.buckets if spec.bucket_steps else matching.work_buckets(spec.buckets, max(counts.values(), default=0))
        matched = exchanged = 0
        with self.connect() as conn, store_matching.replacing_cross_reference(conn, self.c, self.parties, self.client) as writer:
            parts = snapshot.buckets(work)
            done = (_stored_buckets(self.url, self.loaded, self.parties, parts) if spec.bucket_steps
                    else matching.match_buckets(parts, self.parties, matching.lanes_for(work), spec.padding))
            try:
                for part in done:
                    writer.write(part.rows)
                    matched += part.matched
                    exchanged += part.bytes_exchanged
            finally:
                done.close()
                parts.close()
            store_matching.record_build(conn, self.c, digest, matched)
        self.log.info(f"{work} buckets, each written as it was {'assembled' if spec.bucket_steps else 'matched'}")
        return matched, writer.rows, exchanged, work

    def _in_epoch(self, snapshot: store_matching.IdentitySnapshot, seconds: int, digest: str) -> tuple[int, int, int, dict[str, Any]]:
        """The match inside the current key epoch (a new one if it ended or the parties changed): only changed
        identities are blinded, streamed in token order (services/key_epoch.py)."""
        spec = self.loaded.collaboration.matching
        servers = [p for p in self.parties if p != self.client]
        with self.connect() as conn:
            conn.execute("set work_mem = '64MB'")  # the join of the kept values
            done = key_epoch.match(conn, self.c, self.client, servers, snapshot.ordered, seconds=seconds, padding=spec.padding, digest=digest)
        self.log.info(f"key epoch: {done.blinded} identities blinded, {done.removed} kept values dropped")
        return done.matched, done.rows, done.bytes_exchanged, {
            "key_epoch": spec.key_epoch, "key_epoch_started": done.started, "identities_blinded": done.blinded,
            "scalar_multiplications": done.multiplications}


def _graph_match(loaded: LoadedCollaboration, *, url: str, connect: Connect, run_id: str, log: Log) -> Matched:
    """Several identifiers or party subsets (lib/identity_graph.py): PSI per pair and kind, a cross-reference per set."""
    c, parties, client = loaded.name, loaded.parties(), loaded.matching_client()
    spec, identity = loaded.collaboration.matching, loaded.collaboration.identity
    kinds, overlaps = [k.value for k in identity.kinds], loaded.overlaps()
    records = store_matching.read_records(url, loaded, parties)
    digest = identity_graph.digest(records, client, kinds, identity.rule, overlaps, spec.buckets)
    input_rows = {f"input_records_{r.party}": len(r.records) for r in records}
    with connect() as conn:
        store_key_epoch.expire(conn, c, 0)  # no key epochs with several identifiers: an earlier epoch's keys and values go
        previous = store_matching.previous_match(conn, c)
    if previous is not None and previous[0] == digest:
        log.info("identity records unchanged since the last match: no PSI work, cross-references and match_ids kept")
        return Matched({"recomputed": False, "matched": previous[1], "input_digest": digest, **input_rows,
                        "policy_sha256": loaded.policy_sha256}, digest)
    result = identity_graph.match(records, overlaps, client, kinds, identity.rule, buckets=spec.buckets)
    with connect() as conn:
        store_matching.write_overlaps(conn, loaded, result, digest)
        overlap, stored = _release_overlap(conn, loaded, result.overlaps[parties].matched, digest, run_id, log)
    per_set = {f"matched{naming.overlap_suffix(s, parties) or '_all'}": o.matched for s, o in result.overlaps.items()}
    linked = {f"linked_{x}_{y}_{k}": n for (x, y, k), n in result.links.items()}
    log.info("matched " + ", ".join(f"{o.matched} people of {' and '.join(s)}" for s, o in result.overlaps.items()))
    return Matched({**input_rows, **overlap, "matched": result.overlaps[parties].matched, **per_set, **linked,
                    "identity_rule": identity.rule, "identifier_kinds": ", ".join(kinds), "recomputed": True, "input_digest": digest,
                    "psi_client": client, "psi_jobs": result.psi_jobs, "bytes_exchanged": result.bytes_exchanged,
                    "policy_sha256": loaded.policy_sha256}, digest, stored)


def _stale_buckets(c: str, stale: list[int]) -> MatchingFailed:
    return MatchingFailed(
        f"bucket(s) {', '.join(map(str, stale[:10]))}{f' and {len(stale) - 10} more' if len(stale) > 10 else ''} were matched from other identities than the current ones; "
        f"materialize {', '.join('/'.join(naming.bucket_key(c, b)) for b in stale[:3])}{' ...' if len(stale) > 3 else ''} first (previous cross-reference kept)"
    )


def _assemble_buckets(conn: Any, loaded: LoadedCollaboration, inputs: list[matching.PartyInput], home: list[home_psi.HomeMatch]) -> matching.MatchResult:
    """The cross-reference from the bucket steps' matches and the home parties' answers (every identity at once)."""
    c, buckets = loaded.name, loaded.collaboration.matching.buckets
    client = loaded.matching_client()
    columns = [naming.party_token_column(inp.party) for inp in inputs]
    stored = store_matching.bucket_builds(conn, loaded, columns)
    expected = {b: matching.bucket_digest(part, client, buckets, b) for b, part in enumerate(matching.split(inputs, buckets))}
    stale = [b for b in range(buckets) if stored.get(b, ("", 0))[0] != expected[b]]
    if stale:
        raise _stale_buckets(c, stale)
    pairs, exchanged = store_matching.bucket_pairs(conn, loaded, columns)
    client_input = inputs[0]
    home_by_token = [{client_input.tokens[i]: tok for i, tok in h.by_client_index.items()} for h in home]
    matched = [(*pair, *(m[pair[0]] for m in home_by_token)) for pair in pairs if all(pair[0] in m for m in home_by_token)]
    parties = (*(inp.party for inp in inputs), *(h.party for h in home))
    rows = matching.assemble(parties, matched, [*(inp.tokens for inp in inputs), *(h.tokens for h in home)], loaded.collaboration.matching.padding)
    counts = {inp.party: len(inp.identifiers) for inp in inputs} | {h.party: len(h.tokens) for h in home}
    return matching.MatchResult(parties, rows, counts, exchanged, len(matched))


def _stored_buckets(url: str, loaded: LoadedCollaboration, parties: list[str],
                    parts: Iterator[tuple[int, list[matching.PartyInput]]]) -> Generator[matching.BucketMatch]:
    """The bucket steps' matches a bucket at a time, each checked against its bucket of the current identities first.

    A bucket matched from other identities fails the step once every bucket is checked (all stale ones are named),
    and nothing of the new cross-reference is kept.
    """
    c, buckets, client = loaded.name, loaded.collaboration.matching.buckets, loaded.matching_client()
    columns = [naming.party_token_column(p) for p in parties]
    with open_connection(url) as conn:
        built = store_matching.bucket_builds(conn, loaded, columns)
    stored = store_matching.stream_bucket_pairs(url, loaded, columns)
    head = next(stored, None)
    stale: list[int] = []
    for bucket, part in parts:
        pairs: list[tuple[str, ...]] = []
        if head is not None and head[0] == bucket:
            pairs, head = head[1], next(stored, None)
        digest, exchanged = built.get(bucket, ("", 0))
        if digest != matching.bucket_digest(part, client, buckets, bucket):
            stale.append(bucket)
        if not stale:
            rows = matching.assemble(parties, pairs, [inp.tokens for inp in part], loaded.collaboration.matching.padding)
            yield matching.BucketMatch(bucket, rows, len(pairs), exchanged)
    stored.close()
    if stale:
        raise _stale_buckets(c, stale)


def _home_inputs(loaded: LoadedCollaboration, landing: Path) -> dict[str, home_psi.Message]:
    """Each home party's newest setup message, from its landing folder's ``_psi`` directory."""
    c, out = loaded.name, {}
    for party in loaded.collaboration.matching.home_parties:
        folder = naming.landing_folder(landing, c, party, naming.PSI_FOLDER)
        found = sorted(folder.glob(f"*setup*{home_psi.SUFFIX}"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []
        if not found:
            raise WaitingForParty(
                [party],
                f"waiting for {party}'s PSI setup message: {party} runs `dcr psi prepare {c} --member {party} ...` on its own machine "
                f"and puts {party}-setup{home_psi.SUFFIX} into {folder}",
            )
        try:
            out[party] = home_psi.read_message(found[-1], "setup", c, party)
        except home_psi.MessageError as exc:
            raise MatchingFailed(f"PSI message refused, previous cross-reference kept: {exc}") from None
    return out


def _home_matches(
    loaded: LoadedCollaboration, setups: Mapping[str, home_psi.Message], client_input: matching.PartyInput, pairing_key: bytes,
    landing: Path, exports: Path,
) -> list[home_psi.HomeMatch]:
    """Complete the match with each home party's answer to the current request, or write the request and wait for it."""
    c, out, waiting, parties = loaded.name, [], [], []
    for party, setup in setups.items():
        rid = home_psi.request_id(c, party, client_input.identifiers)
        response_path = naming.landing_folder(landing, c, party, naming.PSI_FOLDER) / f"{party}-response-{rid[:16]}{home_psi.SUFFIX}"
        if not response_path.exists():
            request_path = exports / c / party / "psi" / f"{party}-request-{rid[:16]}{home_psi.SUFFIX}"
            if not request_path.exists():
                home_psi.write_message(request_path, home_psi.client_request(c, party, client_input.identifiers, pairing_key))
            parties.append(party)
            waiting.append(
                f"{party}: give it {request_path}; it runs `dcr psi respond {c} --member {party} --key KEYFILE --request {request_path.name}` "
                f"at home and puts the answer into {response_path.parent}/"
            )
            continue
        try:
            response = home_psi.read_message(response_path, "response", c, party, request_id=rid)
            out.append(home_psi.complete(setup, response, pairing_key, len(client_input.identifiers)))
        except home_psi.MessageError as exc:
            raise MatchingFailed(f"PSI message refused, previous cross-reference kept: {exc}") from None
    if waiting:
        raise WaitingForParty(parties, "waiting for the PSI answer of a party that keeps its identifiers at home (previous cross-reference kept). "
                              + "; ".join(waiting))
    return out


def _release_overlap(conn: Any, loaded: LoadedCollaboration, matched: int, digest: str, run_id: str,
                     log: Log) -> tuple[dict[str, Any], ledger.StoredRelease | None]:
    """What the members learn of the overlap: nothing, or a DP count charged to the overlap account (withheld once it is spent)."""
    spec = loaded.collaboration.matching
    if spec.overlap_release == "withheld":
        return {"overlap_release": "withheld"}, None
    unapproved = store_approvals.unbacked(conn, loaded)  # how the overlap is released is part of what each party approves
    if unapproved:
        log.warning(f"overlap withheld: {unapproved[0]}")
        return {"overlap_release": f"withheld: {unapproved[0]}"}, None
    try:
        stored = release_overlap(conn, loaded, matched, digest, run_id=run_id)
    except ledger.BudgetExhausted as exc:
        log.warning(f"overlap withheld: {exc}")
        return {"overlap_release": "withheld: the overlap budget is spent"}, None
    if spec.overlap_release == "exact":
        return {"overlap_release": "exact", "overlap_release_id": stored.release_id}, stored
    return {"overlap_release": "dp", "overlap_release_id": stored.release_id, "overlap_epsilon_charged": 0.0 if stored.cached else stored.epsilon,
            "overlap_epsilon_remaining": stored.budget.remaining}, stored
