"""ReadAhead: fewer, larger fetches for sequential reads, the same bytes as without it."""

from __future__ import annotations

import os

import trio

from sandboxfs.readahead import MAX_LIMIT, ReadAhead

KiB = 1 << 10
CONTENT = os.urandom(3 * MAX_LIMIT + 12345)


class Source:
    """A file's bytes, with a record of each fetch."""

    def __init__(self, content: bytes = CONTENT) -> None:
        self.content = content
        self.fetches: list[tuple[int, int]] = []

    async def __call__(self, offset: int, size: int) -> bytes:
        self.fetches.append((offset, size))
        await trio.sleep(0)
        return self.content[offset : offset + size]


def read_all(readahead: ReadAhead, source: Source, size: int) -> bytes:
    async def body():
        parts = []
        offset = 0
        while True:
            part = await readahead.read(source, offset, size)
            if not part:
                return b"".join(parts)
            parts.append(part)
            offset += len(part)

    return trio.run(body)


def test_sequential_reads_fetch_growing_blocks():
    source = Source()
    assert read_all(ReadAhead(MAX_LIMIT), source, 128 * KiB) == CONTENT
    sizes = [size for _, size in source.fetches]
    assert sizes[:4] == [256 * KiB, 512 * KiB, 1024 * KiB, 2048 * KiB]
    assert max(sizes) == MAX_LIMIT
    assert len(source.fetches) < len(CONTENT) // (128 * KiB) // 4


def test_random_reads_fetch_only_what_is_asked():
    source = Source()
    readahead = ReadAhead(MAX_LIMIT)

    async def body():
        for offset in (5 * MAX_LIMIT // 2, 1000, 2 * MAX_LIMIT, 77):
            assert await readahead.read(source, offset, 4 * KiB) == CONTENT[offset : offset + 4 * KiB]

    trio.run(body)
    assert [size for _, size in source.fetches][1:] == [4 * KiB] * 3


def test_concurrent_reads_share_one_fetch():
    source = Source()
    readahead = ReadAhead(MAX_LIMIT)
    results = {}

    async def read(offset):
        results[offset] = await readahead.read(source, offset, 128 * KiB)

    async def body():
        await read(0)
        async with trio.open_nursery() as nursery:
            for offset in (128 * KiB, 256 * KiB):
                nursery.start_soon(read, offset)

    trio.run(body)
    for offset, data in results.items():
        assert data == CONTENT[offset : offset + 128 * KiB]
    assert len(source.fetches) == 2


def test_reads_out_of_order_still_count_as_sequential():
    source = Source()
    readahead = ReadAhead(MAX_LIMIT)

    async def body():
        for offset in (0, 256 * KiB, 128 * KiB, 384 * KiB, 512 * KiB):
            assert await readahead.read(source, offset, 128 * KiB) == CONTENT[offset : offset + 128 * KiB]

    trio.run(body)
    assert source.fetches == [(0, 256 * KiB), (256 * KiB, 512 * KiB)]


def test_sequential_reads_after_a_seek_fetch_ahead():
    source = Source()
    readahead = ReadAhead(MAX_LIMIT)

    async def body():
        for offset in (MAX_LIMIT, MAX_LIMIT + 4 * KiB, MAX_LIMIT + 8 * KiB, MAX_LIMIT + 12 * KiB):
            assert await readahead.read(source, offset, 4 * KiB) == CONTENT[offset : offset + 4 * KiB]

    trio.run(body)
    assert source.fetches == [(MAX_LIMIT, 4 * KiB), (MAX_LIMIT + 4 * KiB, 8 * KiB), (MAX_LIMIT + 12 * KiB, 16 * KiB)]


def test_short_fetch_marks_end_of_file():
    source = Source(b"short")
    readahead = ReadAhead(MAX_LIMIT)

    async def body():
        assert await readahead.read(source, 0, 4) == b"shor"
        assert await readahead.read(source, 4, 4) == b"t"
        assert await readahead.read(source, 5, 4) == b""

    trio.run(body)
    assert len(source.fetches) == 1


def test_drop_forgets_kept_bytes():
    source = Source()
    readahead = ReadAhead(MAX_LIMIT)

    async def body():
        await readahead.read(source, 0, 4 * KiB)
        source.content = b"x" * len(CONTENT)
        readahead.drop()
        return await readahead.read(source, 4 * KiB, 4 * KiB)

    assert trio.run(body) == b"x" * 4 * KiB
