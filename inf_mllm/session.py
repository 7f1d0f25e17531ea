"""Multi-round sessions over one fixed-size cache (constant memory over hundreds of rounds)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .api import enable
from .streaming import stream


class Session:
    """One cache kept across rounds.

    >>> s = Session(model, tokenizer, policy="inf_mllm", budget=1024)
    >>> s.append("Some long document ...")
    >>> s.ask("What was it about?", max_new_tokens=32)

    ``policy_args`` go to :func:`inf_mllm.enable` (``policy``, ``budget``, ``n_recent``, ...).
    """

    def __init__(self, model, tokenizer, **policy_args):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = enable(model, **policy_args)
        self.device = next(model.parameters()).device
        self.rounds = 0
        self._last_logits: Optional[torch.Tensor] = None
        self._started = False

    def _ids(self, text_or_ids) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            ids = self.tokenizer(text_or_ids, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = torch.as_tensor(text_or_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] != 1:
            raise ValueError("inf_mllm: Session takes one sequence (batch size 1)")
        return ids

    @torch.no_grad()
    def append(self, text_or_ids: Union[str, torch.Tensor, list], modality: str = "text", progress: bool = False):
        """Feed text (or token ids) into the cache, in chunks; returns the last logits."""
        ids = self._ids(text_or_ids)
        if ids.shape[1] == 0:
            return self._last_logits
        self._last_logits = stream(self.model, ids, cache=self.cache, modality=modality, progress=progress)
        self._started = True
        return self._last_logits

    def _prompt(self, question: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"{question}\n"

    def _eos_ids(self):
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            e = getattr(src, "eos_token_id", None)
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 64) -> str:
        """Append ``question`` (chat template when the tokenizer has one) and answer greedily."""
        self.append(self._prompt(question))
        eos = self._eos_ids()
        out = []
        logits = self._last_logits
        for _ in range(max_new_tokens):
            nxt = int(logits[0].argmax())
            ids = torch.tensor([[nxt]], device=self.device)
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            if nxt in eos:
                break  # the end-of-turn token is in the cache, so the history stays well-formed
            out.append(nxt)
        self._last_logits = logits
        self.rounds += 1
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def stats(self) -> dict:
        """Tokens seen, slots used by modality, bytes of cache, rounds."""
        s = self.cache.stats()
        s["rounds"] = self.rounds
        return s

    def reset(self):
        self.cache.reset()
        self.rounds = 0
        self._last_logits = None
