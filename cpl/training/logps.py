"""Summed log-probs of completion tokens, computed without the full ``[batch, length, vocab]`` logits.

The backbone runs over the whole sequence, but the LM head is applied only to the positions that predict a
completion token (a plan step is a few dozen tokens after a prompt of hundreds). For preference pairs the
prompt is shared by the chosen and the rejected step, so with *prefix sharing* the prompt runs once, its KV
cache is repeated for the two continuations, and each continuation runs on top of it with explicit position
ids. Both layouts give the same log-probs (``tests/training/test_logps.py`` checks it against plain
concatenation and :func:`cpl.models.reference.transformers_step_logprob`).

Batches are right-padded. In the shared-prefix layout the padding of a short prompt sits *between* its last
token and its continuation; the 2D attention mask hides it and the continuation's position ids start right
after the prompt's real length, so nothing changes for the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, LM head) of a causal LM; refuses models whose logits are scaled after the head."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, name, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__}: {name} is not supported by the trainer's LM head path")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head")
    return model.base_model, head


def _selected_logps(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """log p(label | hidden) for ``hidden`` ``[N, H]`` and ``labels`` ``[N]``, in float32."""
    logits = head(hidden).float()
    return -F.cross_entropy(logits, labels, reduction="none")


def completion_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor) -> Tensor:
    """Summed log-probs of the tokens under ``target_mask`` (``[B, L]``, aligned with ``input_ids``); ``[B]``.

    Token ``t`` is scored by the hidden state at ``t - 1``, so the first token is never a target.
    """
    backbone, head = _parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    select = target_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(select)[select]
    token_logps = _selected_logps(head, hidden[:, :-1][select], input_ids[:, 1:][select])
    return torch.zeros(input_ids.shape[0], device=hidden.device, dtype=torch.float32).index_add(0, rows, token_logps)


def shared_prefix_logps(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    repeats: int,
) -> Tensor:
    """Summed log-probs of ``repeats`` completions per prompt, running each prompt once; ``[B * repeats]``.

    ``prompt_ids``/``prompt_mask`` are ``[B, P]`` (right-padded, every prompt at least one token);
    ``completion_ids``/``completion_mask`` are ``[B * repeats, C]``, the completions of prompt ``i`` in rows
    ``i * repeats ... i * repeats + repeats - 1``.
    """
    backbone, head = _parts(model)
    batch, prompt_width = prompt_ids.shape
    device = prompt_ids.device
    prompt_lens = prompt_mask.sum(dim=1)
    positions = torch.arange(prompt_width, device=device).unsqueeze(0).expand(batch, -1)
    out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    if cache is None:
        raise RuntimeError("the backbone returned no KV cache (gradient checkpointing?): disable prefix sharing")
    cache.batch_repeat_interleave(repeats)
    last_hidden = out.last_hidden_state[torch.arange(batch, device=device), prompt_lens - 1]
    last_hidden = last_hidden.repeat_interleave(repeats, dim=0)

    width = completion_ids.shape[1]
    lens = prompt_lens.repeat_interleave(repeats)
    cont_positions = lens.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
    mask = torch.cat([prompt_mask.repeat_interleave(repeats, dim=0), completion_mask], dim=1)
    cont = backbone(
        input_ids=completion_ids,
        attention_mask=mask,
        position_ids=cont_positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    # completion token 0 is predicted by the prompt's last token, token k by completion token k - 1
    hidden = torch.cat([last_hidden.unsqueeze(1), cont[:, :-1]], dim=1)
    select = completion_mask.bool()
    rows = torch.arange(completion_ids.shape[0], device=device).unsqueeze(1).expand_as(select)[select]
    token_logps = _selected_logps(head, hidden[select], completion_ids[select])
    return torch.zeros(completion_ids.shape[0], device=device, dtype=torch.float32).index_add(0, rows, token_logps)


# --- collation -------------------------------------------------------------------------------------------


def pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad ``seqs`` to ``[N, max_len]`` ids and a 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def concat_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> dict[str, Tensor]:
    """``prompt + completion`` rows with a target mask on the completion."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    ids, mask = pad(seqs, pad_id, device)
    target = torch.zeros_like(mask)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        target[i, len(p) : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def pair_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    *,
    prefix_sharing: bool,
) -> dict[str, Tensor]:
    """A micro-batch of pairs for :func:`pair_logps`; rows alternate chosen, rejected."""
    completions = [seq for pair in zip(chosen, rejected, strict=True) for seq in pair]
    if not prefix_sharing:
        doubled = [p for p in prompts for _ in range(2)]
        return concat_batch(doubled, completions, pad_id, device)
    prompt_ids, prompt_mask = pad(prompts, pad_id, device)
    completion_ids, completion_mask = pad(completions, pad_id, device)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed step log-probs of a :func:`pair_batch`."""
    if "prompt_ids" in batch:
        logps = shared_prefix_logps(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"], 2
        )
    else:
        logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    return logps[0::2], logps[1::2]
