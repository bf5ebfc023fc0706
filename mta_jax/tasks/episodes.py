"""Meta-task (episode) sampling over train tools only, as fixed-shape int32 batches reproducible from (seed, step)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mta_jax.data import records
from mta_jax.tasks import protocol

REGIMES = ("sd", "cd", "mixed")
WEIGHTINGS = ("uniform", "items")
SUPPORT_LABELS = ("gold", "hidden")
SUPPORT_SOURCES = ("items", "docs")
QUERY_TOOLS = ("shared", "disjoint")
# Host-side random streams (DESIGN.md "Randomness"): default_rng((seed, stream, step, task)).
EPISODE_STREAM = 1
POOLED_STREAM = 2


_TOOL_DRAWS = 50  # tool sets tried per episode before giving up (see ``EpisodeSampler.episode``)


class _NoCandidates(ValueError):
    """An episode's tool set leaves some item too few distractors (internal; the sampler redraws)."""


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """Shape and sampling of one meta-task.

    Attributes:
      tools_per_episode: N train tools per episode (their docs are embedded once, shared by its items).
      support: S support items (inner loop).
      query: Q query items (outer loss).
      candidates: C candidates per item: the gold + C-1 distractors from the episode's tools.
      regime: ``"sd"`` (the N tools come from one domain, topped up from others if it is too small),
        ``"cd"`` (any domains) or ``"mixed"`` (a fair coin per episode).
      dataset_weighting: how an episode's dataset is picked: ``"uniform"`` or ``"items"`` (∝ train items).
      support_labels: ``"gold"`` (labelled support items, k-shot adaptation) or ``"hidden"``: every
        ``support_label`` is -1, so the inner loop sees the support queries and their candidates but
        not the answers (it minimises their entropy: test-time adaptation on unlabelled queries). The
        random stream is the same either way: only the labels are masked.
      support_source: ``"items"`` (support items are labelled train queries) or ``"docs"``: the
        support set is ``S`` of the episode's tools, each as a pseudo-item whose query is the tool's
        own documentation (:func:`mta_jax.data.render.pseudo_query`) and whose candidates are it and
        ``C-1`` other episode tools; then ``support_items`` holds *global tool indices*. The inner
        loop thus adapts from the tools' docs alone, as it can for unseen tools (``mta_docs``).
      query_tools: ``"shared"`` (support and query items draw their golds and distractors from all N
        episode tools) or ``"disjoint"``: the N tools are split at random into halves of
        ``N // 2`` and ``N - N // 2``; support items (gold and distractors) use only the first half,
        query items only the second, so the outer loss scores the adapted parameters on tools the
        inner loop never saw — the test condition of zero-shot use on unseen tools, as in MLDG's
        meta-train/meta-test domain split (Li et al., 2018). Needs ``candidates <= N // 2``.
    """

    tools_per_episode: int = 8
    support: int = 5
    query: int = 5
    candidates: int = 5
    regime: str = "mixed"
    dataset_weighting: str = "uniform"
    support_labels: str = "gold"
    support_source: str = "items"
    query_tools: str = "shared"

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"EpisodeConfig.regime must be one of {REGIMES}, got {self.regime!r}")
        if self.dataset_weighting not in WEIGHTINGS:
            raise ValueError(f"EpisodeConfig.dataset_weighting must be one of {WEIGHTINGS}, "
                             f"got {self.dataset_weighting!r}")
        if self.support_labels not in SUPPORT_LABELS:
            raise ValueError(f"EpisodeConfig.support_labels must be one of {SUPPORT_LABELS}, "
                             f"got {self.support_labels!r}")
        if self.support_source not in SUPPORT_SOURCES:
            raise ValueError(f"EpisodeConfig.support_source must be one of {SUPPORT_SOURCES}, "
                             f"got {self.support_source!r}")
        if self.query_tools not in QUERY_TOOLS:
            raise ValueError(f"EpisodeConfig.query_tools must be one of {QUERY_TOOLS}, got {self.query_tools!r}")
        if self.query_tools == "disjoint" and self.candidates > self.tools_per_episode // 2:
            raise ValueError(f"query_tools='disjoint' splits the {self.tools_per_episode} episode tools in two "
                             f"halves, so it needs candidates ({self.candidates}) <= tools_per_episode // 2")
        if self.query_tools == "disjoint" and self.support_source == "docs" and \
                self.support > self.tools_per_episode // 2:
            raise ValueError(f"query_tools='disjoint' with support_source='docs' needs support ({self.support}) "
                             f"<= tools_per_episode // 2 (one doc per support-half tool)")
        if self.support_source == "docs" and (self.support > self.tools_per_episode
                                              or self.support_labels != "gold"):
            raise ValueError(f"support_source='docs' needs support ({self.support}) <= tools_per_episode "
                             f"({self.tools_per_episode}) and support_labels='gold' (a doc's label is its tool)")
        if not 2 <= self.candidates <= self.tools_per_episode:
            raise ValueError(f"need 2 <= candidates ({self.candidates}) <= tools_per_episode "
                             f"({self.tools_per_episode})")
        if self.support < 0 or self.query < 1:
            raise ValueError(f"need support >= 0 and query >= 1, got {self.support}, {self.query}")


