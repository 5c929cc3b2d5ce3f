"""Baselines evaluated beside the model on the same split: most-popular and item-kNN.

In: the training histories of a ``Split`` (vocab ids). Out: scorers that map a batch of case
histories to a dense (batch, n_items) score tensor, ranked with the same code as the model.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class MostPopular:
    """Items by how often they occur in the training data."""

    name = "most-popular"

    def __init__(self, histories: list[list[int]], n_items: int) -> None:
        counts = np.zeros(n_items, dtype=np.float32)
        for h in histories:
            np.add.at(counts, h, 1.0)
        self.scores = torch.from_numpy(counts)

    def score(self, histories: list[list[int]]) -> torch.Tensor:
        return self.scores.expand(len(histories), -1).clone()


class ItemKNN:
    """Item-to-item cosine similarity of co-occurrence in users' training histories.

    A user's score for item j is the sum of j's similarity to each item of the history; each item
    keeps its ``neighbors`` most similar items. Popularity breaks ties for items with no neighbour.
    """

    name = "item-kNN"

    def __init__(self, histories: list[list[int]], n_items: int, neighbors: int = 100) -> None:
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        cols: np.ndarray = (
            np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            if histories
            else np.zeros(0, dtype=np.int64)
        )
        x = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(histories), n_items)
        )
        x.data[:] = 1.0  # binary: repeated items count once per user
        co = (x.T @ x).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        deg = np.sqrt(np.asarray(x.sum(axis=0)).ravel()) + 1e-9
        co = sp.diags(1.0 / deg) @ co @ sp.diags(1.0 / deg)
        self.sim = _top_per_row(co.tocsr(), neighbors)
        self.pop = MostPopular(histories, n_items).scores * 1e-6

    def score(self, histories: list[list[int]]) -> torch.Tensor:
        n = self.sim.shape[0]
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
        h = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(histories), n))
        dense = np.asarray((h @ self.sim).todense(), dtype=np.float32)
        return torch.from_numpy(dense) + self.pop


def _top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    indptr, indices, data = [0], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        vals, cols = m.data[lo:hi], m.indices[lo:hi]
        if len(vals) > k:
            keep = np.argpartition(-vals, k)[:k]
            vals, cols = vals[keep], cols[keep]
        indices.extend(cols.tolist())
        data.extend(vals.tolist())
        indptr.append(len(indices))
    return sp.csr_matrix(
        (np.asarray(data, dtype=np.float32), np.asarray(indices), np.asarray(indptr)), shape=m.shape
    )


class RecentItems:
    """The user's own recent items, newest first (repeat views and purchases), then popularity.

    Only meaningful where history is not excluded (event logs)."""

    name = "recent-items"

    def __init__(self, histories: list[list[int]], n_items: int, window: int = 50) -> None:
        self.pop = MostPopular(histories, n_items).scores
        self.pop = self.pop / (self.pop.max() + 1.0)  # below 1: any recent item ranks above
        self.window = window

    def score(self, histories: list[list[int]]) -> torch.Tensor:
        out = self.pop.expand(len(histories), -1).clone()
        for r, h in enumerate(histories):
            recent = h[-self.window :]
            for pos, item in enumerate(recent):
                out[r, item] = 1.0 + pos  # later (newer) positions overwrite with higher scores
        return out
