"""Decoder tool-selection scorers: constrained scoring of every candidate name, and greedy generation + exact match.

Method names for ``config.model.kind == "decoder"``: ``zero_shot``, ``ft`` and ``mta`` (LoRA None /
trained) use the **default, total log-probability** ``log p(" name" + eos | prompt)``: the
probability that the model answers exactly this tool and stops, so it needs no length heuristic
(the eos already stops a short name from winning by being a prefix of a longer one). Suffixes pick
the variants: ``<method>@norm`` divides by the target's token count; ``<method>@gen`` is the
paper's metric, free greedy decoding compared by exact match with the candidates' names.

Only items with shipped candidate lists can be prompted: a ``candidates: None`` item (the whole
pool) raises, naming the set. Prompts and targets are built exactly as in training
(:mod:`mta_jax.tasks.prompts`).
"""
from __future__ import annotations

import time
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mta_jax.data import render
from mta_jax.eval import metrics
from mta_jax.eval.metrics import Scorer
from mta_jax.eval.sets import EvalSet
from mta_jax.meta import losses
from mta_jax.model import decoder
from mta_jax.model import generate
from mta_jax.tasks import prompts as prompts_lib

VARIANTS = ("", "@norm", "@gen")
_WIDTHS = (128, 256, 512, 1024, 2048, 4096)  # padded sequence lengths: one compile per width used


def split_method(name: str) -> tuple[str, str]:
    """``"mta@gen" -> ("mta", "@gen")``; raises on an unknown suffix."""
    base, at, suffix = name.partition("@")
    variant = at + suffix
    if variant not in VARIANTS:
        raise ValueError(f"decoder method {name!r}: unknown variant {variant!r}; have {VARIANTS}")
    return base, variant


def display_order(item_id: str, n: int) -> np.ndarray:
    """The order a prompt lists an item's ``n`` candidates in: a permutation seeded by the item id.

    Shipped candidate lists often put the gold tool first (Seal-Tools, API-Bank, BFCL); listed as
    shipped, the position alone would carry the answer. Scores stay in candidate order.
    """
    return np.random.default_rng(zlib.crc32(item_id.encode("utf-8"))).permutation(n)


def item_texts(group: Sequence[EvalSet]) -> list[list[tuple[str, list[str]]]]:
    """Per set, per item: ``(prompt, [" label" of each candidate])``, labels in candidate order."""
    out = []
    for s in group:
        style = prompts_lib.label_style(s.dataset)
        rows = []
        for it in s.items:
            if it.candidates is None:
                raise ValueError(f"{s.label}: item {it.id!r} has candidates=None (the whole pool of "
                                 f"{len(s.catalogue.ids())} tools); a decoder prompt cannot list the pool. "
                                 "Evaluate the decoder on sets with candidate lists")
            tools = [s.catalogue[t] for t in it.candidates]
            shown = [tools[i] for i in display_order(it.id, len(tools))]
            prompt, _ = render.decoder_prompt(it.query, shown, label_style=style)
            rows.append((prompt, [" " + render.LABEL_STYLES[style](t) for t in tools]))
        out.append(rows)
    return out


