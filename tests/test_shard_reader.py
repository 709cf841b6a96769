"""The shard reader's own tar-header parser against ``tarfile``: the same samples from
archives in every tar format (long names included, which hand the rest of the archive to
``tarfile``), and at every cut of a truncated archive the samples before the cut, never a
partial one, then :class:`DamagedShard`."""

from __future__ import annotations

import io
import tarfile

import pytest

from vlp.data.shards import DamagedShard, iter_tar_samples


def _write(path, members: list[tuple[str, bytes]], fmt) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _reference(path) -> list[dict]:
    """Samples grouped by key with tarfile alone (independent of vlp's parser)."""
    samples: list[dict] = []
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, suffix = info.name.split(".", 1) if "/" not in info.name else (
                info.name.rsplit("/", 1)[0] + "/" + info.name.rsplit("/", 1)[1].split(".", 1)[0],
                info.name.rsplit("/", 1)[1].split(".", 1)[1],
            )  # fmt: skip
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": str(path)})
            samples[-1][suffix] = tar.extractfile(info).read()
    return samples


MEMBERS = [
    ("s0.json", b'{"a": 1}'),
    ("s0.txt", b"first report"),
    ("s1.json", b"{}"),
    ("s1.frontal.jpg", bytes(range(256)) * 3),
    ("d" * 110 + "/s9.txt", b"a long name"),  # GNU: an 'L' header; pax: 'x'; ustar: prefix
    ("s2.txt", b"after the long name"),
    ("s3.txt", b""),
]


@pytest.mark.parametrize(
    "fmt",
    [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
    ids=["gnu", "pax", "ustar"],
)
def test_the_same_samples_as_tarfile_in_every_format(tmp_path, fmt):
    path = tmp_path / "shard.tar"
    _write(path, MEMBERS, fmt)
    expected = _reference(path)
    assert len(expected) == 5
    assert list(iter_tar_samples(str(path))) == expected
    wanted = frozenset({"txt"})
    only_text = [
        {k: v for k, v in s.items() if k.startswith("__") or k in wanted} for s in expected
    ]
    assert list(iter_tar_samples(str(path), wanted)) == only_text


def test_every_cut_keeps_the_complete_samples_before_it(tmp_path):
    path = tmp_path / "shard.tar"
    members = [(n, d) for n, d in MEMBERS if "/" not in n]  # plain headers only
    _write(path, members, tarfile.GNU_FORMAT)
    whole = path.read_bytes()
    expected = _reference(path)
    with tarfile.open(path) as tar:
        end_of_data = max(m.offset_data + m.size for m in tar.getmembers())
    cut_path = tmp_path / "cut.tar"
    for cut in range(0, end_of_data + 1, 37):
        cut_path.write_bytes(whole[:cut])
        got = []
        with pytest.raises(DamagedShard):
            for sample in iter_tar_samples(str(cut_path)):
                got.append(sample)
        url = {"__url__": str(cut_path)}
        assert got == [dict(s, **url) for s in expected[: len(got)]], cut  # complete, in order
        # the sample in progress at the cut is never yielded
        assert len(got) < len(expected)
