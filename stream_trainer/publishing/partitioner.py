"""Which partition a producer puts a keyed record in, and a key's scope id.

Pure functions, no Kafka client. Two producer families hash keys differently:

- the Java client (``BuiltInPartitioner``) and librdkafka's ``partitioner=murmur2`` /
  ``murmur2_random``: ``toPositive(murmur2(key)) % partitions`` (:func:`murmur2_partition`);
- librdkafka's ``partitioner=consistent`` and its default ``consistent_random``:
  ``crc32(key) % partitions`` (:func:`crc32_partition`).

Keys the hash never sees: a **null** key is spread over partitions (sticky / random) by
every one of these producers, so it has no partition to route by. An **empty** key is
hashed like any other by ``murmur2``, ``murmur2_random`` and ``consistent``
(crc32 of nothing is 0: partition 0), but spread randomly by ``consistent_random``
(librdkafka's ``rd_kafka_msg_partitioner_consistent_random`` tests ``keylen == 0``, the
``*_random`` murmur2 variant tests only for a null key).
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from stream_trainer.errors import StreamTrainerError

MURMUR2 = "murmur2"
CRC32 = "crc32"
PARTITIONERS = (MURMUR2, CRC32)

# librdkafka ``partitioner`` settings whose placement of non-empty keys each function
# reproduces (the Java client's default is murmur2).
LIBRDKAFKA_PARTITIONERS = {
    MURMUR2: ("murmur2", "murmur2_random"),
    CRC32: ("consistent", "consistent_random"),
}

_MASK = 0xFFFFFFFF
_M = 0x5BD1E995
_SEED = 0x9747B28C


class PartitionerError(StreamTrainerError, ValueError):
    """An unknown partitioner name or a partition count below 1."""


class KeyFieldError(StreamTrainerError, TypeError):
    """A record field value that has no canonical key bytes (only str and int have)."""


def murmur2(key: bytes) -> int:
    """The Java client's ``Utils.murmur2(key)``: a signed 32-bit int, seed 0x9747b28c."""
    length = len(key)
    h = (_SEED ^ length) & _MASK
    words = length // 4
    for (word,) in struct.iter_unpack("<I", key[: words * 4]):
        k = (word * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = key[words * 4 :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(number: int) -> int:
    """The Java client's ``Utils.toPositive``: the low 31 bits (not ``abs``)."""
    return number & 0x7FFFFFFF


def _check_partitions(partitions: int) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise PartitionerError(f"partitions must be an int >= 1, got {partitions!r}")


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client (and librdkafka ``murmur2``) gives a non-null key."""
    _check_partitions(partitions)
    return to_positive(murmur2(key)) % partitions


def crc32_partition(key: bytes, partitions: int) -> int:
    """The partition librdkafka ``consistent`` gives a non-null key (CRC-32, as zlib's)."""
    _check_partitions(partitions)
    return zlib.crc32(key) % partitions


def partition_for(partitioner: str, key: bytes, partitions: int) -> int:
    """The partition of ``key`` under ``partitioner`` (``murmur2`` or ``crc32``)."""
    if partitioner == MURMUR2:
        return murmur2_partition(key, partitions)
    if partitioner == CRC32:
        return crc32_partition(key, partitions)
    raise PartitionerError(
        f"unknown partitioner {partitioner!r}: expected one of {', '.join(PARTITIONERS)}"
    )


def scope_id_for_key(key: bytes) -> str:
    """The scope id of a ``key``-scope slot: the first 32 hex digits of sha256(key). The
    key itself never appears in events or object names (keys are often customer ids)."""
    return hashlib.sha256(key).hexdigest()[:32]


def key_bytes_from_field(value: object) -> bytes:
    """The canonical key bytes of a record field: a str's UTF-8, an int's decimal text.
    A str with an unpaired surrogate (JSON ``"\\ud800"``) has no UTF-8: KeyFieldError.

    Anything else (bool, float, bytes, None, containers) is refused with KeyFieldError:
    ``1.0`` vs ``1`` or ``True`` vs ``1`` would make two producers disagree silently."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON's "\ud800" escape decodes to a lone surrogate, which has no UTF-8: a
            # producer in another language cannot have meant (or hashed) such a key.
            raise KeyFieldError(
                "a key field string must be valid Unicode, got one with an unpaired "
                "surrogate escape"
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    raise KeyFieldError(
        f"a key field must be a string or an integer, got {type(value).__name__} {value!r}"
    )
