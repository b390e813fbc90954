"""The cache server's domain: sequences of tenants, their entries in the tier chain.

Primitives (called by the gRPC servicer, one per RPC, with the protobuf-free types of
`minicache_server.domain`; the servicer converts the messages):

- `begin_put(tenant, header, streamed) -> PutSession`, then, inside `with session:`,
  `PutSession.add_chunk(chunk)` per chunk and `PutSession.commit()`: a write from token 0
  (new, or replacing) or from the tokens held (an extension). Layers are encoded as they
  complete (a merged pair as soon as both layers are in, raw layers dropped) and each
  complete group is placed in the tier chain; nothing is visible before `commit`, and a
  failed or cancelled put leaves the sequence as it was. A header that declares more
  than every tier together can hold is refused at once, with the reason. A committed
  write sets the sequence's tag (opaque bytes, a label of its content) to the header's,
  empty clearing it; `lookup` returns it. A streamed put first waits its turn for the
  staging it needs (`reserve_staging`); an Append (`streamed=False`) takes what is free.
- `load_artifacts(tenant, header)`: before `begin_put`, read the calibration artifact
  the write's transform policy needs on a thread (`minicache_server.artifacts`); a
  policy whose artifact the server lacks or holds corrupt is refused by `begin_put`
  (FAILED_PRECONDITION, the hash in the message).
- `prefetch(tenant, query)`: async iterator of the answer's `SequenceHeader`, then
  `RestoredLayer`s or `StoredEntry`s.
- `lookup -> LookupResult`, `delete -> bool`, `stats -> StatsResult`; a commit's
  `put_result -> PutResult` (`minicache_client.results`, what the client gets too).
- `recover()`: at start, serve again what the persistent tiers still hold;
  `write_down(time_limit_s)`: at a graceful stop, move what lives only on the device to
  the persistent tier below it, so that the next start finds it.

Entries live in the tier chain (`minicache_server.tiers`: device -> disk -> Redis or a
prefix of it): a full tier demotes its least recently used entries of idle sequences
one tier down, freeing each only after the tier below acknowledged, and a read promotes
an entry back to the device. An entry that fails verification on its way back loses the
whole sequence: it is deleted and reads miss. Errors are the typed
`minicache_client.errors` classes; the servicer maps them to codes. Ids and tags arrive
checked (`minicache_client.protocol`'s rules, applied as the messages are converted);
policy text is checked here by the same rules.

Modules, in the order a request meets them:

| module | what it holds |
|---|---|
| `sequence_store.py` | `SequenceStore`: the sequences, the calls above, what the chain asks |
| `writes.py` | `PutSession` (staging, limits, placing groups) and the commits |
| `reads.py` | Prefetch and Lookup |
| `accounting.py` | one byte count per entry: sequences, tenants, quota, Stats, Put |
| `sequences.py` | `StoredSequence`, `Limits` |
| `manifest.py` | a sequence's manifest, kept beside its entries in persistent tiers |
| `recovery.py` | finding sequences again after a restart |
| `write_down.py` | a graceful stop moving device-only entries to a persistent tier |
"""

from minicache_server.store.sequence_store import SequenceStore
from minicache_server.store.sequences import Limits, StoredSequence
from minicache_server.store.writes import PutSession

__all__ = ["Limits", "PutSession", "SequenceStore", "StoredSequence"]