@dataclasses.dataclass(frozen=True)
class TrainPool:
    """Train items of one or more datasets over one global tool index.

    Tool ids are unique only within a dataset, so tools are indexed over the concatenated catalogues
    (all splits: val/test tools get an index too, for embedding at evaluation, but never enter an episode).

    Attributes:
      datasets: dataset names, in order.
      tools: every tool of every dataset, concatenated in that order.
      tool_dataset: [num_tools] dataset position of each tool.
      tool_is_train: [num_tools] whether the tool is a train tool of the fixed protocol.
      tool_domain: [num_tools] global domain code (one per (dataset, domain)); tools without category
        share their dataset's "whole pool" code.
      tool_offsets: first global index of each dataset's tools.
      item_ids / item_queries: the protocol train items' ids and query texts.
      item_gold: [num_items] global tool index of each item's gold.
      item_dataset: [num_items] dataset position.
      item_excluded: per item, global indices of the record's other gold tools (never distractors).
    """

    datasets: tuple[str, ...]
    tools: tuple[records.Tool, ...]
    tool_dataset: np.ndarray
    tool_is_train: np.ndarray
    tool_domain: np.ndarray
    tool_offsets: tuple[int, ...]
    item_ids: tuple[str, ...]
    item_queries: tuple[str, ...]
    item_gold: np.ndarray
    item_dataset: np.ndarray
    item_excluded: tuple[frozenset, ...]

    def tool_index(self, dataset: str, tool_id: str) -> int:
        """Global index of ``tool_id`` of ``dataset``."""
        d = self.datasets.index(dataset)
        end = self.tool_offsets[d + 1] if d + 1 < len(self.datasets) else len(self.tools)
        for i in range(self.tool_offsets[d], end):
            if self.tools[i].tool_id == tool_id:
                return i
        raise KeyError(f"unknown tool_id {tool_id!r} in dataset {dataset!r}")


