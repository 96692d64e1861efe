"""The shard set: raw layouts (sources), the writer, and the format every reader shares."""