def target_budget(tok, targets: Sequence[str], eos_id: int | None) -> int:
    """Target slots for ``targets`` (" label" strings): the longest one's tokens plus eos, rounded up
    to a multiple of 8 (fewer distinct compiled shapes)."""
    longest = max(map(len, tok.tokenize(list(targets), add_special_tokens=False))) + (eos_id is not None)
    return -(-longest // 8) * 8


def padded_width(n_tokens: int, max_len: int) -> int:
    """The smallest of the compiled widths (:data:`_WIDTHS`) that holds ``n_tokens``, capped at ``max_len``."""
    return min([w for w in _WIDTHS if w >= n_tokens] + [max_len])


def _packed_logprobs(cfg, base, lora, ids, mask, positions, segments, tok_idx, prev_idx, valid, bottom=None):
    """Per candidate, the summed log-probability of its tokens and their count, ``[B, C]`` each.

    A row holds one prompt (segment 0) followed by every candidate's target (segment ``c + 1``);
    ``tok_idx[b, c, j]`` is the column of candidate ``c``'s ``j``-th token and ``prev_idx`` the
    column whose hidden state predicts it (the prompt's last token for ``j = 0``). ``bottom``: shared
    frozen-bottom states (``decoder.hidden_states``).
    """
    b, c, k = tok_idx.shape
    h = decoder.hidden_states(cfg, base, ids, mask, lora, positions=positions, segments=segments, bottom=bottom)
    tokens = jnp.take_along_axis(ids, tok_idx.reshape(b, c * k), axis=1)
    logp, _ = losses.predicted_logprobs(cfg, base, h, prev_idx.reshape(b, c * k), tokens)
    logp = jnp.where(valid, logp.reshape(b, c, k), 0.0)
    return jnp.sum(logp, axis=-1), jnp.sum(valid, axis=-1)


def shared_split(cfg, loras) -> int:
    """The number of bottom layers that no adapter in ``loras`` touches (``None`` = the base model)."""
    return min([cfg.num_layers] + [cfg.num_layers - decoder.num_lora_layers(lo) for lo in loras if lo is not None])


def _packed_multi(cfg, split, base, loras, ids, mask, positions, segments, tok_idx, prev_idx, valid):
    """:func:`_packed_logprobs` of every adapter in ``loras`` over one shared bottom: ``[M, B, C]`` totals, ``[B, C]`` counts."""
    x = decoder.bottom_states(cfg, base, ids, mask, split, positions=positions, segments=segments)
    outs = [_packed_logprobs(cfg, base, lo, ids, mask, positions, segments, tok_idx, prev_idx, valid, (x, split))
            for lo in loras]
    return jnp.stack([total for total, _ in outs]), outs[0][1]


def _single_multi(cfg, split, max_target, base, loras, ids, mask, target_mask):
    """``losses.target_token_logprobs`` of every adapter over one shared bottom: ``[M, B, K]`` log-probs, ``[B, K]`` valid."""
    x = decoder.bottom_states(cfg, base, ids, mask, split)
    outs = [losses.target_token_logprobs(cfg, base, lo, ids, mask, target_mask, max_target, bottom=(x, split))
            for lo in loras]
    return jnp.stack([logp for logp, _, _ in outs]), outs[0][2]


def _pack(prompt: list[int], targets: list[list[int]], width: int, n_cand: int, max_target: int, pad_id: int):
    """One packed row (see :func:`_packed_logprobs`) as NumPy arrays."""
    ids = np.full(width, pad_id, np.int32)
    mask, positions, segments = (np.zeros(width, np.int32) for _ in range(3))
    tok_idx, prev_idx = np.zeros((2, n_cand, max_target), np.int32)
    valid = np.zeros((n_cand, max_target), bool)
    n = len(prompt)
    ids[:n], mask[:n], positions[:n] = prompt, 1, np.arange(n)
    col = n
    for c, t in enumerate(targets):
        span = np.arange(col, col + len(t))
        ids[span], mask[span], segments[span] = t, 1, c + 1
        positions[span] = n + np.arange(len(t))
        tok_idx[c, :len(t)] = span
        prev_idx[c, :len(t)] = np.concatenate([[n - 1], span[:-1]])
        valid[c, :len(t)] = True
        col += len(t)
    return ids, mask, positions, segments, tok_idx, prev_idx, valid


def constrained_scorer(cfg, base: dict, tok, lora=None, *, eos_id: int | None, max_len: int,
                       batch_size: int, normalize: bool = False) -> Scorer:
    """Scores each candidate by the log-probability of its name (+ eos) after the prompt.

    An item's prompt is run once: its candidates' targets follow it in the same row, each seeing
    only the prompt and its own earlier tokens, at the positions it would have alone
    (:func:`mta_jax.model.decoder.hidden_states` ``segments``), so scores equal one row per
    candidate (tested) for ``P + sum |target|`` tokens instead of ``C (P + |target|)``. Items whose
    packed row would exceed ``max_len`` get one row per candidate, the prompt cut from the front.
    Several adapters on the same items: :class:`SharedBottomScorers`.

    Args:
      cfg, base, tok: the decoder, its weights and tokenizer.
      lora: adapter (None = zero-shot).
      eos_id: appended to each target, as in training.
      max_len: sequence budget (prompts are cut from the front beyond it; targets never).
      batch_size: rows per compiled call of one candidate each; a packed call takes
        ``batch_size // C`` items, so both project as many positions to the vocabulary.
      normalize: divide by the number of target tokens (the ``@norm`` variant).
    """
    shared = SharedBottomScorers(cfg, base, tok, eos_id=eos_id, max_len=max_len, batch_size=batch_size)
    return shared.scorer("", lora, normalize=normalize)


class ProgressLog:
    """Progress lines for a long scoring loop: ``"<what>: 1200/4618 rows, 310s, ~885s left"``.

    A line whenever ``every`` seconds have passed since the last one (or the start), and a last one
    when the loop ends if any was written: a loop shorter than ``every`` stays silent, and an hour-long
    decoder evaluation on a CPU shows that it is alive and when it will end. The time left is
    extrapolated from the *work* done (e.g. tokens: rows are scored shortest first, so counting
    rows would promise too early an end). ``log`` None disables it.
    """

    def __init__(self, what: str, total_rows: int, total_work: float, log: Callable[[str], None] | None,
                 every: float = 60.0):
        self.what, self.total_rows, self.total_work, self.log, self.every = what, total_rows, total_work, log, every
        self.rows, self.work, self.lines = 0, 0.0, 0
        self.t0 = self.last = time.perf_counter()

    def advance(self, rows: int, work: float) -> None:
        """Counts ``rows`` more rows, costing ``work``, done, and writes a line if one is due."""
        self.rows, self.work = self.rows + rows, self.work + work
        now = time.perf_counter()
        if self.log is None or not (now - self.last >= self.every or (self.rows >= self.total_rows and self.lines)):
            return
        self.lines, self.last = self.lines + 1, now
        elapsed = now - self.t0
        left = elapsed / max(self.work, 1e-9) * max(self.total_work - self.work, 0.0)
        self.log(f"{self.what}: {self.rows}/{self.total_rows} rows, {elapsed:.0f}s, ~{left:.0f}s left")


class SharedBottomScorers:
    """:func:`constrained_scorer` for several adapters on the same items, running the frozen bottom once.

    The methods of one evaluation (``zero_shot``, ``ft``, ``mta`` and their ``@norm`` variants) see
    the same prompts and candidates and differ only in the LoRA layers at the top (none for
    zero-shot). Each batch runs the layers below every member's lowest LoRA layer once
    (:func:`mta_jax.model.decoder.bottom_states`) and then each member's top, in one compiled call;
    each member's scores equal those of its own :func:`constrained_scorer` (tested).

    Register every member with :meth:`scorer` before scoring. The first member called on a group
    scores it for all members and keeps the others' scores until they ask for them
    (``metrics.evaluate`` runs a set's methods one after another), so that member's logged time
    includes the others'. With ``log``, a long group logs its progress (:class:`ProgressLog`).
    """

    def __init__(self, cfg, base: dict, tok, *, eos_id: int | None, max_len: int, batch_size: int,
                 log: Callable[[str], None] | None = None, log_every: float = 60.0):
        self.cfg, self.base, self.tok = cfg, base, tok
        self.eos_id, self.max_len, self.batch_size = eos_id, max_len, batch_size
        self.log, self.log_every = log, log_every
        self._members: dict[str, tuple] = {}   # name -> (lora, normalize)
        self._pending: dict[tuple, tuple] = {}  # group key -> (group, {name: scores not yet taken})
        self._packed = jax.jit(_packed_multi, static_argnums=(0, 1))
        self._single = jax.jit(_single_multi, static_argnums=(0, 1, 2))

    def scorer(self, name: str, lora=None, *, normalize: bool = False) -> Scorer:
        """Registers a member and returns its scorer."""
        if name in self._members:
            raise ValueError(f"SharedBottomScorers: member {name!r} registered twice")
        self._members[name] = (lora, normalize)

        def score(group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
            key = tuple(map(id, group))
            if key not in self._pending or name not in self._pending[key][1]:
                self._pending[key] = (tuple(group), self.score_all(group))
            results = self._pending[key][1]
            out = results.pop(name)
            if not results:
                del self._pending[key]
            return out
        return score

    def score_all(self, group: Sequence[EvalSet]) -> dict[str, list[list[np.ndarray]]]:
        """Every member's scores on ``group``: ``{name: per set, per item, scores in candidate order}``."""
        cfg, base, tok, max_len, batch_size = self.cfg, self.base, self.tok, self.max_len, self.batch_size
        names = list(self._members)
        loras = tuple(self._members[n][0] for n in names)
        norms = [self._members[n][1] for n in names]
        split = shared_split(cfg, loras)
        texts = item_texts(group)
        items = [(prompt, labels) for rows in texts for prompt, labels in rows]
        max_target = target_budget(tok, [t for _, labels in items for t in labels], self.eos_id)
        enc = prompts_lib.PromptEncoder(tok, max_len, max_target, self.eos_id)
        full_prompts = tok.tokenize([p for p, _ in items], add_special_tokens=True)
        scores = [[None] * len(items) for _ in names]
        packed, single = [], []
        for i, (prompt, labels) in enumerate(items):
            targets = enc.target_ids(labels)
            n = len(full_prompts[i]) + sum(map(len, targets))
            (packed if n <= max_len else single).append((i, targets, n))
        # Items too long to pack are scored below as one (cut prompt, target) row per candidate.
        widths = [padded_width(len(full_prompts[i]) + max_target, max_len) for i, _, _ in single for _ in items[i][1]]
        progress = ProgressLog(  # work = padded tokens
            f"{group[0].name}, {len(names)} method(s)", len(packed) + len(widths),
            sum(padded_width(n, max_len) for _, _, n in packed) + sum(widths), self.log, self.log_every)
        # Packed rows: one per item, bucketed by width.
        n_cand = max([len(items[i][1]) for i, _, _ in packed], default=1)
        per_call = max(1, batch_size // n_cand)  # as many vocabulary projections as unpacked rows
        for w in sorted({padded_width(n, max_len) for _, _, n in packed}):
            rows = [(i, t) for i, t, n in packed if padded_width(n, max_len) == w]
            for s in range(0, len(rows), per_call):
                sel = rows[s:s + per_call]
                arrs = [_pack(full_prompts[i], t, w, n_cand, max_target, tok.pad_id) for i, t in sel]
                arrs += [arrs[0]] * (per_call - len(sel))  # padding rows: copies, never read
                total, count = self._packed(cfg, split, base, loras, *map(np.stack, zip(*arrs)))
                total, count = np.asarray(total, np.float64), np.asarray(count)
                for m, norm in enumerate(norms):
                    for r, (i, t) in enumerate(sel):
                        k = len(t)
                        scores[m][i] = total[m, r, :k] / count[r, :k] if norm else total[m, r, :k]
                progress.advance(len(sel), len(sel) * w)
        # Items too long to pack: one row per candidate, bucketed by width.
        prompts_, targets_, first = [], [], []
        for i, _, _ in single:
            first.append(len(prompts_))
            prompts_ += [items[i][0]] * len(items[i][1])
            targets_ += items[i][1]
        flat = np.zeros((len(names), len(prompts_)))
        for w in sorted(set(widths)):
            rows = np.flatnonzero(np.asarray(widths) == w)
            wenc = prompts_lib.PromptEncoder(tok, w, max_target, self.eos_id)
            for s in range(0, len(rows), batch_size):
                sel = rows[s:s + batch_size]
                e = wenc.pairs([prompts_[i] for i in sel], [targets_[i] for i in sel])
                pad = batch_size - len(sel)
                arrs = [np.pad(a, ((0, pad), (0, 0))) for a in (e.ids, e.mask, e.target_mask)]
                arrs[2][len(sel):, -1] = 1  # padding rows get a dummy target (never read)
                logp, valid = self._single(cfg, split, max_target, base, loras, *arrs)
                total = np.asarray(logp, np.float64).sum(-1)[:, :len(sel)]
                count = np.asarray(valid).sum(-1)[:len(sel)]
                for m, norm in enumerate(norms):
                    flat[m, sel] = total[m] / count if norm else total[m]
                progress.advance(len(sel), len(sel) * w)
        for (i, _, _), f in zip(single, first):
            for m in range(len(names)):
                scores[m][i] = flat[m, f:f + len(items[i][1])]
        out = {}
        for m, name in enumerate(names):
            per_set, k = [], 0
            for rows in texts:
                per_set.append(scores[m][k:k + len(rows)])
                k += len(rows)
            out[name] = per_set
        return out


def answer_scores(answer: str, labels: Sequence[str]) -> np.ndarray:
    """1 for the candidates whose (normalised) label equals ``answer``, 0 for the others; an answer
    matching none abstains (:data:`mta_jax.eval.metrics.ABSTAIN`: every score ``-inf``)."""
    hit = np.array([lab == answer for lab in labels], np.float64)
    return hit if hit.any() else np.full(len(labels), metrics.ABSTAIN)


def generation_scorer(cfg, base: dict, tok, lora=None, *, eos_id: int | None, max_len: int,
                      batch_size: int, log: Callable[[str], None] | None = None) -> Scorer:
    """Greedy generation + exact match: the candidate whose name equals the answer gets score 1.

    The answer is the generated text up to eos, first line, stripped; a candidate matches when its
    name, round-tripped through the tokenizer (so uncased tokenizers compare like for like), is
    equal. An answer matching no candidate abstains (:data:`mta_jax.eval.metrics.ABSTAIN`: all
    scores ``-inf``), which every metric counts as wrong — also where every candidate is gold; the
    count of such answers is logged. The gold tools are never read here.
    """
    gen = jax.jit(generate.greedy, static_argnums=(0, 4, 5))

    def norm(text: str) -> str:
        return text.split("\n", 1)[0].strip()

    def score(group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        texts = item_texts(group)
        prompts = [p for rows in texts for p, _ in rows]
        labels = sorted({lab for rows in texts for _, labs in rows for lab in labs})
        lab_ids = tok.tokenize(labels, add_special_tokens=False)
        canon = {lab: norm(tok.decode(ids)) for lab, ids in zip(labels, lab_ids)}
        max_new = max(len(i) for i in lab_ids) + 2  # room for eos and one stray token
        lengths = tok.seq_lengths(prompts)
        answers: list[str] = [""] * len(prompts)
        for w in sorted({padded_width(int(n), max_len - max_new) for n in lengths}):
            rows = np.flatnonzero([padded_width(int(n), max_len - max_new) == w for n in lengths])
            enc = prompts_lib.PromptEncoder(tok, w + 1, 1, None)
            for s in range(0, len(rows), batch_size):
                sel = rows[s:s + batch_size]
                e = enc.prompts_left([prompts[i] for i in sel], w)
                pad = batch_size - len(sel)
                ids = np.pad(e.ids, ((0, pad), (0, 0)), constant_values=tok.pad_id)
                mask = np.pad(e.mask, ((0, pad), (0, 0)), constant_values=1)
                tokens, valid = jax.device_get(gen(cfg, base, ids, mask, max_new, eos_id, lora))
                for j, i in enumerate(sel):
                    answers[i] = norm(tok.decode(tokens[j][valid[j]]))
        out, k, invalid = [], 0, 0
        for s, rows in zip(group, texts):
            per_set = []
            for _, labs in rows:
                hit = answer_scores(answers[k], [canon[lab] for lab in labs])
                invalid += bool(np.isneginf(hit).all())
                per_set.append(hit)
                k += 1
            out.append(per_set)
        if log is not None:
            log(f"{group[0].name}: {invalid} of {k} generated answers match no candidate (counted wrong)")
        return out
    return score


def decoder_scorer(variant: str, cfg, base: dict, tok, lora, *, eos_id: int | None, max_len: int,
                   batch_size: int, log: Callable[[str], None] | None = None) -> Scorer:
    """The scorer of one variant (``""``, ``"@norm"``, ``"@gen"``, see :data:`VARIANTS`)."""
    if variant == "@gen":
        return generation_scorer(cfg, base, tok, lora, eos_id=eos_id, max_len=max_len,
                                 batch_size=batch_size, log=log)
    return constrained_scorer(cfg, base, tok, lora, eos_id=eos_id, max_len=max_len, batch_size=batch_size,
                              normalize=variant == "@norm")

