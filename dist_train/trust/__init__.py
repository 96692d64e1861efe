"""The trust boundary: every file the tools read is parsed here, with limits.

Shard sets, run folders, CV folders and prediction files travel between people, so each is
treated as untrusted: parsed with a schema (types, ranges, sizes, nesting depth), never
executing code, never following a path out of the folder it was given. Every violation is one
`UserError` line naming the file, the field and what was expected.

- `files`: JSON, YAML, npz and safetensors documents and their schemas.
- `media`: images (dimensions from the header before decoding) and tar members.
"""