def build_pool(parts: Sequence[tuple[str, records.Catalogue, dict[str, str], Sequence[protocol.ProtocolItem]]]
               ) -> TrainPool:
    """Builds a :class:`TrainPool` from ``(dataset, catalogue, splits, train_items)`` parts.

    Raises:
      ValueError: a train item's gold is unknown or not a train tool, or a split covers unknown tools.
    """
    tools, tdata, ttrain, tdom, offsets = [], [], [], [], []
    iids, iq, igold, idata, iexcl = [], [], [], [], []
    dom_codes: dict[tuple[int, str | None], int] = {}
    for d, (name, cat, splits, items) in enumerate(parts):
        offsets.append(len(tools))
        local = {t: offsets[-1] + i for i, t in enumerate(cat.ids())}
        missing = set(cat.ids()) - set(splits)
        if missing or set(splits) - set(cat.ids()):
            raise ValueError(f"{name}: splits and catalogue disagree ({len(missing)} tools without split, "
                             f"{len(set(splits) - set(cat.ids()))} unknown split ids)")
        for t in cat.tools:
            tools.append(t)
            tdata.append(d)
            ttrain.append(splits[t.tool_id] == "train")
            tdom.append(dom_codes.setdefault((d, cat.domain(t.tool_id)), len(dom_codes)))
        for it in items:
            if it.gold not in local or splits[it.gold] != "train":
                raise ValueError(f"{name}: train item {it.id!r} has gold {it.gold!r}, which is not a train tool")
            bad = [x for x in it.excluded if x not in local]
            if bad:
                raise ValueError(f"{name}: train item {it.id!r} excludes unknown tool(s) {bad}")
            iids.append(it.id)
            iq.append(it.query)
            igold.append(local[it.gold])
            idata.append(d)
            iexcl.append(frozenset(local[x] for x in it.excluded))
    return TrainPool(tuple(p[0] for p in parts), tuple(tools), np.asarray(tdata, np.int32),
                     np.asarray(ttrain, bool), np.asarray(tdom, np.int32), tuple(offsets), tuple(iids),
                     tuple(iq), np.asarray(igold, np.int32), np.asarray(idata, np.int32), tuple(iexcl))


def load_train_pool(data_dir, datasets: Sequence[str]) -> TrainPool:
    """Loads the fixed protocol's train items and catalogues of ``datasets`` (e.g. metatool + toollens)."""
    parts = []
    for name in datasets:
        cat = records.load_catalogue(protocol.pathlib.Path(data_dir) / "normalized" / name / records.TOOLS_FILE)
        parts.append((name, cat, protocol.load_splits(data_dir, name), protocol.load_train_items(data_dir, name)))
    return build_pool(parts)


