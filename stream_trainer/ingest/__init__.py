"""Records in: the Kafka source, decoding, the record contract, dead letters.

Imports nothing: see docs/design/scale-out.md 9.1."""
