"""Host-side batching helpers: tokenise every text once (TokenTable) and prefetch batches on a thread."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import queue
import threading
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What :func:`build_token_table` needs (``mta_jax.data.tokenize.Tokenizer`` satisfies it)."""

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """Token ids and attention masks of a fixed list of texts, row ``i`` = text ``i``.

    Episodes carry global indices (tool or item); ``table.take(idx)`` turns any index array of
    shape ``[...]`` into ``ids, mask`` of shape ``[..., L]``.
    """

    ids: np.ndarray   # int32 [M, L]
    mask: np.ndarray  # int32 [M, L]

    def __post_init__(self):
        if self.ids.shape != self.mask.shape or self.ids.ndim != 2:
            raise ValueError(f"TokenTable ids {self.ids.shape} and mask {self.mask.shape} must be equal [M, L]")

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``idx`` (any int shape) as ``(ids, mask)`` of shape ``idx.shape + (L,)``."""
        idx = np.asarray(idx)
        return self.ids[idx], self.mask[idx]


def texts_key(texts: Sequence[str], tokenizer_id: str, max_len: int) -> str:
    """A content hash of ``(texts, tokenizer_id, max_len)``: the cache key of a token table."""
    h = hashlib.sha256(f"{tokenizer_id}\0{max_len}\0{len(texts)}\0".encode("utf-8"))
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def build_token_table(texts: Sequence[str], tokenizer: Tokenizer, max_len: int, *,
                      cache_dir: str | pathlib.Path | None = None, tokenizer_id: str | None = None,
                      chunk: int = 4096) -> TokenTable:
    """Tokenises ``texts`` once (in chunks), optionally caching the arrays on disk.

    The cache is a plain ``.npz`` per key rather than a ``datasets`` Arrow table: the tables are small
    dense int32 matrices that are always loaded whole, so Arrow's columnar paging buys nothing here.

    Args:
      texts: the texts; row order is kept.
      tokenizer: anything with ``encode(texts, max_len) -> (ids, mask)``.
      max_len: padded length L.
      cache_dir: where to cache; ``None`` disables caching.
      tokenizer_id: a stable identity of the tokenizer (e.g. a hash of its ``tokenizer.json``); required
        with ``cache_dir`` because a cache keyed on anything less could serve another tokenizer's ids.

    Raises:
      ValueError: an empty text, a caching request without ``tokenizer_id``, or a tokenizer output of the
        wrong shape.
    """
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text {i} is empty or not a string: {t!r}")
    path = None
    if cache_dir is not None:
        if not tokenizer_id:
            raise ValueError("build_token_table: caching needs a tokenizer_id")
        path = pathlib.Path(cache_dir) / f"tokens-{texts_key(texts, tokenizer_id, max_len)}.npz"
        if path.is_file():
            with np.load(path) as z:
                return TokenTable(z["ids"], z["mask"])
    ids, mask = [], []
    for s in range(0, len(texts), chunk):
        part = texts[s:s + chunk]
        i, m = tokenizer.encode(part, max_len)
        i, m = np.asarray(i, np.int32), np.asarray(m, np.int32)
        if i.shape != (len(part), max_len) or m.shape != i.shape:
            raise ValueError(f"tokenizer returned ids {i.shape} / mask {m.shape}; expected {(len(part), max_len)}")
        ids.append(i)
        mask.append(m)
    table = TokenTable(np.concatenate(ids), np.concatenate(mask))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=table.ids, mask=table.mask)
        tmp.replace(path)  # atomic: concurrent runs never read a half-written file
        log.info("cached token table %s (%d x %d)", path, *table.ids.shape)
    return table


_DONE = object()


def prefetch(iterator: Iterable, size: int = 2) -> Iterator:
    """Runs ``iterator`` on a daemon thread, keeping up to ``size`` items ready.

    Host-side sampling (NumPy, GIL released in most of it) overlaps the device step. An exception in
    the producer is re-raised in the consumer at the point it would have surfaced; closing the
    returned generator stops the producer.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def produce():
        try:
            for x in iterator:
                while not stop.is_set():
                    try:
                        q.put((x, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as e:  # handed to the consumer, never swallowed
            q.put((_DONE, e))

    thread = threading.Thread(target=produce, daemon=True, name="mta-prefetch")
    thread.start()
    try:
        while True:
            x, err = q.get()
            if x is _DONE:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()
