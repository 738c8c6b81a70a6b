"""tario.members, the training stream's own tar parser, against the standard library's
``tarfile`` on the same bytes: the same members, and the same outcome (an error, or a
quiet end) wherever the stream is cut or a byte is damaged.

The parser handles plain USTAR members (what ShardWriter writes) and hands anything else
to tarfile, so the archives here mix both: ShardWriter shards, tarfile's USTAR, GNU and
PAX archives with long and non-ASCII names, directories, empty members."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumo.shards import tario

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)

names = st.one_of(
    st.sampled_from(["a", "k1", "dir/k2", "ünï"]),
    st.text("abc./", min_size=1, max_size=8).filter(lambda n: not n.startswith("/")),
    st.just("x" * 120),  # longer than a USTAR name: a PAX or GNU header
)


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for _ in range(draw(st.integers(0, 4))):
            name = draw(names) + draw(st.sampled_from([".jpg", ".json", ".mask.png", ""]))
            if fmt == tarfile.USTAR_FORMAT and len(name.encode()) > 100:
                name = name[:90]
            if draw(st.booleans()) and fmt != tarfile.USTAR_FORMAT:
                info = tarfile.TarInfo(name + "_dir")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            data = draw(st.binary(max_size=1100))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def outcome(parse, data: bytes, keys) -> tuple[list, str | None]:
    got: list = []
    try:
        for member in parse(io.BytesIO(data), keys):
            got.append(member)
    except tarfile.TarError as e:
        return got, type(e).__name__
    return got, None


class Everything:
    def __contains__(self, key: object) -> bool:
        return True


@PROPERTY
@given(archives(), st.data())
def test_members_read_what_tarfile_reads_whole_cut_or_damaged(
    data: bytes, draw: st.DataObject
) -> None:
    keys = Everything() if draw.draw(st.booleans()) else {"a", "k1"}
    assert outcome(tario.members, data, keys) == outcome(tario._tarfile_members, data, keys)
    cut = draw.draw(st.integers(0, len(data)), label="cut at")
    assert outcome(tario.members, data[:cut], keys) == outcome(
        tario._tarfile_members, data[:cut], keys
    )


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["k1", "k2", "k3"]), st.binary(max_size=900)),
                min_size=1, max_size=4), st.data())  # fmt: skip
def test_members_of_a_shard_writer_run_match_tarfile_at_any_cut(
    samples: list[tuple[str, bytes]], draw: st.DataObject
) -> None:
    """A ranged read of ShardWriter samples has no end-of-archive blocks; cut anywhere,
    or with one byte changed, both parsers agree."""
    data = b"".join(
        tario.member_header(f"{key}.{i}.bin", len(body)) + body + bytes(-len(body) % 512)
        for i, (key, body) in enumerate(samples)
    )
    cut = draw.draw(st.integers(0, len(data)), label="cut at")
    keys = {"k1", "k3"}
    assert outcome(tario.members, data[:cut], keys) == outcome(
        tario._tarfile_members, data[:cut], keys
    )
    at = draw.draw(st.integers(0, len(data) - 1), label="damaged byte")
    damaged = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]
    assert outcome(tario.members, damaged, keys) == outcome(tario._tarfile_members, damaged, keys)


def test_an_empty_stream_is_not_a_tar() -> None:
    with pytest.raises(tarfile.ReadError):
        list(tario.members(io.BytesIO(b""), {"a"}))


def test_a_two_sample_run_cut_at_every_byte_reads_as_tarfile_reads_it() -> None:
    """Every cut of a ranged read (headers, data, padding of a wanted and an unwanted
    sample): the same members, then the same error or the same quiet end."""
    run = b"".join(
        tario.member_header(name, len(body)) + body + bytes(-len(body) % 512)
        for name, body in (("k1.jpg", b"j" * 700), ("k1.json", b"{}"), ("k2.jpg", b"x" * 30))
    )
    for cut in range(len(run) + 1):
        for keys in ({"k1"}, {"k2"}):
            assert outcome(tario.members, run[:cut], keys) == outcome(
                tario._tarfile_members, run[:cut], keys
            ), (cut, keys)
