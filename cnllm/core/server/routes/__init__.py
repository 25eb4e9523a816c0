"""The API's routes, one router per module (page, health, models, chat, completions, embeddings); each reads what it
shares with the others from ``app.state`` (:mod:`cnllm.core.server.state`), so it can be mounted and tested alone."""
