"""The key hashes of the Java client and librdkafka, with published vectors."""

from __future__ import annotations

import hashlib
import zlib

import pytest

from stream_trainer.errors import StreamTrainerError
from stream_trainer.publishing.partitioner import (
    KeyFieldError,
    PartitionerError,
    crc32_partition,
    key_bytes_from_field,
    murmur2,
    murmur2_partition,
    partition_for,
    scope_id_for_key,
    to_positive,
)

# Kafka's clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), JAVA_MURMUR2.items())
def test_murmur2_matches_the_java_clients_vectors(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


def test_murmur2_is_signed_32_bit_and_covers_every_tail_length() -> None:
    # Lengths 0..7 take every tail branch; each result must be a Java int.
    values = [murmur2(b"abcdefg"[:n]) for n in range(8)]
    assert len(set(values)) == 8
    assert all(-(2**31) <= v < 2**31 for v in values)
    assert any(v < 0 for v in JAVA_MURMUR2.values())  # the vectors exercise the sign


def test_to_positive_is_the_low_31_bits_not_abs() -> None:
    assert to_positive(-973932308) == -973932308 & 0x7FFFFFFF
    assert to_positive(-(2**31)) == 0  # abs() would overflow in Java; toPositive gives 0
    assert to_positive(5) == 5


def test_murmur2_partition_is_to_positive_mod_n() -> None:
    for key, value in JAVA_MURMUR2.items():
        for n in (1, 3, 6, 100):
            assert murmur2_partition(key, n) == (value & 0x7FFFFFFF) % n
    # "21" hashes negative: abs() and toPositive() disagree, and only toPositive is right.
    assert murmur2_partition(b"21", 6) == 0
    assert abs(-973932308) % 6 == 2


def test_crc32_partition_is_zlib_crc32_mod_n() -> None:
    # CRC-32 check value of "123456789" (IEEE 802.3, reflected): 0xCBF43926.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert crc32_partition(b"123456789", 6) == 0xCBF43926 % 6
    assert crc32_partition(b"", 6) == 0  # librdkafka `consistent`: empty key -> partition 0


def test_partition_for_dispatches_and_refuses_bad_input() -> None:
    assert partition_for("murmur2", b"foobar", 6) == murmur2_partition(b"foobar", 6)
    assert partition_for("crc32", b"foobar", 6) == crc32_partition(b"foobar", 6)
    with pytest.raises(PartitionerError, match="unknown partitioner 'consistent'"):
        partition_for("consistent", b"x", 6)
    for bad in (0, -1, True):
        with pytest.raises(PartitionerError, match="partitions must be"):
            murmur2_partition(b"x", bad)
    assert issubclass(PartitionerError, StreamTrainerError)


def test_scope_id_for_key_is_a_sha256_prefix() -> None:
    assert scope_id_for_key(b"customer-42") == hashlib.sha256(b"customer-42").hexdigest()[:32]
    assert scope_id_for_key(b"") == "e3b0c44298fc1c149afbf4c8996fb924"
    assert len(scope_id_for_key("é".encode())) == 32


def test_key_bytes_from_field() -> None:
    assert key_bytes_from_field("customer-42") == b"customer-42"
    assert key_bytes_from_field("zürich") == "zürich".encode()
    assert key_bytes_from_field(42) == b"42"
    assert key_bytes_from_field(-7) == b"-7"
    assert key_bytes_from_field(10**20) == b"100000000000000000000"
    for bad in (True, 1.0, b"raw", None, ["a"]):
        with pytest.raises(KeyFieldError, match="a key field must be a string or an integer"):
            key_bytes_from_field(bad)
    assert issubclass(KeyFieldError, StreamTrainerError)
    # JSON "\ud800" parses to a lone surrogate: no UTF-8, so no key (not UnicodeEncodeError).
    with pytest.raises(KeyFieldError, match="unpaired surrogate"):
        key_bytes_from_field("\ud800")
