"""`--head multi`: three heads (mask 3, gender 2, age 3) on one backbone, the competition recipe.

The 18-class output is the log of the product of the three softmaxes, so argmax, metrics and
prediction treat it like any 18-class model. Because that log-product equals a single linear
classifier (rows Wm[m] + Wg[g] + Wa[a]) up to a per-sample constant, `to_single` folds the heads
into one 18-way timm classifier with exactly the same softmax: that is what `best/` holds.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dist_train.errors import UserError
from dist_train.tasks.losses import make_loss

from . import labels as L

HEAD_SIZES = (len(L.MASK_NAMES), len(L.GENDER_NAMES), 3)  # classes of the mask, gender and age heads
HeadLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (head logits, head targets) -> loss


class MultiHeadModel(torch.nn.Module):
    """One timm backbone (classifier removed) + mask / gender / age linear heads.

    `forward` returns 18-class log-probabilities log p(mask) + log p(gender) + log p(age) at
    class mask*6 + gender*3 + age; `forward_heads` returns the three raw logits for the loss.
    """

    head_name = "multi"  # recorded in best/config.json (model.export)

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        if backbone.num_classes != 0:
            raise ValueError("MultiHeadModel needs a headless backbone (reset_classifier(0))")
        self.backbone = backbone
        nf = backbone.num_features
        self.mask_head = torch.nn.Linear(nf, len(L.MASK_NAMES))
        self.gender_head = torch.nn.Linear(nf, len(L.GENDER_NAMES))
        self.age_head = torch.nn.Linear(nf, 3)
        self.num_classes = L.NUM_CLASSES
        self.num_features = nf
        # timm's data-config and export helpers read these from the model.
        self.pretrained_cfg = backbone.pretrained_cfg
        self.default_cfg = backbone.pretrained_cfg

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.mask_head(f), self.gender_head(f), self.age_head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_heads(*self.forward_heads(x))

    def group_matcher(self, coarse: bool = False):
        """timm-style matcher: the backbone's groups (coarse: as `layer_groups` makes them, with the
        layers before its removed classifier in the last block group), then the three heads."""
        import timm  # not at import: `shard` loads this task without making models

        from dist_train.model.stages import layer_groups

        rev = ({n: i for i, g in enumerate(layer_groups(self.backbone)) for n in g} if coarse else
               timm.models.group_parameters(self.backbone, self.backbone.group_matcher(coarse=False), reverse=True))
        head_id = max(rev.values(), default=-1) + 1

        def match(name: str) -> int:
            if name.startswith("backbone."):
                return rev[name[len("backbone."):]]
            return head_id

        return match

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing, in the backbone (the heads are one Linear each)."""
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in nwd()} if nwd is not None else set()

    def get_classifier(self) -> torch.nn.Module:
        return torch.nn.ModuleList([self.mask_head, self.gender_head, self.age_head])

    @torch.no_grad()
    def to_single(self) -> torch.nn.Module:
        """A plain timm 18-class model with the same softmax: the heads folded into one Linear."""
        single = copy.deepcopy(self.backbone)
        single.reset_classifier(L.NUM_CLASSES)
        clf = single.get_classifier()
        if not isinstance(clf, torch.nn.Linear) or clf.in_features != self.num_features:
            raise UserError(f"--head multi: cannot export {type(self.backbone).__name__} as one timm classifier "
                            f"(its classifier is {type(clf).__name__}, not a Linear on the pooled features)")
        idx = torch.arange(L.NUM_CLASSES)
        m, g, a = idx // 6, (idx // 3) % 2, idx % 3
        clf.weight.copy_(self.mask_head.weight[m] + self.gender_head.weight[g] + self.age_head.weight[a])
        clf.bias.copy_(self.mask_head.bias[m] + self.gender_head.bias[g] + self.age_head.bias[a])
        return single


def combine_heads(mask: torch.Tensor, gender: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """(N,3),(N,2),(N,3) logits -> (N,18) log-probabilities, class = mask*6 + gender*3 + age."""
    lm, lg, la = (F.log_softmax(t.float(), dim=1) for t in (mask, gender, age))
    return (lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]).flatten(1)


def split_targets(targets18: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """18-class targets -> (mask, gender, age) targets: class indices per labels.decode, or, for
    (N, 18) probabilities (Mixup/CutMix), each task's marginal (mask: the sum over gender and age).

    The marginals are exact for a mix of one-hot targets, and an 18-class target smoothed by s
    gives head targets smoothed by the same s over each head's classes.
    """
    if targets18.ndim == 2:
        cube = targets18.float().view(-1, 3, 2, 3)
        return cube.sum(dim=(2, 3)), cube.sum(dim=(1, 3)), cube.sum(dim=(1, 2))
    return targets18 // 6, (targets18 // 3) % 2, targets18 % 3


def split_counts(counts18: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """Per-class sample counts of the 18 classes -> each head's counts (for its class weights)."""
    cube = torch.tensor(list(counts18), dtype=torch.float64).view(3, 2, 3)
    return tuple(cube.sum(dim=d).long().tolist() for d in ((1, 2), (0, 2), (0, 1)))  # type: ignore[return-value]


def split_heads(log_probs18: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 18-class output -> each head's log-softmax, by marginalising the other two tasks.

    Exact because the output is lm[m] + lg[g] + la[a] and each head's probabilities sum to 1.
    """
    cube = log_probs18.float().view(-1, 3, 2, 3)
    return cube.logsumexp(dim=(2, 3)), cube.logsumexp(dim=(1, 3)), cube.logsumexp(dim=(1, 2))


def multi_head_loss(heads_out: torch.Tensor | Sequence[torch.Tensor], targets18: torch.Tensor,
                    weights: Sequence[float] = (1.0, 1.0, 1.0), smoothing: float = 0.0,
                    losses: Sequence[HeadLoss] | None = None) -> torch.Tensor:
    """Weighted sum of the three heads' losses (the recipe's loss), for hard or soft targets.

    Takes the model's ordinary (N, 18) output — so the trainer calls the DDP-wrapped model as
    usual and gradients are all-reduced — or the (mask, gender, age) logits of forward_heads;
    both give the same loss and gradients. `losses`: one (head logits, head targets) loss per
    head (the task's --loss with each head's class weights); default cross-entropy with
    `smoothing` on hard targets. Soft (N, 18) targets are split into each task's marginal.
    """
    if isinstance(heads_out, torch.Tensor):
        if heads_out.ndim != 2 or heads_out.shape[1] != L.NUM_CLASSES:
            raise ValueError(f"multi_head_loss: expected (N, {L.NUM_CLASSES}) output, got {tuple(heads_out.shape)}")
        heads_out = split_heads(heads_out)
    if len(heads_out) != 3:
        raise ValueError("multi_head_loss expects the 18-class output or (mask, gender, age) logits")
    if losses is None:
        losses = [make_loss("ce", n, smoothing=smoothing) for n in HEAD_SIZES]
    return sum(w * loss(out, t) for w, loss, out, t in zip(weights, losses, heads_out, split_targets(targets18)))


def create_multi_head(name: str, num_classes: int, **kwargs) -> MultiHeadModel:
    """A headless timm backbone (`model.build.create_model` options) with the three heads."""
    if num_classes != L.NUM_CLASSES:
        raise UserError(f"--head multi predicts the {L.NUM_CLASSES} mask classes, but the data has {num_classes}")
    from dist_train.model.build import create_model

    return MultiHeadModel(create_model(name, 0, **kwargs))
