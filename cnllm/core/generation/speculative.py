"""Speculative decoding bookkeeping: how many tokens a draft model proposed and how many the target kept.

transformers' assisted generation and llama.cpp's draft hook do the decoding; these helpers only
observe them, so the numbers are a by-product of the real run, not a separate estimate.
"""

from __future__ import annotations

from typing import Any

from cnllm.core.generation.base import SpeculativeStats


class ForwardCounter:
    """Counts forward calls of the target and draft models during assisted generation.

    Each target forward verifies one batch of candidates and keeps the accepted ones plus one
    token of its own; each draft forward proposes one token. So accepted = generated - target
    steps after the prompt, proposed = draft forwards.
    """

    def __init__(self, target, draft):
        self.target_calls = 0
        self.draft_calls = 0
        self._handles = [
            target.register_forward_hook(lambda *_: self._count("target_calls")),
            draft.register_forward_hook(lambda *_: self._count("draft_calls")),
        ]

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        self.target_calls = self.draft_calls = 0

    def stats(self, generated: int) -> SpeculativeStats:
        accepted = max(0, generated - self.target_calls)
        return SpeculativeStats(proposed=self.draft_calls, accepted=min(accepted, self.draft_calls))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def llama_draft(draft_llama: Any, num_tokens: int):
    """A llama-cpp-python draft model backed by a second (small) GGUF, proposing ``num_tokens`` greedy tokens."""
    import numpy as np
    from llama_cpp.llama_speculative import LlamaDraftModel

    class LlamaModelDraft(LlamaDraftModel):
        def __init__(self):
            self.stats = SpeculativeStats()
            self._proposal: list[int] = []
            self._proposed_at = 0

        def reset(self) -> None:
            self.stats = SpeculativeStats()
            self._proposal, self._proposed_at = [], 0

        def __call__(self, input_ids, /, **kwargs):
            ids = [int(i) for i in input_ids]
            if self._proposal and len(ids) > self._proposed_at:
                actual = ids[self._proposed_at :]
                for proposed, kept in zip(self._proposal, actual):
                    if proposed != kept:
                        break
                    self.stats.accepted += 1
            proposal: list[int] = []
            for token in draft_llama.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                proposal.append(int(token))
                if len(proposal) >= num_tokens:
                    break
            self.stats.proposed += len(proposal)
            self._proposal, self._proposed_at = proposal, len(ids)
            return np.array(proposal, dtype=np.intc)

    return LlamaModelDraft()
