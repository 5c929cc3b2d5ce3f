"""The behaviour model: a causal transformer over event tokens (SASRec / GPT-like).

A user's history is a sequence of tokens; each token is an item, the kind of event (view, cart add,
purchase, ...), a bucketed time gap to the previous token and, where the data has them, hashed
features (category, brand, price bucket, rating, query/review word pieces; ``streams.state``). An
item is represented by its own embedding plus the mean embedding of its static features (known
from training data and kept in the ``item_feats`` buffer), on the input and the tied output side,
so rare items borrow strength from their category and brand. The model reads the sequence like a
language model reads text and, at every position, predicts the next item over the whole catalogue
(tied item embeddings, full softmax), the next event kind, and the probability that the user buys
within a horizon. ``forward`` takes tensors only, so the model exports to ONNX as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PAD = 0  # padding id of items, kinds and gaps
UNK = 1  # unknown item (not in the training vocabulary)


@dataclass
class ModelConfig:
    n_items: int  # item vocabulary size, including PAD (0) and UNK (1)
    n_kinds: int = 8  # event kinds (streams.state.TokenKind values 1..6) plus PAD
    n_gaps: int = 20  # time-gap buckets (see streams.state.gap_bucket) plus PAD
    max_len: int = 50  # context length in tokens
    d_model: int = 64  # width of embeddings and hidden states
    n_layers: int = 2  # transformer blocks
    n_heads: int = 2  # attention heads per block
    dropout: float = 0.5  # on embeddings, attention and feed-forward outputs
    ff_mult: int = 4  # feed-forward width as a multiple of d_model
    repeat: bool = False  # add a learned bonus for items already in the context (repeat buying/viewing)
    n_feats: int = 0  # hashed feature ids (streams.state.FEATURE_BUCKETS); 0 = no feature input
    feat_width: int = 8  # feature ids per token (streams.state.MAX_FEATURES)
    n_context: int = 0  # window features (streams.features) for the propensity branch; 0 = no branch
    prop_d: int = 16  # width of the propensity branch's token embeddings

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model),
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def forward(self, x: Tensor, mask: Tensor, *, last: bool = False) -> Tensor:
        """(b, n, d) -> (b, n, d); ``last``: the newest position's output alone (b, 1, d), the
        same values without the other positions' queries, projections and feed-forward (what
        serving needs of the final block)."""
        b, n, d = x.shape  # (batch, length, d_model)
        y = self.ln1(x)
        if last:
            w, bias = self.qkv.weight, self.qkv.bias
            x, mask = x[:, -1:], mask[:, :, -1:]
            q = F.linear(y[:, -1:], w[:d], bias[:d])
            k, v = F.linear(y, w[d : 2 * d], bias[d : 2 * d]), F.linear(y, w[2 * d :], bias[2 * d :])
        else:
            q, k, v = self.qkv(y).split(d, dim=2)
        m = q.shape[1]  # queries: n, or 1
        q = q.reshape(b, m, self.n_heads, d // self.n_heads).transpose(1, 2)  # (b, heads, m, d/h)
        k = k.reshape(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
        v = v.reshape(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        att = att.transpose(1, 2).reshape(b, m, d)
        x = x + self.drop(self.proj(att))
        out: Tensor = x + self.drop(self.ff(self.ln2(x)))
        return out


class PropensityBranch(nn.Module):
    """Purchase within the horizon from what a user did and when, not which items.

    Token kinds and time gaps (no item ids: with item embeddings a small event log lets a head
    recognise users instead of learning behaviour) are embedded with their distance from the
    newest token, pooled by attention over the real tokens (so padding changes nothing), and
    read by a small MLP together with the standardised window features (``streams.features``).
    """

    ctx_mean: Tensor  # (n_context,) training-period mean of the window features
    ctx_std: Tensor  # (n_context,)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.prop_d
        self.max_len = cfg.max_len
        self.kind = nn.Embedding(cfg.n_kinds, d, padding_idx=PAD)
        self.gap = nn.Embedding(cfg.n_gaps, d, padding_idx=PAD)
        self.dist = nn.Embedding(cfg.max_len, d)
        self.attn = nn.Linear(d, 1)
        self.mlp = nn.Sequential(
            nn.Linear(d + cfg.n_context, 32), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(32, 1)
        )
        self.linear = nn.Linear(cfg.n_context, 1)  # a logistic regression on the features, beside the MLP
        self.register_buffer("ctx_mean", torch.zeros(cfg.n_context))
        self.register_buffer("ctx_std", torch.ones(cfg.n_context))

    def forward(self, kinds: Tensor, gaps: Tensor, context: Tensor) -> Tensor:
        n = kinds.shape[1]
        dist = (n - 1 - torch.arange(n, device=kinds.device)).clamp(max=self.max_len - 1)  # (n,)
        r = self.kind(kinds) + self.gap(gaps) + self.dist(dist)[None]  # (b, n, d)
        a = self.attn(torch.tanh(r))[..., 0]  # (b, n)
        a = torch.where(kinds != PAD, a, torch.full_like(a, -1e9))
        pooled = (torch.softmax(a, dim=1)[..., None] * r).sum(dim=1)  # (b, d)
        ctx = (context - self.ctx_mean) / self.ctx_std
        logit = self.mlp(torch.cat([pooled, ctx], dim=1)) + self.linear(ctx)
        return logit[:, 0]  # type: ignore[no-any-return]


class BehaviourModel(nn.Module):
    prop_calib: Tensor  # (2,) buffer: scale and bias of the propensity logit
    item_feats: Tensor  # (n_items, feat_width) buffer: static feature ids of each item (0 = none)
    repeat_rank: Tensor  # () buffer: weight of the repeat bonus when ranking (1 in training)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(cfg.n_items, d, padding_idx=PAD)
        self.kind_emb = nn.Embedding(cfg.n_kinds, d, padding_idx=PAD)
        self.gap_emb = nn.Embedding(cfg.n_gaps, d, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.kind_head = nn.Linear(d, cfg.n_kinds)  # next event kind
        self.propensity_head = nn.Linear(d, 1)  # purchase within the horizon (logit), without a branch
        # repeat bonus: one scalar per distance back in the context and per event kind
        self.repeat_dist = nn.Embedding(cfg.max_len, 1)
        self.repeat_kind = nn.Embedding(cfg.n_kinds, 1)
        # Platt scaling of the propensity logit, fitted on the validation split after training
        self.register_buffer("prop_calib", torch.tensor([1.0, 0.0]))
        self.feat_emb = nn.Embedding(cfg.n_feats, d, padding_idx=PAD) if cfg.n_feats else None
        width = cfg.feat_width if cfg.n_feats else 0
        self.register_buffer("item_feats", torch.zeros(cfg.n_items, width, dtype=torch.long))
        # scale of the catalogue logits against the repeat bonus: fixed at 1 in training (which
        # leaves the benchmark models as they were), refitted on held-out cases (modeling.heads)
        self.logit_scale = nn.Parameter(torch.ones(()), requires_grad=False)
        # weight of the repeat bonus when ranking (top-K), chosen on held-out NDCG (modeling.heads):
        # the calibrated distribution (perplexity, likelihood) keeps weight 1
        self.register_buffer("repeat_rank", torch.ones(()))
        self.prop = PropensityBranch(cfg) if cfg.n_context else None
        self.apply(self._init)
        nn.init.zeros_(self.repeat_dist.weight)
        nn.init.zeros_(self.repeat_kind.weight)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def bag(self, ids: Tensor) -> Tensor:
        """Mean embedding (..., d) of feature ids (..., width); zero where all are padding."""
        assert self.feat_emb is not None
        # the PAD row zeroed in the table (a constant in the exported graph) instead of a mask
        # multiplying every gathered vector, and the count summed over the last axis: the same
        # values for less of the serving graph's time
        weight = self.feat_emb.weight
        keep = (torch.arange(weight.shape[0], device=weight.device) != PAD).to(weight.dtype)[:, None]
        total: Tensor = F.embedding(ids, weight * keep).sum(dim=-2)
        count = (ids != PAD).to(weight.dtype).sum(dim=-1, keepdim=True)
        return total / count.clamp(min=1.0)

    def item_table(self) -> Tensor:
        """Item representations (n_items, d): own embedding plus the bag of static features."""
        if self.feat_emb is None:
            return self.item_emb.weight
        return self.item_emb.weight + self.bag(self.item_feats)

    def forward(
        self,
        items: Tensor,
        kinds: Tensor,
        gaps: Tensor,
        feats: Tensor | None = None,
        table: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """Hidden states (b, n, d) for left-padded token tensors (b, n) with n <= max_len.

        ``feats`` (b, n, feat_width): per-token feature ids, used when the model has features.
        ``table``: ``item_table()`` when the caller already computed it.
        ``last_only``: the newest position's state alone, (b, 1, d) (the final block computes
        nothing else: serving's graph).
        """
        n = items.shape[1]
        pos = torch.arange(n, device=items.device) + (self.cfg.max_len - n)  # right-aligned positions
        table = self.item_table() if table is None else table
        x = F.embedding(items, table) * math.sqrt(self.cfg.d_model)
        x = x + self.kind_emb(kinds) + self.gap_emb(gaps) + self.pos_emb(pos)
        if self.feat_emb is not None and feats is not None:
            x = x + self.bag(feats)
        x = self.drop(x)
        valid = items != PAD  # (b, n)
        ar = torch.arange(n, device=items.device)
        causal = ar[None, :] <= ar[:, None]  # (n, n): query i sees keys j <= i
        eye = ar[None, :] == ar[:, None]
        mask = (causal & valid[:, None, :]) | eye  # (b, n, n): a pad row attends to itself only
        mask = mask[:, None, :, :]  # (b, 1, n, n), shared by the heads
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last=last_only and i == len(self.blocks) - 1)
        return self.ln_f(x)  # type: ignore[no-any-return]

    def item_logits(self, h: Tensor, table: Tensor | None = None) -> Tensor:
        """Next-item scores over the whole catalogue from hidden states (..., d) -> (..., n_items)."""
        return h @ (self.item_table() if table is None else table).T

    def next_item_scores(
        self,
        h: Tensor,
        items: Tensor,
        kinds: Tensor,
        at: Tensor,
        table: Tensor | None = None,
        *,
        ranking: bool = False,
        first: int = 0,
    ) -> Tensor:
        """Next-item scores (p, n_items) for hidden states ``h`` (p, d) at positions ``at`` (p,) of
        the token rows ``items`` / ``kinds`` (p, n): the catalogue logits plus, with ``repeat``, a
        learned bonus for each item that occurs at or before the position. ``ranking``: the bonus
        weighted by ``repeat_rank`` (what top-K ranks by); else the calibrated logits. ``first``:
        the scores of ids ``first`` and above alone, (p, n_items - first) (serving skips PAD and
        UNK without computing and then cutting them off)."""
        assert first <= UNK + 1  # PAD and UNK at most: the ids cut off never get a bonus (``seen``)
        table = self.item_table() if table is None else table
        logits = self.item_logits(h, table[first:] if first else table) * self.logit_scale
        if not self.cfg.repeat:
            return logits
        n = items.shape[1]
        dist = at[:, None] - torch.arange(n, device=items.device)[None, :]  # (p, n): 0 = this position
        seen = (dist >= 0) & (items > UNK)
        bonus = (
            self.repeat_dist(dist.clamp(0, self.cfg.max_len - 1))[..., 0] + self.repeat_kind(kinds)[..., 0]
        )
        if ranking:
            bonus = bonus * self.repeat_rank
        at_ids = (items - first).clamp(min=0) if first else items  # a PAD or UNK: a bonus of 0 (not seen)
        return logits.scatter_add(1, at_ids, torch.where(seen, bonus, torch.zeros_like(bonus)))

    def propensity(
        self,
        h: Tensor,
        kinds: Tensor | None = None,
        gaps: Tensor | None = None,
        context: Tensor | None = None,
        *,
        calibrated: bool = True,
    ) -> Tensor:
        """Probability (b,) of a purchase within the horizon, Platt-scaled (else the raw logit):
        from the propensity branch where the model has one (it reads the token kinds and gaps
        (b, n) and the window features (b, n_context)), else a linear head on the hidden states."""
        if self.prop is None:
            logit = self.propensity_head(h)[:, 0]
        else:
            assert kinds is not None and gaps is not None and context is not None
            logit = self.prop(kinds, gaps, context)
        if not calibrated:
            return logit  # type: ignore[no-any-return]
        return torch.sigmoid(self.prop_calib[0] * logit + self.prop_calib[1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ServingModel(nn.Module):
    """The graph that is exported: last-position hidden state -> top-K items and propensity.

    Inputs: ``items``, ``kinds``, ``gaps`` (int64, (batch, length), left-padded), for a model
    with features ``feats`` (int64, (batch, length, feat_width)) and, for a model with a
    propensity branch, ``context`` (float32, (batch, n_context): ``streams.features``).
    Outputs: ``top_items`` (int64, (batch, k)) vocabulary ids, ``top_scores`` (float32,
    (batch, k)) and ``propensity`` (float32, (batch,)). PAD and UNK are never returned. The item
    table is computed once and stored in the graph as a constant.
    """

    table: Tensor

    def __init__(self, model: BehaviourModel, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = min(k, model.cfg.n_items - 2)
        with torch.no_grad():
            self.register_buffer("table", model.item_table().detach().clone())

    def forward(
        self, items: Tensor, kinds: Tensor, gaps: Tensor, *extra: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``extra``: ``feats`` for a model with features, then ``context`` for one with a
        propensity branch, in that order (the graph's input order)."""
        rest = list(extra)
        feats = rest.pop(0) if self.model.cfg.n_feats else None
        context = rest.pop(0) if self.model.cfg.n_context else None
        h = self.model(items, kinds, gaps, feats, self.table, last_only=True)[:, -1, :]  # (b, d): the newest
        last = torch.full_like(items[:, 0], items.shape[1] - 1)
        logits = self.model.next_item_scores(h, items, kinds, last, self.table, ranking=True, first=2)
        scores, idx = torch.topk(logits, self.k, dim=1)
        propensity = self.model.propensity(h, kinds, gaps, context)
        return idx + 2, scores, propensity

    def logits(self, items: Tensor, kinds: Tensor, gaps: Tensor, *extra: Tensor) -> Tensor:
        """Next-item scores over the whole catalogue (b, n_items), PAD and UNK included: the
        exporter's parity check looks up any returned id's score here, and holds the top-K scores
        of ``forward`` (the newest position alone) to these (every position computed, the
        training path)."""
        feats = extra[0] if self.model.cfg.n_feats else None
        h = self.model(items, kinds, gaps, feats, self.table)[:, -1, :]
        last = torch.full_like(items[:, 0], items.shape[1] - 1)
        return self.model.next_item_scores(h, items, kinds, last, self.table, ranking=True)
