"""
Fuzzing a real relay process from outside: upgrade heads, WebSocket frames, and a driver that
checks the relay after every batch and scans all it wrote for the secrets and payloads it was sent.

Everything a run does follows from its seed (``random.Random(seed)`` for byte-level choices,
Hypothesis with ``@seed`` for structured frames), so a finding is replayed by running the same
seed with the same batch sizes; only the minted tokens' bytes differ between runs (``iat``/``exp``).

``driver`` runs the batches and judges the relay (``FuzzDriver``, ``fuzz_env``, ``summary``). The
cases come from ``heads`` (upgrade heads) and ``frames`` (frames after the upgrade), sent by the
peers of ``scope`` over ``wire`` (raw frames, ``RawPeer``); ``tokens`` mints valid and forged tokens,
and ``ledger`` remembers every token and payload marker sent and finds them in the relay's output.
"""
