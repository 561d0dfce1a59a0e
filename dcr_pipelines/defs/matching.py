"""Matching: the cross-reference asset (PSI, parties at home, the overlap release) and the optional bucket steps."""

import hashlib
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import home_psi, identity_graph, matching, naming, psi_epoch
from ..lib.database import advisory_lock
from ..lib.policy import LoadedCollaboration
from ..services.release import release_overlap
from ..store import approvals as store_approvals
from ..store import builder, ledger, open_connection
from ..store import matching as store_matching
from .ad_hoc import tag_outcome
from .common import PSI_FOLDER, _audit_metadata, landing_folder
from .resources import SecretsResource, WarehouseResource


def _sealed(warehouse: WarehouseResource, loaded: LoadedCollaboration) -> None:
    with open_connection(warehouse.url) as conn:
        try:
            builder.verify(conn, loaded)
        except builder.BuilderTampered as exc:
            raise dg.Failure(str(exc)) from None


def _matching_code_version(loaded: LoadedCollaboration) -> str:
    """What decides the matching besides its inputs: the identity kind and the matching spec of the policy."""
    spec = loaded.collaboration.identity.model_dump_json() + loaded.collaboration.matching.model_dump_json()
    if loaded.graph_matching():  # the sets of parties that get a cross-reference
        spec += repr(loaded.overlaps())
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _bucket_asset(loaded: LoadedCollaboration, bucket: int) -> dg.AssetsDefinition:
    """One hash bucket of the PSI as its own step, so a distributed executor can run buckets on different workers."""
    c = loaded.name
    client = loaded.matching_client()
    at_operator = [client] + [p for p in loaded.parties() if not loaded.at_home(p) and p != client]
    buckets = loaded.collaboration.matching.buckets

    @dg.asset(
        key=naming.bucket_key(c, bucket),
        code_version=_matching_code_version(loaded),
        deps=[dg.AssetKey(naming.identities_key(c, p)) for p in at_operator],
        group_name=c,
        kinds={"postgres", "python"},
        tags={"dcr/stage": "matching", "dcr/bucket": str(bucket)},
        owners=["team:operator"],
        description=f"PSI of bucket {bucket} of {buckets} ({', '.join(at_operator)}): the matched people's tokens, no match_id yet. "
        "Each bucket is its own step (matching.bucket_steps), so Celery or Kubernetes workers can share them.",
    )
    def bucket_step(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> dg.MaterializeResult:
        _sealed(warehouse, loaded)
        inputs = store_matching.read_identities(warehouse.url, loaded, at_operator, bucket)
        digest = matching.bucket_digest(inputs, client, buckets, bucket)
        columns = [naming.party_token_column(p) for p in at_operator]
        with warehouse.connect() as conn:
            previous = store_matching.bucket_build(conn, loaded, columns, bucket)
        if previous is not None and previous[0] == digest:
            context.log.info(f"bucket {bucket}: identities unchanged, no PSI work")
            return dg.MaterializeResult(metadata={"recomputed": False, "matched": dg.MetadataValue.int(previous[1])}, data_version=dg.DataVersion(digest))
        if len(inputs) == 1:  # only parties at home besides the client: their answer is applied when the buckets are assembled
            pairs: list[tuple[str, ...]] = [(t,) for t in inputs[0].tokens]
            exchanged = 0
        else:
            result = matching.match(inputs, client, buckets=1, workers=1)
            assert result.parties == tuple(at_operator)
            pairs, exchanged = [row[1:] for row in result.rows], result.bytes_exchanged
        with warehouse.connect() as conn:
            store_matching.write_bucket(conn, loaded, columns, bucket, pairs, digest, exchanged)
        context.log.info(f"bucket {bucket}: {len(pairs)} matched")
        return dg.MaterializeResult(
            metadata={"recomputed": True, "matched": dg.MetadataValue.int(len(pairs)), "bytes_exchanged": dg.MetadataValue.int(exchanged),
                      **{f"input_rows_{inp.party}": dg.MetadataValue.int(len(inp.tokens)) for inp in inputs}},
            data_version=dg.DataVersion(digest),
        )

    return bucket_step


def _stale_buckets(c: str, stale: list[int]) -> dg.Failure:
    return dg.Failure(
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


class WaitingForParty(Exception):
    """A party that keeps its identifiers at home has not sent its PSI message yet: matching waits, nothing fails."""

    def __init__(self, parties: list[str], message: str) -> None:
        super().__init__(message)
        self.parties = parties


def _home_inputs(loaded: LoadedCollaboration, landing: Path) -> dict[str, home_psi.Message]:
    """Each home party's newest setup message, from its landing folder's ``_psi`` directory."""
    c, out = loaded.name, {}
    for party in loaded.collaboration.matching.home_parties:
        folder = landing_folder(landing, c, party, PSI_FOLDER)
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
            raise dg.Failure(f"PSI message refused, previous cross-reference kept: {exc}") from None
    return out


def _home_matches(
    loaded: LoadedCollaboration, setups: Mapping[str, home_psi.Message], client_input: matching.PartyInput, pairing_key: bytes,
    landing: Path, exports: Path,
) -> list[home_psi.HomeMatch]:
    """Complete the match with each home party's answer to the current request, or write the request and wait for it."""
    c, out, waiting, parties = loaded.name, [], [], []
    for party, setup in setups.items():
        rid = home_psi.request_id(c, party, client_input.identifiers)
        response_path = landing_folder(landing, c, party, PSI_FOLDER) / f"{party}-response-{rid[:16]}{home_psi.SUFFIX}"
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
            raise dg.Failure(f"PSI message refused, previous cross-reference kept: {exc}") from None
    if waiting:
        raise WaitingForParty(parties, "waiting for the PSI answer of a party that keeps its identifiers at home (previous cross-reference kept). "
                              + "; ".join(waiting))
    return out


def _cross_reference_asset(loaded: LoadedCollaboration, landing: Path, exports: Path) -> dg.AssetsDefinition:
    c = loaded.name
    parties = loaded.parties()
    client = loaded.matching_client()
    at_operator = [client] + [p for p in parties if not loaded.at_home(p) and p != client]
    at_home = [p for p in parties if loaded.at_home(p)]
    home_deps = [naming.staging_key(c, name) for name, ds in loaded.collaboration.datasets.items() if ds.owner in at_home]

    bucket_keys = [naming.bucket_key(c, b) for b in range(loaded.collaboration.matching.buckets)] if loaded.collaboration.matching.bucket_steps else []

    @dg.asset(
        key=naming.cross_reference_key(c),
        code_version=_matching_code_version(loaded),
        deps=[dg.AssetKey(naming.identities_key(c, p)) for p in at_operator] + [dg.AssetKey(k) for k in home_deps + bucket_keys],
        group_name=c,
        kinds={"postgres", "python"},
        tags={"dcr/stage": "matching"},
        owners=["team:operator"],
        output_required=False,  # waiting for a home party's answer materializes nothing, and is not a failure
        description=f"Private set intersection (openmined-psi) of {', '.join(parties)}'s identifiers: "
        f"one random match_id per shared person with each party's token. {client} acts as PSI client."
        + (f" {', '.join(at_home)} keep their identifiers at home and answer with `dcr psi` message files." if at_home else ""),
    )
    def cross_reference(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> Iterator[Any]:
        _sealed(warehouse, loaded)  # the identity lists are the dbt login's models: nothing else of it runs as their readers
        with advisory_lock(warehouse.url, f"dcr-matching:{c}"):  # two runs at once: the second finds the identities matched
            try:
                result = _cross_reference(context, warehouse, secrets)
            except WaitingForParty as wait:
                context.log.info(f"{wait} The {c}__psi_answers sensor launches the pipeline when the file lands.")
                tag_outcome(context, "waiting")
                yield dg.AssetObservation(asset_key=context.asset_key, description=str(wait),
                                          metadata={"outcome": "waiting", "message": str(wait), "waiting_for": ", ".join(wait.parties)})
                return
        yield result

    def _cross_reference(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> dg.MaterializeResult:
        if loaded.graph_matching():
            return _graph_match(context, warehouse)
        setups = _home_inputs(loaded, landing)
        spec = loaded.collaboration.matching
        buckets = spec.buckets
        epoch_seconds = 0 if (spec.bucket_steps or spec.home_parties) else spec.key_epoch_seconds()
        with store_matching.identity_snapshot(warehouse.url, loaded, at_operator) as snapshot:
            # PSI in this step and bucket steps stream the identities bucket by bucket; a key epoch and home
            # parties work on every identity at once (see docs/operations.md, Scale).
            streamed = not (setups or epoch_seconds)
            if streamed:
                digest, counts = snapshot.digest(client)
                inputs: list[matching.PartyInput] = []
            else:
                inputs = snapshot.inputs()
                digest = matching.input_digest(inputs, client, buckets, [m.sha256 for m in setups.values()], spec.padding)
                counts = {inp.party: len(inp.tokens) for inp in inputs}
            with warehouse.connect() as conn:
                # Before anything else, so that it happens on unchanged identities too: an epoch whose time is up, or a
                # setting without epochs (key_epoch: run, bucket steps), deletes the kept keys and blinded values.
                store_matching.expire_epoch(conn, c, epoch_seconds)
                previous = store_matching.previous_match(conn, c)
            input_rows = {**{f"input_rows_{p}": dg.MetadataValue.int(n) for p, n in counts.items()},
                          **{f"input_rows_{p}": dg.MetadataValue.int(len(m.tokens)) for p, m in setups.items()}}
            if previous is not None and previous[0] == digest:
                context.log.info("identities unchanged since the last match: no PSI work, cross-reference and match_ids kept")
                return dg.MaterializeResult(
                    metadata={"recomputed": False, "matched": dg.MetadataValue.int(previous[1]), "input_digest": digest,
                              **input_rows, "policy_sha256": loaded.policy_sha256},
                    data_version=dg.DataVersion(digest),
                )
            epoch_metadata: dict[str, Any] = {"key_epoch": spec.key_epoch}
            if streamed:
                matched, written, exchanged, epoch_metadata["work_buckets"] = _match_streamed(context, warehouse, snapshot, counts, digest)
            else:
                client_input = next(inp for inp in inputs if inp.party == client)
                home = _home_matches(loaded, setups, client_input, secrets.pairing_key(c), landing, exports)
                if spec.bucket_steps:
                    with warehouse.connect() as conn:
                        result = _assemble_buckets(conn, loaded, inputs, home)
                elif epoch_seconds and not home:
                    result, epoch_metadata = _match_in_epoch(warehouse, inputs, epoch_seconds, spec.padding)
                else:
                    result = matching.match(inputs, client, buckets=buckets, padding=spec.padding, home=home)
                with warehouse.connect() as conn:
                    store_matching.write_cross_reference(conn, c, result, digest, client)
                matched, written, exchanged = result.matched, len(result.rows), result.bytes_exchanged
        with warehouse.connect() as conn:
            overlap = _release_overlap(context, conn, loaded, matched, digest)
        context.log.info(f"matched {matched} people across {len(parties)} parties")
        return dg.MaterializeResult(
            metadata={
                **input_rows,
                **overlap,
                "matched": dg.MetadataValue.int(matched),
                "cross_reference_rows": dg.MetadataValue.int(written),
                "recomputed": True,
                "input_digest": digest,
                "psi_client": client,
                "buckets": buckets,
                "home_parties": ", ".join(at_home) or "none",
                "bytes_exchanged": dg.MetadataValue.int(exchanged),
                **epoch_metadata,
                "policy_sha256": loaded.policy_sha256,
            },
            data_version=dg.DataVersion(digest),
        )

    def _graph_match(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        """Several identifiers or party subsets (lib/identity_graph.py): PSI per pair and kind, a cross-reference per set."""
        spec, identity = loaded.collaboration.matching, loaded.collaboration.identity
        kinds, overlaps = [k.value for k in identity.kinds], loaded.overlaps()
        records = store_matching.read_records(warehouse.url, loaded, parties)
        digest = identity_graph.digest(records, client, kinds, identity.rule, overlaps, spec.buckets)
        input_rows = {f"input_records_{r.party}": dg.MetadataValue.int(len(r.records)) for r in records}
        with warehouse.connect() as conn:
            previous = store_matching.previous_match(conn, c)
        if previous is not None and previous[0] == digest:
            context.log.info("identity records unchanged since the last match: no PSI work, cross-references and match_ids kept")
            return dg.MaterializeResult(
                metadata={"recomputed": False, "matched": dg.MetadataValue.int(previous[1]), "input_digest": digest, **input_rows,
                          "policy_sha256": loaded.policy_sha256},
                data_version=dg.DataVersion(digest),
            )
        result = identity_graph.match(records, overlaps, client, kinds, identity.rule, buckets=spec.buckets)
        with warehouse.connect() as conn:
            store_matching.write_overlaps(conn, loaded, result, digest)
            overlap = _release_overlap(context, conn, loaded, result.overlaps[parties].matched, digest)
        per_set = {f"matched{naming.overlap_suffix(s, parties) or '_all'}": dg.MetadataValue.int(o.matched) for s, o in result.overlaps.items()}
        linked = {f"linked_{x}_{y}_{k}": dg.MetadataValue.int(n) for (x, y, k), n in result.links.items()}
        context.log.info("matched " + ", ".join(f"{o.matched} people of {' and '.join(s)}" for s, o in result.overlaps.items()))
        return dg.MaterializeResult(
            metadata={**input_rows, **overlap, "matched": dg.MetadataValue.int(result.overlaps[parties].matched), **per_set, **linked,
                      "identity_rule": identity.rule, "identifier_kinds": ", ".join(kinds), "recomputed": True, "input_digest": digest,
                      "psi_client": client, "psi_jobs": dg.MetadataValue.int(result.psi_jobs),
                      "bytes_exchanged": dg.MetadataValue.int(result.bytes_exchanged), "policy_sha256": loaded.policy_sha256},
            data_version=dg.DataVersion(digest),
        )

    def _match_streamed(context: dg.AssetExecutionContext, warehouse: WarehouseResource, snapshot: store_matching.IdentitySnapshot,
                        counts: dict[str, int], digest: str) -> tuple[int, int, int, int]:
        """PSI bucket by bucket, each bucket's rows written as it finishes; the new cross-reference replaces the old one at the end.

        Returns (matched, rows written, bytes exchanged, buckets worked in). More buckets than the policy's when a
        party is large (the result is the same for any count), so no bucket holds more than about
        ``matching.BUCKET_IDENTITIES`` of a party's identities.
        """
        spec = loaded.collaboration.matching
        work = spec.buckets if spec.bucket_steps else matching.work_buckets(spec.buckets, max(counts.values(), default=0))
        matched = exchanged = 0
        with warehouse.connect() as conn, store_matching.replacing_cross_reference(conn, c, at_operator, client) as writer:
            parts = snapshot.buckets(work)
            done = (_stored_buckets(warehouse.url, loaded, at_operator, parts) if spec.bucket_steps
                    else matching.match_buckets(parts, at_operator, matching.lanes_for(work), spec.padding))
            try:
                for part in done:
                    writer.write(part.rows)
                    matched += part.matched
                    exchanged += part.bytes_exchanged
            finally:
                done.close()
                parts.close()
            store_matching.record_build(conn, c, digest, matched)
        context.log.info(f"{work} buckets, each written as it was {'assembled' if spec.bucket_steps else 'matched'}")
        return matched, writer.rows, exchanged, work

    def _match_in_epoch(warehouse: WarehouseResource, inputs: list[matching.PartyInput], seconds: int,
                        padding: bool) -> tuple[matching.MatchResult, dict[str, Any]]:
        """The match inside the current key epoch (a new one if it ended or the parties changed): only changed identities are blinded."""
        config = psi_epoch.config_of(inputs, client)
        with warehouse.connect() as conn:
            state = store_matching.load_epoch(conn, c, config, seconds)
            new = state is None
            if state is None:
                state = psi_epoch.new_state(inputs, client)
            result, change = psi_epoch.match_in_epoch(inputs, client, state, padding=padding)
            store_matching.save_epoch(conn, c, state, change, new)
        return result, {"key_epoch": loaded.collaboration.matching.key_epoch, "key_epoch_started": new,
                        "identities_blinded": dg.MetadataValue.int(change.blinded),
                        "scalar_multiplications": dg.MetadataValue.int(change.multiplications)}

    return cross_reference


def _release_overlap(context: dg.AssetExecutionContext, conn: Any, loaded: LoadedCollaboration, matched: int, digest: str) -> dict[str, Any]:
    """What the members learn of the overlap: nothing, or a DP count charged to the overlap account (withheld once it is spent)."""
    spec = loaded.collaboration.matching
    if spec.overlap_release == "withheld":
        return {"overlap_release": "withheld"}
    unapproved = store_approvals.unbacked(conn, loaded)  # how the overlap is released is part of what each party approves
    if unapproved:
        context.log.warning(f"overlap withheld: {unapproved[0]}")
        return {"overlap_release": f"withheld: {unapproved[0]}"}
    try:
        stored = release_overlap(conn, loaded, matched, digest, run_id=context.run.run_id)
    except ledger.BudgetExhausted as exc:
        context.log.warning(f"overlap withheld: {exc}")
        return {"overlap_release": "withheld: the overlap budget is spent"}
    if spec.overlap_release == "exact":
        return {"overlap_release": "exact", "overlap_release_id": stored.release_id, **_audit_metadata(stored)}
    return {"overlap_release": "dp", "overlap_release_id": stored.release_id, "overlap_epsilon_charged": 0.0 if stored.cached else stored.epsilon,
            "overlap_epsilon_remaining": stored.budget.remaining, **_audit_metadata(stored)}
