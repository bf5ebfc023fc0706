"""Decoder prompts as fixed-shape token arrays: candidate list + query as the prompt, the gold tool's name as the target.

Layout of one training sequence (right padded to ``seq_len``)::

    [prompt specials] prompt tokens [suffix specials] | " name" tokens [eos] | pad ...
                                                      ^ target_mask = 1 here

The prompt and the target are tokenised separately (the target without special tokens), so the
target span is exactly the label's own tokens whatever the tokenizer merges across the boundary;
:func:`mta_jax.data.render.decoder_prompt` ends the prompt with ``"Tool:"`` and starts the target
with a space, which is where BPE tokenizers split anyway. When a sequence is too long the prompt
loses tokens from its *front* (after any leading special token such as Llama's BOS): the request
and the ``"Tool:"`` cue next to the answer survive, the header and first candidates go. The target
is never cut; a label longer than ``max_target`` tokens is an error.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mta_jax.data import render
from mta_jax.data.records import Tool

# ToolLens endpoint names collide (e.g. 'Autocomplete' under several RapidAPI tools); the
# "tool_name/name" label is unique over its catalogue, so exact-match answers stay unambiguous.
LABEL_STYLES = {"toollens": "tool_name/name"}
DEFAULT_LABEL_STYLE = "name"


def label_style(dataset: str) -> str:
    """The :data:`mta_jax.data.render.LABEL_STYLES` key used to name ``dataset``'s tools."""
    return LABEL_STYLES.get(dataset, DEFAULT_LABEL_STYLE)


def tool_label(tool: Tool, dataset: str) -> str:
    """The name the decoder must produce for ``tool`` (no leading space)."""
    return render.LABEL_STYLES[label_style(dataset)](tool)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token arrays of ``N`` sequences.

    Attributes:
      ids, mask: int32 ``[N, L]``; ``mask`` is 1 on real tokens.
      target_mask: int32 ``[N, L]``, 1 on the target span (all zeros for prompt-only encodings).
      truncated: bool ``[N]``, whether the prompt lost tokens to fit.
    """

    ids: np.ndarray
    mask: np.ndarray
    target_mask: np.ndarray
    truncated: np.ndarray


class PromptEncoder:
    """Tokenises (prompt, target) pairs into fixed-length arrays.

    Args:
      tokenizer: a :class:`mta_jax.data.tokenize.Tokenizer`.
      seq_len: ``L``, tokens per sequence (prompt + target).
      max_target: the most target tokens (label + eos) allowed.
      eos_id: appended to every target so a trained model learns to stop after the name (and
        constrained scoring can tell ``search`` from ``search_web``); None appends nothing.
    """

    def __init__(self, tokenizer, seq_len: int, max_target: int, eos_id: int | None):
        if max_target < 1 or seq_len <= max_target:
            raise ValueError(f"need 1 <= max_target ({max_target}) < seq_len ({seq_len})")
        self.tok, self.seq_len, self.max_target, self.eos_id = tokenizer, seq_len, max_target, eos_id

    def target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Token ids of each target (no special tokens) plus ``eos_id``; raises if one exceeds ``max_target``."""
        out = []
        for t, ids in zip(targets, self.tok.tokenize(list(targets), add_special_tokens=False)):
            ids = ids + ([self.eos_id] if self.eos_id is not None else [])
            if len(ids) > self.max_target:
                raise ValueError(f"target {t!r} is {len(ids)} tokens (eos included) > max_target="
                                 f"{self.max_target}; raise the max target length (config.data.doc_len)")
            if not t.strip():
                raise ValueError(f"empty target {t!r}")
            out.append(ids)
        return out

    def prompt_ids(self, prompts: Sequence[str], budget: Sequence[int]) -> tuple[list[list[int]], np.ndarray]:
        """Prompt ids with special tokens, each cut to ``budget[i]`` tokens by dropping from the front."""
        full = self.tok.tokenize(list(prompts), add_special_tokens=True)
        plain = self.tok.tokenize(list(prompts), add_special_tokens=False)
        out, cut = [], np.zeros(len(full), bool)
        for i, (f, p) in enumerate(zip(full, plain)):
            if len(f) <= budget[i]:
                out.append(f)
                continue
            # Locate the text inside the special tokens ([CLS] p [SEP], <bos> p, or just p).
            head = next((k for k in range(len(f) - len(p) + 1) if f[k:k + len(p)] == p), None)
            if head is None:
                raise ValueError(f"cannot locate the prompt text among its special tokens (prompt {i})")
            prefix, suffix = f[:head], f[head + len(p):]
            keep = budget[i] - len(prefix) - len(suffix)
            if keep < 1:
                raise ValueError(f"seq_len={self.seq_len} leaves no room for prompt {i}")
            out.append(prefix + p[len(p) - keep:] + suffix)
            cut[i] = True
        return out, cut

    def pairs(self, prompts: Sequence[str], targets: Sequence[str]) -> Encoded:
        """Right-padded ``prompt + target`` sequences with the target span marked."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        tgt = self.target_ids(targets)
        pro, cut = self.prompt_ids(prompts, [self.seq_len - len(t) for t in tgt])
        n, L = len(prompts), self.seq_len
        ids = np.full((n, L), self.tok.pad_id, np.int32)
        mask = np.zeros((n, L), np.int32)
        target_mask = np.zeros((n, L), np.int32)
        for i, (p, t) in enumerate(zip(pro, tgt)):
            ids[i, :len(p) + len(t)] = p + t
            mask[i, :len(p) + len(t)] = 1
            target_mask[i, len(p):len(p) + len(t)] = 1
        return Encoded(ids, mask, target_mask, cut)

    def prompts_left(self, prompts: Sequence[str], width: int) -> Encoded:
        """Left-padded prompts (for generation: every row's last column is its last prompt token)."""
        pro, cut = self.prompt_ids(prompts, [width] * len(prompts))
        ids = np.full((len(pro), width), self.tok.pad_id, np.int32)
        mask = np.zeros((len(pro), width), np.int32)
        for i, p in enumerate(pro):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        return Encoded(ids, mask, np.zeros_like(mask), cut)


def episode_texts(pool, batch: dict[str, np.ndarray], part: str) -> tuple[list[str], list[str]]:
    """Prompts and targets of one part (``"support"``/``"query"``) of a sampler batch, row-major ``[T, S]``.

    Args:
      pool: the :class:`mta_jax.tasks.episodes.TrainPool` the batch indexes.
      batch: :meth:`EpisodeSampler.batch` output (``tools``, ``{part}_items/_cands/_label``).
      part: ``"support"`` or ``"query"``.
    """
    prompts, targets = [], []
    tools, items = batch["tools"], batch[f"{part}_items"]
    cands, labels = batch[f"{part}_cands"], batch[f"{part}_label"]
    for t in range(items.shape[0]):
        for s in range(items.shape[1]):
            shown = [int(tools[t, c]) for c in cands[t, s]]
            gold = shown[int(labels[t, s])]
            dataset = pool.datasets[int(pool.tool_dataset[gold])]
            prompt, target = render.decoder_prompt(
                pool.item_queries[int(items[t, s])], [pool.tools[i] for i in shown], pool.tools[gold],
                label_style=label_style(dataset))
            prompts.append(prompt)
            targets.append(target)
    return prompts, targets
