"""Is the data at rest what the manifest says?

A manifest row names a sample in a shard: at its byte span (``offset``, ``size``), made of
members named ``KEY.<suffix>`` with its image among them, the image's bytes hashing to
``content_sha256``. Disks rot, uploads get cut, shards get deleted by hand; nothing else
notices. Two checks hold the rule:

* :func:`check_sample`: one sample as the stream reads it for training or evaluation
  (``pneumo.shards.stream.read_shard``): its members fill its span and its image hashes to
  the row's ``content_sha256``. The hash costs a small fraction of decoding the same image
  (``benchmarks/bench_hash.py`` measures it).
* :func:`verify`: every row of a dataset, nothing decoded (``pneumo verify``): the shard
  exists, the sample lies within it, the tar headers at its offset name members of its key,
  the image member is there; ``deep`` also hashes the image. Each shard is read once, front
  to back (a local file seeks past what it does not need; an S3 object is one GET); a row
  whose check fails becomes a :class:`Problem`, the walk goes on.

Rows without a span (schema 1) are checked by streaming their shard and finding their
members by key. A store that cannot be read (endpoint gone, access denied) is not a
problem of the data: it raises, as everywhere else.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from pneumo.shards import tario
from pneumo.shards.errors import IntegrityError
from pneumo.shards.members import IMAGE_SUFFIXES, SUFFIX_OF_FORMAT
from pneumo.shards.store import Store

if TYPE_CHECKING:
    from pneumo.shards.slots import Entry

log = logging.getLogger(__name__)

VERIFY_HINT = "run `pneumo verify DATASET` to list every damaged sample"
_SKIP_CHUNK = 1 << 20

Progress = Callable[[int, int], None]  # (samples checked, samples in all)


# ---------------------------------------------------------------- one sample, as it is read


def check_sample(url: str, entry: Entry, sample: dict[str, Any]) -> None:
    """Check one sample read from shard ``url`` against its manifest row ``entry``.

    Its members must fill the row's span exactly (headers and padding included: a sample cut
    at a member boundary loses a whole member, its mask say, not bytes), and its image member
    (``jpg``, ``png`` or ``npy.gz``: :data:`pneumo.shards.members.IMAGE_SUFFIXES`) must hash
    to the row's ``content_sha256``. A row without a span or a hash (schema 1) skips that part.

    Raises:
        IntegrityError: one line naming the shard and the key.
    """
    found = {k: v for k, v in sample.items() if not k.startswith("_")}
    if entry.size is not None:
        stored = sum(stored_size(len(data)) for data in found.values())
        if stored != entry.size:
            raise IntegrityError(
                f"{url}: sample {entry.key} is incomplete: its members ({', '.join(sorted(found))})"
                f" fill {stored} of its {entry.size} bytes: {VERIFY_HINT}"
            )
    if entry.content_sha256 is None:
        return
    image = next((found[s] for s in IMAGE_SUFFIXES if s in found), None)
    if image is None:
        raise IntegrityError(f"{url}: sample {entry.key} has no image member: {VERIFY_HINT}")
    digest = hashlib.sha256(image).hexdigest()
    if digest != entry.content_sha256:
        raise IntegrityError(
            f"{url}: sample {entry.key}: its image's sha256 {digest[:16]}... is not the "
            f"manifest's {entry.content_sha256[:16]}... (the stored bytes changed): {VERIFY_HINT}"
        )


def check_delivered(entries: Sequence[Entry], keys: Sequence[str], what: str) -> None:
    """Check that a finite read (``what``: an evaluation) delivered each of ``entries``, its
    selection, exactly once; ``keys`` are the samples it got.

    Raises:
        IntegrityError: a sample never came (the first is named, with its shard), or came twice.
    """
    selected, got = Counter(e.key for e in entries), Counter(keys)
    missing, extra = selected - got, got - selected
    if missing:
        first = min((e for e in entries if e.key in missing), key=lambda e: (e.shard, e.key))
        more = sum(missing.values()) - 1
        raise IntegrityError(
            f"{what} got {len(keys)} of its {len(entries)} selected images: sample {first.key} "
            f"of {first.shard}{f' (and {more} more)' if more else ''} never came: {VERIFY_HINT}"
        )
    if extra:
        raise IntegrityError(
            f"{what} got {len(keys)} images for its {len(entries)} selected: sample "
            f"{min(extra)} came more than once"
        )


def stored_size(n: int) -> int:
    """Bytes a member of ``n`` data bytes takes in a tar: its header, its data, padding."""
    return tarfile.BLOCKSIZE + n + (-n % tarfile.BLOCKSIZE)


# ---------------------------------------------------------------- every row of a dataset


@dataclass(frozen=True)
class Problem:
    """A manifest row whose sample is not as the row says."""

    shard: str
    key: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` checked and found."""

    samples: int
    shards: int
    deep: bool
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_list(self) -> list[dict[str, str]]:
        return [asdict(p) for p in self.problems]