class EpisodeSampler:
    """Samples meta-task batches from a :class:`TrainPool`; pure in ``(seed, step)``.

    ``batch(step, T)`` returns int32 arrays ``tools [T, N]`` (global tool index),
    ``support_items [T, S]`` / ``query_items [T, Q]`` (global item index),
    ``support_cands [T, S, C]`` / ``query_cands [T, Q, C]`` (local index into the episode's N tools) and
    ``support_label [T, S]`` / ``query_label [T, Q]`` (position of the gold in its candidates), plus
    bookkeeping ``regime [T]`` (0 = sd, 1 = cd) and ``topup [T]`` (SD tools drawn from other domains
    because the chosen domain had fewer than N train tools; 0 for CD).
    Task ``t`` of step ``s`` is drawn from ``default_rng((seed, EPISODE_STREAM, s, t))``, so a host can
    draw just its slice of tasks (``first_task``) and a resumed run draws the same data.
    """

    def __init__(self, pool: TrainPool, config: EpisodeConfig, seed: int):
        self.pool, self.config, self.seed = pool, config, seed
        n = config.tools_per_episode
        self._tools, self._by_domain, self._items_by_tool, weights = [], [], {}, []
        order = np.argsort(pool.item_gold, kind="stable")
        golds, starts = np.unique(pool.item_gold[order], return_index=True)
        for g, items in zip(golds, np.split(order, starts[1:])):
            self._items_by_tool[int(g)] = items
        for d, name in enumerate(pool.datasets):
            # Episode tools: train tools of this dataset that have at least one train item.
            tools = np.asarray(sorted(t for t in self._items_by_tool if pool.tool_dataset[t] == d), np.int32)
            if len(tools) < n:
                raise ValueError(f"{name}: only {len(tools)} train tools with items; tools_per_episode={n}")
            assert pool.tool_is_train[tools].all()
            doms = {}
            for t in tools:
                doms.setdefault(int(pool.tool_domain[t]), []).append(int(t))
            self._tools.append(tools)
            self._by_domain.append({k: np.asarray(v, np.int32) for k, v in doms.items()})
            weights.append(int((pool.item_dataset == d).sum()))
        w = np.ones(len(weights)) if config.dataset_weighting == "uniform" else np.asarray(weights, float)
        self._dataset_p = w / w.sum()
        self._items_by_dataset = [np.flatnonzero(pool.item_dataset == d) for d in range(len(pool.datasets))]

    def _episode_tools(self, rng: np.random.Generator, d: int, sd: bool) -> tuple[np.ndarray, int]:
        n, tools = self.config.tools_per_episode, self._tools[d]
        if not sd:
            return rng.choice(tools, n, replace=False), 0
        # SD: the domain of a uniformly drawn train tool (so domains count ∝ their size), then top up.
        dom = self._by_domain[d][int(self.pool.tool_domain[rng.choice(tools)])]
        if len(dom) >= n:
            return rng.choice(dom, n, replace=False), 0
        rest = np.setdiff1d(tools, dom)
        return np.concatenate([rng.permutation(dom), rng.choice(rest, n - len(dom), replace=False)]), n - len(dom)

    def _items(self, rng, tools: np.ndarray, count: int, used: set) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``count`` items whose golds cycle through a permutation of ``tools`` (balanced), with candidates."""
        cfg, pool = self.config, self.pool
        n, c = len(tools), cfg.candidates
        items = np.empty(count, np.int32)
        cands = np.empty((count, c), np.int32)
        labels = rng.integers(0, c, count).astype(np.int32)
        gold_local = np.resize(rng.permutation(n), count)
        tool_set = set(tools.tolist())
        for j, g in enumerate(gold_local):
            pick = None
            pool_items = self._items_by_tool[int(tools[g])]
            # Rejection sampling (a full permutation of a 1k-item tool costs more than the whole episode);
            # after a few misses, scan a permutation so a valid unused item is found whenever one exists.
            for attempt in range(2):
                tries = pool_items[rng.integers(0, len(pool_items), 8)] if attempt == 0 else \
                    rng.permutation(pool_items)
                for i in tries.tolist():
                    if i not in used and n - 1 - len(pool.item_excluded[i] & tool_set) >= c - 1:
                        pick = i
                        break
                if pick is not None:
                    break
            if pick is None:  # tool exhausted in this episode: reuse an item (README: only when needed)
                ok = [int(i) for i in pool_items if n - 1 - len(pool.item_excluded[i] & tool_set) >= c - 1]
                if not ok:
                    raise _NoCandidates(f"every item of tool {pool.tools[tools[g]].tool_id!r} excludes too "
                                        f"many of the episode's tools for {c} candidates")
                pick = ok[int(rng.integers(len(ok)))]
            used.add(pick)
            excl = pool.item_excluded[pick]
            others = [k for k in range(n) if k != g and int(tools[k]) not in excl]
            distract = rng.choice(others, c - 1, replace=False)
            row = np.insert(distract, labels[j], g)
            items[j], cands[j] = pick, row
        return items, cands, labels

    def _doc_items(self, rng, tools: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``S`` of the episode's tools as doc pseudo-items: ``(global tool ids, candidates, labels)``."""
        cfg = self.config
        n, c = len(tools), cfg.candidates
        own = rng.choice(n, cfg.support, replace=False)
        labels = rng.integers(0, c, cfg.support).astype(np.int32)
        cands = np.empty((cfg.support, c), np.int32)
        for j, g in enumerate(own):
            distract = rng.choice([k for k in range(n) if k != g], c - 1, replace=False)
            cands[j] = np.insert(distract, labels[j], g)
        return tools[own].astype(np.int32), cands, labels

    def episode(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Draws one meta-task with ``rng`` (see the class docstring for the keys, without the T axis)."""
        cfg = self.config
        d = int(rng.choice(len(self._dataset_p), p=self._dataset_p))
        sd = cfg.regime == "sd" or (cfg.regime == "mixed" and bool(rng.integers(2)))
        for attempt in range(_TOOL_DRAWS):
            tools, topup = self._episode_tools(rng, d, sd)
            tools = tools.astype(np.int32)
            # The fixed protocol's guarantee: val/test tools never appear in training, not even as distractors.
            assert self.pool.tool_is_train[tools].all(), "non-train tool sampled into an episode"
            used: set = set()
            # Local indices (into ``tools``) of the tools support / query items may use.
            if cfg.query_tools == "disjoint":
                order = rng.permutation(len(tools))
                s_local, q_local = order[:len(tools) // 2], order[len(tools) // 2:]
            else:
                s_local = q_local = np.arange(len(tools))
            try:
                if cfg.support_source == "docs":
                    s_items, s_cands, s_label = self._doc_items(rng, tools[s_local])
                else:
                    s_items, s_cands, s_label = self._items(rng, tools[s_local], cfg.support, used)
                s_cands = s_local[s_cands].astype(np.int32)
                q_items, q_cands, q_label = self._items(rng, tools[q_local], cfg.query, used)
                q_cands = q_local[q_cands].astype(np.int32)
                if cfg.support_labels == "hidden":
                    s_label = np.full_like(s_label, -1)
                break
            except _NoCandidates as e:
                # Small episodes (C close to N) can draw a tool whose items all mark several of the
                # others as also-correct; draw another tool set (N=8, C=5, the default, never did in 6,000 episodes).
                if attempt == _TOOL_DRAWS - 1:
                    raise ValueError(f"{e} in {_TOOL_DRAWS} draws of tool sets; raise tools_per_episode "
                                     f"({cfg.tools_per_episode}) or lower candidates ({cfg.candidates})") from e
        return {"tools": tools, "support_items": s_items, "support_cands": s_cands, "support_label": s_label,
                "query_items": q_items, "query_cands": q_cands, "query_label": q_label,
                "regime": np.int32(protocol.REGIMES["sd" if sd else "cd"]), "topup": np.int32(topup)}

    def batch(self, step: int, num_tasks: int, *, first_task: int = 0) -> dict[str, np.ndarray]:
        """Tasks ``first_task .. first_task + num_tasks - 1`` of ``step``, stacked on a leading T axis."""
        eps = [self.episode(np.random.default_rng((self.seed, EPISODE_STREAM, step, first_task + t)))
               for t in range(num_tasks)]
        return {k: np.stack([e[k] for e in eps]) for k in eps[0]}

    def pooled_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """A plain fine-tuning batch over the same train items, in the episode layout with T = 1.

        Items are drawn uniformly from the datasets' train items (weighted as ``dataset_weighting``);
        each gets C candidates = its gold + C-1 train tools of the same dataset (never its excluded
        tools; same domain first under ``regime="sd"``). ``tools [1, B*C]`` lists every item's candidates
        (row b owns ``tools[0, b*C:(b+1)*C]``); ``query_*`` hold the B items; ``support_*`` are empty (S = 0).
        """
        cfg, pool = self.config, self.pool
        c = cfg.candidates
        rng = np.random.default_rng((self.seed, POOLED_STREAM, step))
        ds = rng.choice(len(self._dataset_p), batch_size, p=self._dataset_p)
        tools = np.empty((batch_size, c), np.int32)
        items = np.empty(batch_size, np.int32)
        labels = rng.integers(0, c, batch_size).astype(np.int32)
        for b, d in enumerate(ds):
            sd = cfg.regime == "sd" or (cfg.regime == "mixed" and bool(rng.integers(2)))
            i = int(rng.choice(self._items_by_dataset[d]))
            gold = int(pool.item_gold[i])
            drop = pool.item_excluded[i] | {gold}
            eligible = [int(t) for t in self._tools[d] if int(t) not in drop]
            if sd:
                same = [t for t in eligible if pool.tool_domain[t] == pool.tool_domain[gold]]
                if len(same) >= c - 1:
                    eligible = same
            distract = rng.choice(eligible, c - 1, replace=False)
            tools[b] = np.insert(distract, labels[b], gold)
            items[b] = i
        assert pool.tool_is_train[tools].all(), "non-train tool sampled into a pooled batch"
        cands = (np.arange(batch_size)[:, None] * c + np.arange(c)[None, :]).astype(np.int32)
        return {"tools": tools.reshape(1, -1), "support_items": np.zeros((1, 0), np.int32),
                "support_cands": np.zeros((1, 0, c), np.int32), "support_label": np.zeros((1, 0), np.int32),
                "query_items": items[None], "query_cands": cands[None], "query_label": labels[None]}
