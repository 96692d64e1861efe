"""The trust boundary: every file the tools read is parsed here, with limits.

Shard sets, run folders, CV folders and prediction files travel between people, so each is
treated as untrusted: parsed with a schema (types, ranges, sizes, nesting depth), never
executing code, never following a path out of the folder it was given. Every violation is one
`UserError` line naming the file, the field and what was expected.

- `files`: JSON and YAML with size and depth limits; data addresses read back from files.
- `schema`: the declarative schema (types, ranges, lengths, required keys) the readers check.
- `shardinfo`: `_info.json` (bounds, cross-checked counts). `runs`: run folders (config.yaml,
  run.json, progress.json, summary.json, best/config.json, metrics.json). `weights`:
  safetensors headers checked before mapping. `arrays`: npz shapes checked before inflating.
- `tables`: the index csvs of raw image sets (rows with their line numbers), the paths they give
  (canonical, inside their folder) and UTF-8 file names.
- `media`: images (dimensions from the header before decoding) and tar members; `tarheader`: its
  fast path for plain tar headers (anything else is left to `tarfile`).
"""
