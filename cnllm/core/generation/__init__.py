"""Text generation: one interface (:mod:`.base`), a llama.cpp backend and a transformers backend."""
