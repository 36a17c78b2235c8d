"""PixelLLM (DESIGN §1): image encoder V, prompt encoder P, prompt feature extractor E, T5 PrefixLM L with a
per-token location head, SAM mask decoder for referring segmentation, CenterNet proposal head for dense captions.

Coordinates are normalised to [0, 1] of the image everywhere in this module, boxes (x0, y0, x1, y1).
Persistence (save_pretrained / from_pretrained) lives in `pixelllm.checkpoint`; this file is the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from pixelllm.config import PixelLLMConfig
from pixelllm.model_card import MODEL_CARD, PAPER_URL
from pixelllm.modeling import losses, stages
from pixelllm.modeling.attention_supervision import attention_supervision_loss, capture_cross_attention
from pixelllm.modeling.heads import LocationHead, ProposalHead, ReferringMaskHead
from pixelllm.modeling.image_encoder import ImageFeatures, PixelImageEncoder, build_vit
from pixelllm.modeling.language_model import (
    DecodeStep,
    Prefix,
    build_t5,
    decode,
    decoder_features,
    mix_own_predictions,
)
from pixelllm.modeling.prompt_extractor import PromptFeatureExtractor
from pixelllm.tokenizer import encode_text, never_sampled


class PixelLLM(nn.Module, PyTorchModelHubMixin, library_name="pixelllm", repo_url="https://github.com/pixelllm",
               paper_url=PAPER_URL, model_card_template=MODEL_CARD):
    def __init__(self, config: PixelLLMConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = PixelLLMConfig.from_dict(config)
        self.config = config
        c = config.prompt_embed_dim
        grid = config.grid_size
        sem = config.semantic_encoder
        self.image_encoder = PixelImageEncoder(
            sam_encoder=build_vit(config.image_encoder, c),
            semantic_encoder=build_vit(sem, c) if sem is not None else None,
            semantic_img_size=sem.img_size if sem is not None else None,
            out_chans=c,
        )
        prompt_encoder = PromptEncoder(embed_dim=c, image_embedding_size=(grid, grid),
                                       input_image_size=(config.image_size, config.image_size), mask_in_chans=16)
        self.prompt_extractor = PromptFeatureExtractor(
            prompt_encoder=prompt_encoder,
            transformer=TwoWayTransformer(depth=config.extractor_depth, embedding_dim=c,
                                          num_heads=config.extractor_heads, mlp_dim=config.extractor_mlp_dim),
            num_queries=config.num_query_tokens, embed_dim=c, lm_dim=config.t5.d_model, roi_grid=config.roi_grid,
            roi_position=config.roi_position,
        )
        self.language_model = build_t5(config.t5, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
        self.loc_head = LocationHead(config.t5.d_model, config.loc_head_hidden, config.loc_head_layers)
        self.mask_head = ReferringMaskHead(
            prompt_encoder=prompt_encoder,
            mask_decoder=MaskDecoder(
                transformer_dim=c,
                transformer=TwoWayTransformer(depth=config.mask_decoder_depth, embedding_dim=c,
                                              num_heads=config.mask_decoder_heads,
                                              mlp_dim=config.mask_decoder_mlp_dim),
                num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=c,
            ),
            embed_dim=c,
        )
        self.proposal_head = ProposalHead(c, config.proposal_channels, config.proposal_upsample)
        self.register_buffer("pixel_mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_constants()
        self.tokenizer: Any = None  # set by the builder / from_pretrained; saved with the checkpoint
        self.version = f"untrained-{id(self):x}"  # weights fingerprint; part of the image-embedding cache key
        self.source = "in-memory"
        self.directory: str | None = None  # the local folder from_pretrained read (a hub id's snapshot)
        self.adapter_configs: dict[str, Any] = {}
        self.adapter_versions: dict[str, str] = {}  # name -> fingerprint of the weights file it was loaded from

    def reset_constants(self) -> None:
        """Set the tensors that come from the config, not from training (no checkpoint holds them)."""
        with torch.no_grad():
            for name, values in (("pixel_mean", self.config.pixel_mean), ("pixel_std", self.config.pixel_std)):
                buffer = getattr(self, name)
                if buffer.device.type != "meta":
                    buffer.copy_(torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PixelLLM:
        """After any cast (`.to(torch.bfloat16)`, `.half()`, ...) keep SAM's random-Fourier position encoding in
        float32: segment_anything casts prompt coordinates to float32 before multiplying them with this matrix
        (`PositionEmbeddingRandom.forward_with_coords`), so a bf16 matrix fails, and sin/cos of bf16 products
        would be imprecise anyway. Its outputs are cast to the model's dtype where they are used."""
        super()._apply(fn, recurse)
        pe = self.prompt_extractor.prompt_encoder.pe_layer
        if pe.positional_encoding_gaussian_matrix.is_floating_point():
            pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
        return self

    # ------------------------------------------------------------------ encoding
    @property
    def device(self) -> torch.device:
        return self.prompt_extractor.queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_extractor.queries.dtype

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xSxS float in [0, 255] at the encoder's input size -> normalised like SAM."""
        return ((images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std).to(self.dtype)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images: Bx3xSxS float in [0, 255], already resized to S = config.image_size."""
        return self.image_encoder(self.normalize(images))

    def roi_grid_for(self, boxes: torch.Tensor | None, points: torch.Tensor | None) -> int:
        """RoI grid of a prompt batch (config `global_roi_grid` for the unprompted prefix, else `roi_grid`)."""
        return self.prompt_extractor.grid_for(boxes, points, self.config.global_roi_grid)

    def encode_prefix(self, features: ImageFeatures, *, boxes: torch.Tensor | None = None,
                      points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
                      text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> Prefix:
        """PrefixLM encoder pass: [E(P(prompt), V(I)) ; embed(text prompt)] through the T5 encoder.

        features: per-image features (B rows, or 1 row broadcast to the prompt batch).
        boxes: Bx4 normalised; points: BxNx2 normalised, point_labels BxN (1 pos, 0 neg, -1 pad);
        none of them = the global box. text_ids/text_mask: BxL optional text prompt (no EOS needed).
        """
        batch = max(x.shape[0] for x in (boxes, points, text_ids, features.fused) if x is not None)
        prompt = self.prompt_extractor.embed_prompt(boxes=boxes, points=points, point_labels=point_labels)
        prompt = prompt.expand(batch, -1, -1)
        regions = self.prompt_extractor.region_of(boxes, points, point_labels, batch, prompt.device)
        visual = self.prompt_extractor(features.fused, prompt, regions, self.roi_grid_for(boxes, points))
        mask = torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device)
        if text_ids is not None and text_ids.shape[1] > 0:
            text_ids = text_ids.expand(batch, -1)
            text_mask = torch.ones_like(text_ids) if text_mask is None else text_mask.expand(batch, -1)
            embeds = torch.cat([visual, self.language_model.get_input_embeddings()(text_ids)], dim=1)
            mask = torch.cat([mask, text_mask.long()], dim=1)
        else:
            embeds = visual
        hidden = self.language_model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return Prefix(hidden=hidden, mask=mask)

    # ------------------------------------------------------------------ training
    def teacher_forced(self, prefix: Prefix, labels: torch.Tensor, *, own_rate: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """labels: BxT target tokens (-100 = ignore). Returns (logits BxTxV, location points BxTx4) aligned with
        labels: position i predicts labels[i] and its location.

        own_rate > 0 (training, `config.scheduled_sampling`): each decoder input after the start token is, with
        that probability, the model's own greedy prediction of the label it replaces (one extra gradient-free
        pass over the reference inputs); the returned outputs come from the mixed inputs."""
        decoder_input_ids = self.language_model._shift_right(labels)
        if own_rate > 0:
            decoder_input_ids = mix_own_predictions(self.language_model, prefix, labels, decoder_input_ids,
                                                    own_rate)
        logits, hidden = decoder_features(self.language_model, decoder_input_ids, prefix)
        return logits, self.loc_head(hidden)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training forward. `batch` holds `images` (Bx3xSxS, 0-255) — or `image_features` (ImageFeatures of B
        images, precomputed by `encode_image`: valid while the image encoder is frozen and carries no LoRA, as in
        corrections finetuning) — and any subset of:

        prompt_boxes Bx4 | prompt_points BxNx2 + point_labels BxN; prompt_ids / prompt_mask BxL;
        labels BxT (-100 ignored; EOS included) — caption or referring-expression tokens;
        token_boxes BxTx4 + token_box_mask BxT — per-token trace boxes (normalised);
        refer_boxes Bx4 + refer_valid B — object box read at the EOS position;
        masks BxSxS (0/1, model-input frame) + mask_valid B — referring masks, prompted by refer_boxes;
        gt_boxes BxMx4 + gt_valid BxM — all objects, for the proposal head;
        image_index R — optional: the targets (labels, refer_boxes, masks) have R rows, row r on image
        image_index[r], and each image is encoded once. Without per-row prompts the prompt is encoded once per
        image too (the global box with the referring prompt: the `refer_image` task); with them (prompt_boxes /
        prompt_points / prompt_ids of R rows: the `region_image` task) every row's prefix reads its image's features.
        Returns a dict of weighted loss terms and their sum under "loss".
        """
        cfg = self.config
        features = batch["image_features"] if "image_features" in batch else self.encode_image(batch["images"])
        out: dict[str, torch.Tensor] = {}
        if "labels" in batch:
            rows_image = batch.get("image_index")
            text_ids, text_mask = batch.get("prompt_ids"), batch.get("prompt_mask")
            if "refer_boxes" in batch and text_ids is None:
                text_ids = self.refer_prompt_ids()
            prompts = [k for k in ("prompt_boxes", "prompt_points", "prompt_ids") if k in batch]
            if rows_image is not None and any(batch[k].shape[0] != rows_image.shape[0] for k in prompts):
                raise ValueError(f"with image_index, prompts are per row: {', '.join(prompts)} need "
                                 f"{rows_image.shape[0]} rows, one per target row")
            # per-row prompts read their own image's features (an index, so gradients sum over its rows)
            row_features = features.index(rows_image) if rows_image is not None and prompts else features
            prefix = self.encode_prefix(row_features, boxes=batch.get("prompt_boxes"),
                                        points=batch.get("prompt_points"), point_labels=batch.get("point_labels"),
                                        text_ids=text_ids, text_mask=text_mask)
            if rows_image is not None and not prompts:
                prefix = prefix.select(rows_image)
            labels = batch["labels"]
            if cfg.attn_supervision_weight > 0 and self.prompt_extractor.roi_grid == 0:
                raise ValueError("attn_supervision_weight > 0 needs RoI cells to supervise: set roi_grid > 0 "
                                 "(or attn_supervision_weight 0)")
            supervise = cfg.attn_supervision_weight > 0 and ("token_boxes" in batch or "refer_boxes" in batch)
            # referring expressions are the given query, never the model's own words
            own_rate = cfg.scheduled_sampling if self.training and "refer_boxes" not in batch else 0.0
            # the last decoder pass (the one with gradients) is the one captured
            with capture_cross_attention(self.language_model, supervise) as captured:
                logits, points = self.teacher_forced(prefix, labels, own_rate=own_rate)
            out["caption"] = losses.caption_loss(logits, labels, cfg.label_smoothing)
            if "token_boxes" in batch and cfg.loc_loss_weight > 0:  # 0: a captioning-only stage
                loc = losses.location_loss(points, batch["token_boxes"], batch["token_box_mask"] & (labels != -100))
                out["location"] = cfg.loc_loss_weight * loc
            if "refer_boxes" in batch:
                eos_pos = (labels == cfg.eos_token_id).int().argmax(dim=1)
                eos_box = LocationHead.as_box(points[torch.arange(labels.shape[0]), eos_pos])
                l1, giou = losses.eos_box_loss(eos_box, batch["refer_boxes"], batch["refer_valid"])
                out["eos_l1"] = cfg.eos_l1_weight * l1
                out["eos_giou"] = cfg.eos_giou_weight * giou
            if supervise:
                supervision = attention_supervision_loss(self, batch, prefix, captured)
                out["attn_cells"] = cfg.attn_supervision_weight * supervision
        if "masks" in batch and bool(batch["mask_valid"].any()):
            # SAM's decoder takes one image and K prompts: one call per image, with all of its rows' boxes
            image_of = batch.get("image_index", torch.arange(batch["masks"].shape[0], device=batch["masks"].device))
            valid = batch["mask_valid"]
            images = image_of[valid].unique().tolist()
            groups = [(valid & (image_of == b)).nonzero().flatten() for b in images]
            logits, iou = zip(*(self.mask_head(features.sam[b:b + 1], batch["refer_boxes"][g])
                                for b, g in zip(images, groups)))
            rows = torch.cat(groups)
            logits = F.interpolate(torch.cat(logits), size=batch["masks"].shape[-2:], mode="bilinear",
                                   align_corners=False)[:, 0]
            terms = losses.mask_losses(logits, batch["masks"][rows], torch.cat(iou)[:, 0])
            out["mask_focal"] = cfg.mask_focal_weight * terms["mask_focal"]
            out["mask_dice"] = cfg.mask_dice_weight * terms["mask_dice"]
            out["mask_iou"] = cfg.mask_iou_weight * terms["mask_iou"]
        if "gt_boxes" in batch and cfg.proposal_weight > 0:  # 0: a stage that does not train the proposal head
            pred = self.proposal_head(features.fused)
            height, width = pred["heatmap"].shape[-2:]
            targets = losses.centernet_targets(batch["gt_boxes"], batch["gt_valid"], height, width)
            for name, value in losses.centernet_losses(pred, targets).items():
                out[name] = cfg.proposal_weight * value
        if not out:
            raise ValueError("batch has no targets: give labels, masks or gt_boxes")
        out["loss"] = sum(out.values())
        return out

    def refer_prompt_ids(self) -> torch.Tensor | None:
        """1xL token ids of `config.refer_prompt`, the encoder text prompt of the referring task (None when
        empty): the same in training (`forward` on batches with `refer_boxes` and no text prompt) and in `refer`."""
        if not self.config.refer_prompt:
            return None
        ids = encode_text(self.tokenizer, self.config.refer_prompt, eos=False)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ inference
    def stream(self, prefix: Prefix, *, max_new_tokens: int | None = None, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               generator: torch.Generator | None = None, with_boxes: bool = True
               ) -> Iterator[tuple[DecodeStep, torch.Tensor | None]]:
        """Incremental decoding with the KV cache. Yields per step (DecodeStep, boxes Bx4 normalised
        (x0, y0, x1, y1) or None when with_boxes=False). The box never feeds back into decoding. No repetition
        penalty unless given (the predictor passes `config.repetition_penalty`)."""
        # sampling never draws a token the model never learns to emit (byte pieces: broken characters)
        never = never_sampled(self.tokenizer, self.config.t5.vocab_size) if do_sample and self.tokenizer else ()
        steps = decode(self.language_model, prefix, max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                       eos_token_id=self.config.eos_token_id, pad_token_id=self.config.pad_token_id,
                       do_sample=do_sample, temperature=temperature, top_p=top_p,
                       repetition_penalty=repetition_penalty, generator=generator, never_sample=never)
        for step in steps:
            boxes = LocationHead.as_box(self.loc_head(step.hidden)) if with_boxes else None
            yield step, boxes

    def trace(self, prefix: Prefix, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Controlled trace generation (MITR's first task): the box of every token of a given caption.

        prefix: one row; caption_ids: T token ids without EOS. The decoder is teacher-forced on [caption, EOS];
        returns (boxes Tx4 normalised, log-probability of each of the T + 1 tokens)."""
        eos = torch.tensor([self.config.eos_token_id], dtype=torch.long, device=caption_ids.device)
        labels = torch.cat([caption_ids, eos])[None]
        logits, points = self.teacher_forced(prefix, labels)
        logp = torch.log_softmax(logits[0].float(), -1).gather(1, labels[0, :, None])[:, 0]
        return LocationHead.as_box(points[0, : caption_ids.shape[0]]), logp

    def refer(self, features: ImageFeatures, expression_ids: torch.Tensor, expression_mask: torch.Tensor,
              mask_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Referring localisation + segmentation for K expressions on one image.

        features: one image; expression_ids: KxT token ids *without* EOS, right-padded; expression_mask: KxT;
        mask_rows: indices (M) of the expressions to segment, None = all K (boxes and scores are always made).
        The decoder is teacher-forced on [t, EOS] under the global-box prompt; the location head's output at EOS
        is the box. Returns boxes Kx4, score K (geometric-mean token probability of [t, EOS]), mask_rows M,
        mask_logits Mx(4h)x(4w) in the model-input frame and mask_iou M (SAM's predicted IoU) for those rows."""
        k = expression_ids.shape[0]
        lengths = expression_mask.sum(1)
        labels = torch.full((k, expression_ids.shape[1] + 1), -100, dtype=torch.long, device=expression_ids.device)
        for i in range(k):
            n = int(lengths[i])
            labels[i, :n] = expression_ids[i, :n]
            labels[i, n] = self.config.eos_token_id
        prefix = self.encode_prefix(features, boxes=None, text_ids=self.refer_prompt_ids()).expand(k)
        logits, points = self.teacher_forced(prefix, labels)
        rows = torch.arange(k, device=labels.device)
        boxes = LocationHead.as_box(points[rows, lengths])
        logp = torch.log_softmax(logits.float(), -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
        valid = labels != -100
        score = torch.exp((logp * valid).sum(1) / valid.sum(1))
        mask_rows = rows if mask_rows is None else mask_rows.to(rows.device)
        if len(mask_rows):
            mask_logits, iou = self.mask_head(features.sam[:1], boxes[mask_rows])
            mask_logits, iou = mask_logits[:, 0], iou[:, 0]
        else:  # nothing to segment: SAM's decoder is not asked for an empty batch
            side = 4 * features.sam.shape[-2], 4 * features.sam.shape[-1]
            mask_logits, iou = boxes.new_zeros((0, *side)), boxes.new_zeros(0)
        return {"boxes": boxes, "score": score, "mask_rows": mask_rows, "mask_logits": mask_logits,
                "mask_iou": iou}

    def propose(self, features: ImageFeatures, *, top_k: int = 50, score_threshold: float = 0.05,
                nms_iou: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Region proposals for dense captioning: per image (boxes Kx4 normalised, scores K), after NMS."""
        return ProposalHead.decode(self.proposal_head(features.fused), top_k=top_k,
                                   score_threshold=score_threshold, nms_iou=nms_iou)

    # ------------------------------------------------------------------ training stages
    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by component (``pixelllm.modeling.stages.COMPONENTS``, plus ``"lora"``)."""
        return stages.parameter_groups(name for name, _ in self.named_parameters())

    def set_stage(self, stage: str) -> list[str]:
        """Mark exactly the parameters a training stage trains (requires_grad) and return their names.
        The stages (scratch, caption, ln, multitask, finetune) are ``pixelllm.modeling.stages.STAGES``."""
        trainable = stages.stage_parameters((name for name, _ in self.named_parameters()), stage)
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        return sorted(trainable)

    # ------------------------------------------------------------------ adapters (LoRA through peft)
    def add_adapter(self, name: str, *, extra_targets: tuple[str, ...] = ()) -> None:
        """Inject a fresh LoRA adapter (rank/targets from config.lora) and activate it."""
        from pixelllm import adapters

        config = adapters.lora_config(self.config.lora, extra_targets)
        adapters.add_adapter(self, name, config)
        self.adapter_configs[name] = config
        self.adapter_versions.pop(name, None)  # trained in memory: no file says which weights these are
        self.train(self.training)  # new LoRA dropout modules start in train mode; follow the model

    def load_adapter(self, directory: str | Path, name: str, *, activate: bool = True) -> None:
        from pixelllm import adapters
        from pixelllm.checkpoint import file_fingerprint

        self.adapter_configs[name] = adapters.load_adapter(self, Path(directory), name)
        self.adapter_versions[name] = file_fingerprint(Path(directory) / adapters.ADAPTER_WEIGHTS)
        self.train(self.training)
        if activate:
            adapters.set_active_adapter(self, name)

    def set_adapter(self, name: str | None) -> None:
        """Switch the active adapter at runtime (None = base model)."""
        from pixelllm import adapters

        adapters.set_active_adapter(self, name)

    @property
    def active_adapter(self) -> str | None:
        from pixelllm import adapters

        return adapters.active_adapter(self)

    @property
    def adapters(self) -> list[str]:
        from pixelllm import adapters

        return adapters.list_adapters(self)

    # ------------------------------------------------------------------ persistence (see pixelllm.checkpoint)
    def save_pretrained(self, save_directory: str | Path, *, dtype: torch.dtype | None = None,
                        **kwargs: Any) -> Any:
        """Write config.json, model.safetensors (optionally cast, e.g. float16), tokenizer files and adapters."""
        self._save_dtype = dtype
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._save_dtype = None

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The README.md of a saved folder (pixelllm.model_card); `save_pretrained(..., model_card_kwargs={"training":
        markdown})` adds how the weights were trained."""
        count = sum(p.numel() for p in self.parameters())
        facts = {"preset": self.config.preset, "parameters": f"{count / 1e6:.2f} M",
                 "image_size": self.config.image_size,
                 "vocab_size": self.config.t5.vocab_size,
                 "dtype": str(getattr(self, "_save_dtype", None) or self.dtype).replace("torch.", ""),
                 "adapters": ", ".join(self.adapters)}
        return super().generate_model_card(*args, **{**facts, **kwargs})

    def _save_pretrained(self, save_directory: Path) -> None:
        from pixelllm.checkpoint import save_checkpoint_files

        save_checkpoint_files(self, Path(save_directory))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         map_location: str = "cpu", strict: bool = True, config: Any = None,
                         adapters: bool = True, dtype: torch.dtype | None = None, **kwargs: Any) -> PixelLLM:
        from pixelllm.checkpoint import load_checkpoint

        return load_checkpoint(cls, model_id, config=config, map_location=map_location, revision=revision,
                               cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                               load_adapters=adapters, dtype=dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PixelLLM:
        """Load a checkpoint directory or a hub id (safetensors only). A path that does not exist is an error,
        not a hub lookup. `map_location` (default cpu) is where the weights are read and stay; `dtype` (default
        float32) what they are held in: `dtype=torch.bfloat16, map_location="cuda"` reads them straight into a
        bf16 model on the GPU."""
        from pixelllm.checkpoint import check_source

        check_source(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
