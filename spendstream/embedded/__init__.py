"""Local stand-ins for Kafka and ClickHouse: the embedded stack."""
