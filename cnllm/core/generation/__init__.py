"""The loaded model (:mod:`.base`: one interface that generates and scores, one LoadOptions) on its two backends,
llama.cpp and transformers, and the chat session and speculative decoding on top."""