class _Row(NamedTuple):
    key: str
    shard: str
    offset: int | None
    size: int | None
    content_sha256: str | None
    image_format: str | None


_COLUMNS = list(_Row._fields)


def verify(store: Store, *, deep: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check every manifest row of the dataset in ``store`` against its shard.

    ``deep`` also hashes each image member against ``content_sha256``. ``progress(done,
    total)`` is called after each shard.

    Raises:
        ManifestError: ``store`` is not a dataset, or its manifest cannot be read.
        StoreError: a shard cannot be read (the store, not the data).
    """
    from pneumo.shards import manifest  # pyarrow and the table format: only where verified

    table = manifest.read(store, columns=_COLUMNS)
    rows = [_Row(*r) for r in zip(*(table.column(c).to_pylist() for c in _COLUMNS), strict=True)]
    grouped: dict[str, list[_Row]] = {}
    for row in sorted(rows, key=lambda r: (r.shard, r.offset is None, r.offset or 0, r.key)):
        grouped.setdefault(row.shard, []).append(row)
    problems: list[Problem] = []
    done = 0
    for shard, shard_rows in grouped.items():
        problems += _check_shard(store, shard, shard_rows, deep)
        done += len(shard_rows)
        if progress is not None:
            progress(done, len(rows))
    log.info(
        "verified %d samples in %d shards: %d problems", len(rows), len(grouped), len(problems)
    )
    return VerifyReport(samples=len(rows), shards=len(grouped), deep=deep, problems=tuple(problems))


def _check_shard(store: Store, shard: str, rows: list[_Row], deep: bool) -> list[Problem]:
    if not store.exists(shard):
        return [Problem(shard, r.key, "the shard does not exist") for r in rows]
    spanned = [r for r in rows if r.offset is not None and r.size is not None]
    unspanned = [r for r in rows if r.offset is None or r.size is None]
    problems = _check_streamed(store, shard, unspanned, deep)
    if not spanned:
        return problems
    with closing(store.open_read(shard)) as stream:
        cursor = _Cursor(stream)
        before: _Row | None = None
        for row in spanned:
            if before is not None and row.offset < before.offset + before.size:  # type: ignore[operator]
                reason = f"its bytes overlap those of sample {before.key}"
            else:
                reason = _check_span(cursor, row, deep)
                before = row
            if reason is not None:
                problems.append(Problem(shard, row.key, reason))
    return problems


def _check_span(cursor: _Cursor, row: _Row, deep: bool) -> str | None:
    """Why the sample at ``row``'s span is not ``row``'s, or None when it is."""
    offset, end = row.offset or 0, (row.offset or 0) + (row.size or 0)
    if not cursor.skip_to(offset):
        return _cut(cursor, offset, end)
    image_suffix = SUFFIX_OF_FORMAT.get(row.image_format or "")
    suffixes: list[str] = []
    digest = None
    while cursor.pos < end:
        at = cursor.pos
        header = cursor.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            return _cut(cursor, offset, end)
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            return f"no tar header at byte {at} ({e})"
        key, suffix = tario._split_name(info.name)  # the stream's own reading of a name
        if key != row.key or not info.isreg():
            return f"byte {at} holds member {info.name!r}, not a file of this sample"
        member_end = at + stored_size(info.size)
        if member_end > end:
            return f"member {info.name} runs past the end of the sample (byte {end})"
        wanted = suffix == image_suffix or (image_suffix is None and suffix in IMAGE_SUFFIXES)
        if deep and wanted and digest is None:
            data = cursor.read(info.size)
            if len(data) < info.size:
                return _cut(cursor, offset, end)
            digest = hashlib.sha256(data).hexdigest()
        if not cursor.skip_to(member_end):
            return _cut(cursor, offset, end)
        suffixes.append(suffix)
    return _image_problem(row, suffixes, digest, deep)


def _cut(cursor: _Cursor, offset: int, end: int) -> str:
    return (
        f"the shard ends at byte {cursor.pos}, before the end of the sample (bytes {offset}-{end})"
    )


def _image_problem(row: _Row, suffixes: list[str], digest: str | None, deep: bool) -> str | None:
    """Why the members found for ``row`` lack its image or its bytes, or None."""
    image_suffix = SUFFIX_OF_FORMAT.get(row.image_format or "")
    if image_suffix not in suffixes and not (
        image_suffix is None and set(IMAGE_SUFFIXES) & set(suffixes)
    ):
        members = ", ".join(f"{row.key}.{s}" for s in suffixes) or "none"
        wanted = image_suffix or "|".join(IMAGE_SUFFIXES)
        return f"no image member {row.key}.{wanted} (members: {members})"
    if deep and row.content_sha256 is not None and digest != row.content_sha256:
        return (
            f"the image's sha256 {str(digest)[:16]}... is not content_sha256 "
            f"{row.content_sha256[:16]}... (its bytes changed)"
        )
    return None


def _check_streamed(store: Store, shard: str, rows: list[_Row], deep: bool) -> list[Problem]:
    """Rows without a span (schema 1): the shard streamed, their members found by key."""
    if not rows:
        return []
    wanted = {r.key: r for r in rows}
    suffixes: dict[str, list[str]] = {}
    digests: dict[str, str] = {}
    broken = None
    try:
        with closing(store.open_read(shard)) as stream:
            for key, suffix, data in tario.members(stream, wanted if deep else ()):
                if key in wanted:
                    suffixes.setdefault(key, []).append(suffix)
                    if data is not None and suffix in IMAGE_SUFFIXES and key not in digests:
                        digests[key] = hashlib.sha256(data).hexdigest()
    except tarfile.TarError as e:
        broken = f"not found before the shard ends or breaks ({e})"
    problems = []
    for row in rows:
        if row.key not in suffixes:
            reason: str | None = broken or "not in the shard"
        else:
            reason = _image_problem(row, suffixes[row.key], digests.get(row.key), deep)
        if reason is not None:
            problems.append(Problem(shard, row.key, reason))
    return problems


class _Cursor:
    """A shard read front to back. Skipping seeks where the stream can (a local file) and
    reads past the bytes where it cannot (an S3 GET)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.pos = stream, 0
        self.size: int | None = None
        if stream.seekable():
            self.size = stream.seek(0, io.SEEK_END)
            stream.seek(0)

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the shard."""
        parts = _read_up_to(self.stream, n)
        self.pos += sum(len(p) for p in parts)
        return b"".join(parts)

    def skip_to(self, offset: int) -> bool:
        """Move forward to ``offset``; False when the shard ends before it (``pos``: its end)."""
        if self.size is not None:
            self.pos = min(max(offset, self.pos), self.size)
            self.stream.seek(self.pos)
            return offset <= self.size
        while self.pos < offset:
            data = self.stream.read(min(offset - self.pos, _SKIP_CHUNK))
            if not data:
                return False
            self.pos += len(data)
        return True


def _read_up_to(stream: IO[bytes], n: int) -> Iterable[bytes]:
    """Reads until ``n`` bytes or the end: a raw stream may return fewer bytes than asked."""
    parts, left = [], n
    while left > 0:
        data = stream.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return parts
