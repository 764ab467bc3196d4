"""The engine's bookkeeping, in plain Python: scheduler, sequences and request state, the
paged KV block manager, output processing, and the decoding primitives (fork, hold/extend,
n samples)."""
