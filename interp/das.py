"""Distributed alignment search: learn a low-rank subspace whose interchange moves the model's output.

:class:`RotatedPatch` is an :class:`~interp.edits.Edit` with a trainable ``[rank, d_model]`` matrix
``W`` kept orthonormal (``torch.nn.utils.parametrizations.orthogonal``); it swaps the subspace
component of the base activation for the source's: ``x + (src @ W.T - x @ W.T) @ W``.
:func:`fit_das` learns ``W`` by gradient descent so that the edited base run predicts given labels
(usually the source run's answer), with the model's own weights frozen.

:class:`CircleRotation` and :func:`fit_das_circle` learn a *circle plane* the same way: the edit is
``Rotate(plane, to=target)`` on the circle of the class means in the learned plane (the circle refitted
at every step, so gradients flow through it), and the objective is that the edited run answers the
target class. The result is a Subspace with a :class:`~interp.subspace.CircleMap`, used exactly like
the class-mean circle or the circle probe's.

>>> das = fit_das(model, "blocks.8.hook_resid_post", base, source, labels, rank=2, steps=200)
>>> das.subspace()                           # a Subspace for every other edit and for saving
>>> interchange_accuracy(model, "blocks.8.hook_resid_post", das, test_base, test_source, test_labels)
>>> planes = fit_das_circle(model, ["blocks.4.hook_resid_post"], batch, labels, day_tokens, order=DAYS,
...                         positions=day_columns)
>>> Rotate(planes["blocks.4.hook_resid_post"], to="Thursday")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal
from tqdm.auto import tqdm

from interp.capture import capture, last_token_index
from interp.edits import ROTATE_SCALE, Edit, EditContext, per_row
from interp.errors import InputError
from interp.intervene import intervene
from interp.subspace import CircleMap, Subspace


def _orthonormal_rows(m: Tensor) -> Tensor:
    """An orthonormal basis ``[k, d]`` of the row span of `m` (numerically null directions dropped).

    The tolerance is relative to the input's own precision (``max(shape) * eps`` of its dtype), so the
    rounding noise of float32 rows that are exactly dependent (e.g. class means minus their mean) is not
    kept as a direction."""
    eps = torch.finfo(m.dtype).eps if m.is_floating_point() else torch.finfo(torch.float32).eps
    _, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return vh[s > s.max() * max(m.shape) * eps].float()


class RotatedPatch(nn.Module, Edit):
    """Interchange within a learned orthonormal rank-``rank`` subspace.

    ``within`` (directions ``[k, d_model]``) keeps the subspace inside their span (``W = A @ span`` with
    ``A`` an orthonormal ``[rank, k]``); ``init`` (``[rank, d_model]``) is where ``W`` starts (its
    projection on the span, orthonormalised), else a random orthonormal start drawn with ``seed``.
    """

    def __init__(self, d_model: int, rank: int, *, seed: int = 0, within: Tensor | None = None,
                 init: Tensor | None = None):
        super().__init__()
        span = None if within is None else _orthonormal_rows(torch.as_tensor(within).reshape(-1, d_model))
        k = d_model if span is None else len(span)
        if not 1 <= rank <= k:
            where = f"d_model={d_model}" if span is None else f"the span of `within`, of dimension {k}"
            raise InputError(f"rank must be in [1, {where}]; got {rank}")
        if init is None:
            g = torch.Generator().manual_seed(seed)
            start = torch.linalg.qr(torch.randn(k, rank, generator=g))[0].T
        else:
            init = torch.as_tensor(init).float()
            if tuple(init.shape) != (rank, d_model):
                raise InputError(f"init must be [rank={rank}, d_model={d_model}]; got {tuple(init.shape)}")
            start = init if span is None else init @ span.T
            if torch.linalg.matrix_rank(start.double()) < rank:
                raise InputError(f"init has rank < {rank} inside the span it must lie in; give independent directions "
                                 "that are not orthogonal to `within`")
            start = torch.linalg.qr(start.T.double())[0].T.float()
        self.proj = nn.Linear(k, rank, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(start)
        orthogonal(self.proj, "weight")
        self.register_buffer("span", span)
        self.source: Tensor | None = None

    @property
    def W(self) -> Float[Tensor, "rank d_model"]:
        return self.proj.weight if self.span is None else self.proj.weight @ self.span

    def set_source(self, source: Float[Tensor, "batch d_model"]) -> RotatedPatch:
        """Source activations, one per base row (e.g. the source prompt's last token)."""
        self.source = source.detach()
        return self

    def __call__(self, x: Tensor, ctx: EditContext) -> Tensor:  # type: ignore[override]
        if self.source is None:
            raise InputError("RotatedPatch has no source: call set_source(acts) before the forward pass")
        w = self.W.to(x)
        src = per_row(self.source, ctx, x)
        return x + (src @ w.T - x @ w.T) @ w

    def subspace(self, name: str = "das") -> Subspace:
        return Subspace(self.W.detach().float().cpu(), name=name, orthonormalize=False)


def fit_das(model: nn.Module, site: str, base: dict[str, Tensor], source: dict[str, Tensor],
            labels: Int[Tensor, " batch"], *, rank: int = 1, steps: int = 100, lr: float = 1e-2,
            batch_size: int | None = None, seed: int = 0, progress: bool | None = None) -> RotatedPatch:
    """Learn a :class:`RotatedPatch` at `site` (edited at the last real token of each base row).

    Args:
        base, source: tokenizer outputs (``input_ids``, ``attention_mask``) with paired rows.
        labels: the token each edited base row should predict at its last position.
        rank: dimension of the learned subspace.
        steps: optimisation steps (Adam, lr `lr`), each over a minibatch of `batch_size` rows.
    """
    n = base["input_ids"].shape[0]
    if source["input_ids"].shape[0] != n or labels.shape[0] != n:
        raise InputError(f"base ({n} rows), source ({source['input_ids'].shape[0]}) and labels "
                         f"({labels.shape[0]}) must pair up row by row")
    device = next(model.parameters()).device
    src = capture(model, source, site, positions="last")[site].float()
    das = RotatedPatch(src.shape[-1], rank, seed=seed).to(device)
    opt = torch.optim.Adam(das.parameters(), lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    bs = batch_size or n
    try:
        for _ in tqdm(range(steps), desc="das", disable=not progress):
            idx = torch.randperm(n, generator=g)[:bs]
            batch = {k: v[idx].to(device) for k, v in base.items() if isinstance(v, Tensor)}
            das.set_source(src[idx].to(device))
            with intervene(model, {site: das}, positions="last"):
                logits = _last_logits(model, batch)
            loss = nn.functional.cross_entropy(logits.float(), labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    das.set_source(src.to(device))
    return das


def interchange_accuracy(model: nn.Module, site: str, das: RotatedPatch, base: dict[str, Tensor],
                         source: dict[str, Tensor], labels: Int[Tensor, " batch"], *, batch_size: int = 32) -> float:
    """Interchange intervention accuracy: the share of base rows that predict `labels` at their last real token
    when `das` swaps in the paired source row's subspace component at `site` (that token too).

    Score pairs the subspace was not trained on: :func:`fit_das` minimises the loss on its own pairs, so its
    accuracy there is optimistic. `das` keeps the source it had.
    """
    n = base["input_ids"].shape[0]
    labels = torch.as_tensor(labels)
    if source["input_ids"].shape[0] != n or labels.shape != (n,):
        raise InputError(f"base ({n} rows), source ({source['input_ids'].shape[0]}) and labels "
                         f"({tuple(labels.shape)}) must pair up row by row")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1; got {batch_size}")
    device = next(model.parameters()).device
    kept, hits = das.source, 0
    try:
        for lo in range(0, n, batch_size):
            rows = {k: v[lo:lo + batch_size].to(device) for k, v in base.items() if isinstance(v, Tensor)}
            src = {k: v[lo:lo + batch_size] for k, v in source.items() if isinstance(v, Tensor)}
            das.set_source(capture(model, src, site, positions="last")[site].float().to(device))
            with torch.no_grad(), intervene(model, {site: das}, positions="last"):
                pred = _last_logits(model, rows).argmax(-1)
            hits += int((pred.cpu() == labels[lo:lo + batch_size].cpu()).sum())
    finally:
        das.source = kept
    return hits / n


def _kasa(points: Float[Tensor, "n 2"]) -> tuple[Tensor, Tensor]:
    """Differentiable least-squares circle (Kasa, as :func:`interp.features.fit_circle`): center, radius."""
    centroid = points.mean(0)
    spread = (points - centroid).norm(dim=1).mean()
    q = (points - centroid) / spread
    a = torch.cat([2 * q, torch.ones(len(q), 1, dtype=q.dtype, device=q.device)], 1)
    sol = torch.linalg.solve(a.T @ a, a.T @ q.pow(2).sum(1, keepdim=True)).squeeze(1)
    center = centroid + spread * sol[:2]
    return center, (points - center).norm(dim=1).mean()


class CircleRotation(RotatedPatch):
    """``Rotate(plane, to=target, radius=circle, scale=scale)`` in a learned plane ``W`` (rank 2).

    The circle is the least-squares circle through the class means' coordinates in the plane (origin:
    the mean of the class means), refitted from the current ``W`` at every call, so the edit is
    differentiable in ``W``. Each edited row's point in the plane is put at its target class's angle
    on that circle, at ``scale`` x its radius; the rest of the activation is kept. Targets (class
    indices, one per base row) are given with :meth:`set_target`. After training, :meth:`subspace`
    returns the plane with its fitted circle, and ``Rotate(subspace, to=..., scale=scale)`` (the
    library's defaults otherwise) is the same edit.
    """

    def __init__(self, means: Float[Tensor, "n_classes d_model"], classes: Sequence[str], *,
                 scale: float = ROTATE_SCALE, seed: int = 0, within: Tensor | None = None, init: Tensor | None = None):
        means = torch.as_tensor(means).float()
        if means.dim() != 2 or len(means) < 3 or len(classes) != len(means):
            raise InputError(f"means must be [n_classes >= 3, d_model] with one class name per row; got shape "
                             f"{tuple(means.shape)} and {len(classes)} names")
        if not scale > 0:
            raise InputError(f"scale must be > 0 (the circle radius multiple the point is put at); got {scale}")
        super().__init__(means.shape[1], 2, seed=seed, within=within, init=init)
        self.classes, self.scale = list(classes), float(scale)
        self.register_buffer("means", means)
        self.register_buffer("origin", means.mean(0))
        self.target: Tensor | None = None

    def set_target(self, target: Int[Tensor, " batch"]) -> CircleRotation:
        """The target class (an index into ``classes``) of each base row."""
        target = torch.as_tensor(target).long()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= len(self.classes)):
            raise InputError(f"targets must index the {len(self.classes)} classes (0..{len(self.classes) - 1}); "
                             f"got {target.min().item()}..{target.max().item()}")
        self.target = target
        return self

    def circle(self) -> tuple[Tensor, Tensor, Tensor]:
        """Class means' plane coordinates ``[n_classes, 2]``, the circle's center ``[2]`` and radius."""
        coords = (self.means - self.origin) @ self.W.T
        center, radius = _kasa(coords)
        return coords, center, radius

    def __call__(self, x: Tensor, ctx: EditContext) -> Tensor:  # type: ignore[override]
        if self.target is None:
            raise InputError("CircleRotation has no targets: call set_target(class indices) before the forward pass")
        w = self.W.to(x)
        coords, center, radius = (t.to(x) for t in self.circle())
        t = per_row(self.target, ctx, x, "CircleRotation: the target classes")
        u = coords[t] - center
        point = center + self.scale * radius * u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x + (point - (x - self.origin.to(x)) @ w.T) @ w

    def subspace(self, name: str = "das", order: Sequence[str] | None = None,  # type: ignore[override]
                 meta: dict | None = None) -> Subspace:
        """The plane with its circle (``interp.features.fit_circle``), angles increasing along `order`
        (default: ``classes``), as ``class_mean_subspace`` orients its circle."""
        from interp.features.circles import cyclic_order, fit_circle, same_cyclic_order, wrap

        basis = self.W.detach().double().cpu().clone()
        coords = (self.means.double().cpu() - self.origin.double().cpu()) @ basis.T
        fit = fit_circle(coords)
        order = list(order or self.classes)
        idx = [self.classes.index(c) for c in order]
        if wrap(fit.angles.double()[idx].roll(-1) - fit.angles.double()[idx]).sum() < 0:
            basis[1], coords[:, 1] = -basis[1], -coords[:, 1]
            fit = fit_circle(coords)
        found = cyclic_order(self.classes, fit.angles)
        info = {"finder": "das_circle", "classes": self.classes, "scale": self.scale, "radius": fit.radius,
                "radius_cv": fit.radius_cv, "circle_fit": fit.method, "cyclic_order": found,
                "order_matches": same_cyclic_order(found, order), **(meta or {})}
        cmap = CircleMap(fit.center.float(), float(fit.radius),
                         {c: float(a) for c, a in zip(self.classes, fit.angles)})
        return Subspace(basis.float(), self.origin.detach().float().cpu(), cmap, name=name, meta=info,
                        orthonormalize=False)


def _last_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits at each row's last real token ``[batch, vocab]`` (with left padding, or none, only the last
    column's are computed)."""
    mask = batch["attention_mask"]
    last = last_token_index(mask)
    if bool((last == mask.shape[1] - 1).all()):
        return model(**batch, logits_to_keep=1).logits[:, -1]
    logits = model(**batch).logits
    return logits[torch.arange(len(last), device=logits.device), last.to(logits.device)]


def _answer_logits(model: nn.Module, batch: dict[str, Tensor], class_tokens: Tensor) -> Tensor:
    """Logits of the class tokens at each row's last real token ``[batch, n_classes]``."""
    rows = _last_logits(model, batch)
    return rows[:, class_tokens.to(rows.device)].float()


def fit_das_circle(model: nn.Module, sites: str | Sequence[str], batch: dict[str, Tensor], labels: Sequence[str],
                   class_tokens: Sequence[int] | Tensor, *, order: Sequence[str],
                   positions: Int[Tensor, " batch"] | Sequence[int],
                   acts: dict[str, Tensor] | None = None, train_rows: Tensor | None = None,
                   scale: float = ROTATE_SCALE, within: str | Tensor | None = "class_means",
                   init: str | Tensor | Subspace | Mapping[str, Tensor | Subspace] = "class_mean",
                   steps: int = 60, lr: float = 0.01, batch_size: int = 16, seed: int = 0,
                   progress: bool | None = None, name: str = "das") -> dict[str, Subspace]:
    """Learn, at each of `sites` jointly, the plane whose circle edit makes the model answer the target class.

    DAS (Geiger et al.) with the circle edit as the intervention: for a base prompt of class ``c`` and a
    target ``t != c`` (drawn uniformly each step), ``Rotate(plane, to=t)`` is applied at every site at
    the prompt's `positions` column (the class mention), and the cross-entropy of ``t`` among the
    `class_tokens` at the last real token is minimised over the planes, with the model frozen. The
    circle in each plane is the class means' least-squares circle, refitted as the plane moves, so
    the trained edit is exactly ``Rotate(result[site], to=t, scale=scale)``.

    Args:
        sites: one site or several, edited together (e.g. a layer group).
        batch: tokenizer output (``input_ids``, ``attention_mask``), one row per prompt.
        labels: the class of each row, a member of `order`.
        class_tokens: the answer token of each class, in `order`'s order.
        order: the classes in cyclic order (orients each circle; angles increase along it).
        positions: the column each row's edit acts on ``[batch]`` (e.g. the day token).
        acts: ``{site: [batch, d_model]}`` activations at `positions`, if already captured (the class
            means come from them); captured otherwise.
        train_rows: rows (indices or a bool mask) used as edit bases; default: the rows whose
            unedited top answer among `class_tokens` is their own class (one extra forward pass).
        scale: where the edit puts the point: ``scale`` x the circle's radius (Rotate's ``scale``).
        within: ``"class_means"`` keeps each plane inside the span of the class means (minus their
            mean; ``n_classes - 1`` directions), None lets it range over the whole residual stream,
            or directions ``[k, d_model]`` (the same at every site).
        init: ``"class_mean"`` starts from the class means' top-2 principal plane (the plane of
            ``class_mean_subspace``), ``"random"`` from a random plane (``seed``), a ``[2, d_model]``
            tensor or a Subspace (its first two directions), or ``{site: one of those}`` (e.g. the
            result of an earlier call, to train on).
        steps, lr, batch_size: Adam steps over minibatches of base rows (without replacement within
            an epoch).

    Returns ``{site: Subspace}`` (origin: the mean of the class means; a :class:`CircleMap`) whose
    ``meta`` records the training (``losses`` per step, the settings).
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    order = [str(c) for c in order]
    labels = [str(v) for v in labels]
    n = batch["input_ids"].shape[0]
    if not names:
        raise InputError("sites is empty: name at least one site, e.g. 'blocks.4.hook_resid_post'")
    if len(set(order)) != len(order) or len(order) < 3:
        raise InputError(f"order must list at least 3 distinct classes; got {order}")
    unknown = sorted(set(labels) - set(order))
    if len(labels) != n or unknown:
        raise InputError(f"labels must give one class of `order` per row ({n} rows); got {len(labels)} labels"
                         + (f", unknown classes {unknown[:5]}" if unknown else ""))
    missing = sorted(set(order) - set(labels))
    if missing:
        raise InputError(f"every class needs prompts for its mean; none for {missing}")
    class_tokens = torch.as_tensor(class_tokens).long()
    positions = torch.as_tensor(positions).long()
    if class_tokens.shape != (len(order),) or positions.shape != (n,):
        raise InputError(f"class_tokens must be [n_classes={len(order)}] and positions [batch={n}]; got "
                         f"{tuple(class_tokens.shape)} and {tuple(positions.shape)}")
    if not (steps >= 1 and lr > 0 and batch_size >= 1):
        raise InputError(f"steps and batch_size must be >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    if isinstance(within, str) and within != "class_means":
        raise InputError(f"within={within!r}: use 'class_means', None or a [k, d_model] tensor of directions")
    if isinstance(init, str) and init not in ("class_mean", "random"):
        raise InputError(f"init={init!r}: use 'class_mean', 'random', a [2, d_model] tensor or a Subspace")
    if isinstance(init, Mapping) and sorted(init) != sorted(names):
        raise InputError(f"init as a mapping must name every site once; sites {names}, got {sorted(init)}")
    device = next(model.parameters()).device
    y = torch.tensor([order.index(v) for v in labels])
    if acts is None:
        got = capture(model, batch, names, positions=positions[:, None])
        acts = {s: got[s][:, 0] for s in names}
    if train_rows is None:
        with torch.no_grad():
            top = _answer_logits(model, {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)},
                                 class_tokens).argmax(-1).cpu()
        train_rows = (top == y).nonzero()[:, 0]
    train_rows = torch.as_tensor(train_rows)
    train_rows = train_rows.nonzero()[:, 0] if train_rows.dtype == torch.bool else train_rows.long()
    if len(train_rows) == 0:
        raise InputError("no training rows: the model answers none of the prompts with their own class; pass "
                         "train_rows= explicitly, or prompts the model gets right")
    modules = {}
    for i, s in enumerate(names):
        a = torch.as_tensor(acts[s]).float().cpu()
        if a.shape[0] != n or a.dim() != 2:
            raise InputError(f"acts[{s!r}] must be [batch={n}, d_model]; got {tuple(a.shape)}")
        means = torch.stack([a[y == k].mean(0) for k in range(len(order))])
        pcs = _orthonormal_rows(means - means.mean(0))
        span = pcs if isinstance(within, str) else (None if within is None else torch.as_tensor(within).float())
        given = init[s] if isinstance(init, Mapping) else init
        if isinstance(given, Subspace):
            given = given.basis[:2]
        start = pcs[:2] if isinstance(given, str) and given == "class_mean" else (
            None if isinstance(given, str) else torch.as_tensor(given).float())
        modules[s] = CircleRotation(means, order, scale=scale, seed=seed + i, within=span, init=start).to(device)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    tokens = class_tokens.to(device)
    queue: list[int] = []
    losses = []
    try:
        for _ in tqdm(range(steps), desc="das circle", disable=not progress):
            if len(queue) < batch_size:
                queue += train_rows[torch.randperm(len(train_rows), generator=g)].tolist()
            idx, queue = torch.tensor(queue[:batch_size]), queue[batch_size:]
            shift = torch.randint(1, len(order), (len(idx),), generator=g)
            target = (y[idx] + shift) % len(order)  # uniform over the other classes
            for m in modules.values():
                m.set_target(target)
            rows = {k: v[idx].to(device) for k, v in batch.items() if isinstance(v, Tensor)}
            with intervene(model, modules, positions=[[int(p)] for p in positions[idx]]):
                logits = _answer_logits(model, rows, tokens)
            loss = nn.functional.cross_entropy(logits, target.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 5))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    settings = {"objective": "circle edit to a random other class; cross-entropy among the class tokens",
                "sites": names, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                "within": within if within is None or isinstance(within, str) else "given",
                "init": init if isinstance(init, str) else "given", "n_train_rows": len(train_rows), "losses": losses}
    return {s: m.subspace(f"{name} {s}" if len(names) > 1 else name, order, {**settings, "site": s})
            for s, m in modules.items()}
