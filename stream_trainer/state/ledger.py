"""Which offsets of which partitions a model state has processed.

The ledger lives inside the checkpointed training state, next to the model it describes, so
it is the oracle of the exactly-once promise: a record learnt twice shows up as an overlap,
a record skipped as a gap. Processed means learnt or dead-lettered; both advance offsets.
It is also the lineage a model version carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


def partition_key(key: TopicPartitionKey) -> str:
    """The ``topic:partition`` string used in JSON (manifests, version metadata)."""
    return f"{key[0]}:{key[1]}"


def parse_partition_key(text: str) -> TopicPartitionKey:
    """Inverse of :func:`partition_key`; topic names may contain ':' only before the last."""
    topic, _, partition = text.rpartition(":")
    return topic, int(partition)


@dataclass
class OffsetLedger:
    """Half-open offset ranges ``[start, end)`` per partition, merged when contiguous."""

    ranges: dict[TopicPartitionKey, list[list[int]]] = field(default_factory=dict)
    overlaps: int = 0

    def add(self, key: TopicPartitionKey, start: int, end: int) -> None:
        """Record ``[start, end)`` as processed; counts offsets already present in ``overlaps``."""
        if end <= start:
            return
        spans = self.ranges.setdefault(key, [])
        if spans and spans[-1][1] == start:
            spans[-1][1] = end  # the common case: the next contiguous batch
            return
        for span in spans:
            low, high = max(span[0], start), min(span[1], end)
            if low < high:
                self.overlaps += high - low
        spans.append([start, end])
        spans.sort()
        merged: list[list[int]] = []
        for span in spans:
            if merged and span[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], span[1])
            else:
                merged.append(list(span))
        self.ranges[key] = merged

    def count(self) -> int:
        """Number of distinct offsets recorded."""
        return sum(end - start for spans in self.ranges.values() for start, end in spans)

    def as_json(self) -> dict[str, list[list[int]]]:
        """``{"topic:partition": [[start, end), ...]}`` with sorted keys."""
        return {
            partition_key(key): [list(span) for span in spans]
            for key, spans in sorted(self.ranges.items())
        }

    def since(self, earlier: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        """Ranges present now but not in ``earlier`` (an :meth:`as_json` result)."""
        result: dict[str, list[list[int]]] = {}
        for name, spans in self.as_json().items():
            before = OffsetLedger()
            key = parse_partition_key(name)
            for start, end in earlier.get(name, []):
                before.add(key, start, end)
            fresh: list[list[int]] = []
            for start, end in spans:
                cursor = start
                for b_start, b_end in before.ranges.get(key, []):
                    if b_end <= cursor or b_start >= end:
                        continue
                    if b_start > cursor:
                        fresh.append([cursor, b_start])
                    cursor = max(cursor, b_end)
                if cursor < end:
                    fresh.append([cursor, end])
            if fresh:
                result[name] = fresh
        return result
