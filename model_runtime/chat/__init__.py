"""GLM conversations, whichever model: each family's prompt layout and stop tokens (`formats`),
which history turns fit (`planning`), the streamed answer text (`answer_text`), and the seed's
`chat` / `stream_chat` on a model's own decode batch (`stream`)."""
