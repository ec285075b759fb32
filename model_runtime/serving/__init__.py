"""Many answers at once: the decode batch that owns a KV cache and its slots
(`decode_batch`), next-token choice (`sampling`), the continuous-batching `engine` behind
`protocol.ChatBackend`, and `launch.start_engine` (load a checkpoint, size the slots, start)."""
