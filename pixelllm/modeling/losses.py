"""Losses (DESIGN §1, Eq. 4): label-smoothed CE + lambda * L1 on supervised tokens; L1 + GIoU on the EOS box;
focal + dice on masks (+ SAM's IoU regression); CenterNet losses on proposals. Every function returns a scalar
and is safe when nothing in the batch is supervised (returns 0 connected to the graph)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """logits: BxTxV; labels: BxT with -100 where ignored. Mean over supervised tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def location_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|p_hat - p|_1 per token (sum over the 4 coordinates), averaged over tokens with location supervision.

    pred, target: BxTx4 normalised; mask: BxT bool. Tokens without a trace are masked out (DESIGN §1)."""
    mask = mask.to(pred.dtype)
    per_token = (pred - target).abs().sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def eos_box_loss(pred_box: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """pred_box, target: Bx4 normalised (x0, y0, x1, y1), pred already ordered; valid: B bool.
    Returns (L1 summed over coordinates, GIoU loss), each averaged over valid rows."""
    if not bool(valid.any()):
        zero = pred_box.sum() * 0.0
        return zero, zero
    p, t = pred_box[valid].float(), target[valid].float()
    l1 = (p - t).abs().sum(-1).mean()
    giou = generalized_box_iou_loss(p, t, reduction="mean")
    return l1, giou


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits, target: Nx H x W. Mean soft dice loss."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    num = 2 * (prob * target).sum(-1) + 1.0
    den = prob.sum(-1) + target.sum(-1) + 1.0
    return (1 - num / den).mean()


def mask_losses(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """logits: NxHxW mask logits; target: NxHxW in {0,1} (same frame); iou_pred: N.
    Focal (mean per pixel), dice, and MSE of the predicted IoU against the real IoU (as SAM trains it)."""
    logits, target = logits.float(), target.float()
    focal = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="mean")
    dice = dice_loss(logits, target)
    with torch.no_grad():
        hard = (logits > 0).float()
        inter = (hard * target).flatten(1).sum(-1)
        union = ((hard + target) > 0).float().flatten(1).sum(-1)
        real_iou = inter / union.clamp(min=1.0)
    iou = F.mse_loss(iou_pred.float(), real_iou)
    return {"mask_focal": focal, "mask_dice": dice, "mask_iou": iou}


def centernet_targets(boxes: torch.Tensor, valid: torch.Tensor, height: int, width: int
                      ) -> dict[str, torch.Tensor]:
    """Render CenterNet targets.

    boxes: BxMx4 normalised (x0, y0, x1, y1); valid: BxM bool. Returns heatmap Bx1xHxW (elliptical Gaussians,
    sigma = box side / 6 in cells), size Bx2xHxW, offset Bx2xHxW and centre mask BxHxW."""
    batch = boxes.shape[0]
    device = boxes.device
    heat = torch.zeros(batch, 1, height, width, device=device)
    size = torch.zeros(batch, 2, height, width, device=device)
    offset = torch.zeros(batch, 2, height, width, device=device)
    centre = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    ys = torch.arange(height, device=device).view(-1, 1).float()
    xs = torch.arange(width, device=device).view(1, -1).float()
    for b in range(batch):
        for box in boxes[b][valid[b]]:
            x0, y0, x1, y1 = box.tolist()
            cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
            ix, iy = min(int(cx), width - 1), min(int(cy), height - 1)
            sx = max((x1 - x0) * width / 6, 0.5)
            sy = max((y1 - y0) * height / 6, 0.5)
            g = torch.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
            heat[b, 0] = torch.maximum(heat[b, 0], g)
            size[b, :, iy, ix] = torch.tensor([x1 - x0, y1 - y0], device=device)
            offset[b, :, iy, ix] = torch.tensor([cx - ix, cy - iy], device=device)
            centre[b, iy, ix] = True
    return {"heatmap": heat, "size": size, "offset": offset, "centre": centre}


def centernet_losses(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4) on the heatmap, L1 on size (weight 5, sizes are
    normalised) and offset at object centres, each normalised by the number of objects."""
    pred = torch.sigmoid(out["heatmap"].float()).clamp(1e-4, 1 - 1e-4)
    gt = targets["heatmap"]
    pos = targets["centre"].unsqueeze(1).float()
    num = pos.sum().clamp(min=1.0)
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred**2 * (1 - gt) ** 4 * (1 - pos)).sum()
    heat = -(pos_loss + neg_loss) / num
    size = ((out["size"].float() - targets["size"]).abs() * pos).sum() / num * 5.0
    offset = ((out["offset"].float() - targets["offset"]).abs() * pos).sum() / num
    return {"proposal_heatmap": heat, "proposal_size": size, "proposal_offset": offset}
