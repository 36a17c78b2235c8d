"""The grounding aids of the tiny recipe (docs/referring.md): RoI tokens that carry their cell's position in image
coordinates (`roi_position="sine"`) and the cross-attention supervision loss (`attn_supervision_weight`)."""

from __future__ import annotations

import pytest
import torch

from pixelllm.tokenizer import encode_text
from tests.helpers import small_model

torch.set_num_threads(2)


def test_cell_centres_are_image_coordinates_in_token_order():
    ex = small_model(roi_grid=2, roi_position="sine").prompt_extractor
    centres = ex.cell_centres(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.4, 0.6, 0.8]]))
    expected = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]],
                             [[0.3, 0.5], [0.5, 0.5], [0.3, 0.7], [0.5, 0.7]]])
    assert torch.allclose(centres, expected)


def test_sine_roi_tokens_follow_the_image_location_not_the_cell_index():
    """With constant image features the RoI tokens differ only by their position code: the last cell of the
    region (0, 0, .5, .5) and the first cell of (.25, .25, .75, .75) sit at the same image point (.375, .375),
    so they must be the same token, and differ from the tokens at other points. The learned per-index code
    of the paper-style variant cannot do this (same index, same code, whatever the region)."""
    model = small_model(roi_grid=2, roi_position="sine")
    ex = model.prompt_extractor
    c = model.config.prompt_embed_dim
    features = torch.zeros(2, c, model.config.grid_size, model.config.grid_size)
    prompt = ex.embed_prompt(boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]))
    regions = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]])
    with torch.no_grad():
        roi = ex(features, prompt, regions)[:, -4:]
    assert torch.allclose(roi[0, 3], roi[1, 0], atol=1e-5)
    gap = (roi[0, :3] - roi[1, 0]).norm(dim=-1)
    assert bool((gap > 0.1 * roi[1, 0].norm()).all()), gap

    learned = small_model(roi_grid=2, roi_position="learned").prompt_extractor
    with torch.no_grad():
        tokens = learned(features, prompt, regions)[:, -4:]
    assert torch.allclose(tokens[0], tokens[1], atol=1e-5)  # per-index code: blind to where the region is


def test_unknown_roi_position_is_refused():
    with pytest.raises(ValueError, match="roi_position"):
        small_model(roi_grid=2, roi_position="fourier")


def test_the_unprompted_prefix_reads_the_whole_image_through_its_own_grid():
    """`global_roi_grid`: the global-box prefix gets g_global^2 RoI tokens, box prompts keep roi_grid^2. With
    constant image features a token is its position code, so the global grid's first cell (centre (.125, .125)
    of a 4 x 4 grid) must be the first RoI token of the box (0, 0, .5, .5) read through 2 x 2 cells."""
    model = small_model(roi_grid=2, roi_position="sine", global_roi_grid=4)
    q, s = model.config.num_query_tokens, model.config.image_size
    image = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        features = model.encode_image(image)
        unprompted = model.encode_prefix(features)
        boxed = model.encode_prefix(features, boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5]]))
        pointed = model.encode_prefix(features, points=torch.tensor([[[0.3, 0.3]]]))
    assert unprompted.hidden.shape[1] == q + 16 and boxed.hidden.shape[1] == q + 4 == pointed.hidden.shape[1]

    ex = model.prompt_extractor
    zeros = torch.zeros(1, model.config.prompt_embed_dim, model.config.grid_size, model.config.grid_size)
    with torch.no_grad():
        whole = ex(zeros, ex.embed_prompt(), grid=model.roi_grid_for(None, None))[:, q:]
        corner = ex(zeros, ex.embed_prompt(), torch.tensor([[0.0, 0.0, 0.5, 0.5]]), grid=2)[:, q:]
    assert whole.shape[1] == 16 and corner.shape[1] == 4
    assert torch.allclose(whole[0, 0], corner[0, 0], atol=1e-5)
    assert not torch.allclose(whole[0, 1], corner[0, 0], atol=1e-2)

    model.config.global_roi_grid = 2  # the same as roi_grid: nothing changes
    with torch.no_grad():
        assert model.encode_prefix(features).hidden.shape[1] == q + 4


def test_a_global_grid_set_by_a_training_stage_survives_save_and_load(tmp_path):
    """training.train sets it per stage on model.config (shapes_tiny.yaml `fine_global_cells`); the checkpoint
    must carry it, or the loaded model would read the image through the other grid."""
    model = small_model(roi_grid=2, roi_position="sine")
    model.config.global_roi_grid = 4
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.global_roi_grid == 4
    image = torch.rand(1, 3, model.config.image_size, model.config.image_size) * 255
    with torch.no_grad():
        a = model.encode_prefix(model.encode_image(image)).hidden
        b = loaded.encode_prefix(loaded.encode_image(image)).hidden
    assert a.shape[1] == model.config.num_query_tokens + 16
    assert torch.allclose(a, b, atol=1e-5)


def test_a_global_grid_needs_the_sine_position_code():
    model = small_model(roi_grid=2, roi_position="learned", global_roi_grid=4)
    features = model.encode_image(torch.zeros(1, 3, model.config.image_size, model.config.image_size))
    with pytest.raises(ValueError, match="global_roi_grid"):
        model.encode_prefix(features)
    model.encode_prefix(features, boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5]]))  # box prompts keep roi_grid
    sine = small_model(roi_grid=2, roi_position="sine", global_roi_grid=-4)
    with pytest.raises(ValueError, match="global_roi_grid must be >= 0"):
        sine.encode_prefix(features)


def _refer_batch(model, boxes: torch.Tensor) -> dict:
    tok = model.tokenizer
    words = ["the green square", "the small blue star", "orange triangle", "a large red circle"]
    seqs = [encode_text(tok, w, eos=True) for w in words]
    labels = torch.full((4, max(map(len, seqs))), -100)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
    s = model.config.image_size
    images = torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(3)) * 255
    return {"images": images, "labels": labels, "refer_boxes": boxes, "refer_valid": torch.ones(4, dtype=torch.bool)}


def _cell_mass(model, batch: dict, boxes: torch.Tensor) -> torch.Tensor:
    """Eager attention (transformers' own) of the last decoder layer at EOS, summed over the RoI cells whose
    centre is inside the target box."""
    lm = model.language_model
    with torch.no_grad():
        prefix = model.encode_prefix(model.encode_image(batch["images"]))
        out = lm.decoder(input_ids=lm._shift_right(batch["labels"]), encoder_hidden_states=prefix.hidden,
                         encoder_attention_mask=prefix.mask, output_attentions=True)
    probs = out.cross_attentions[-1].mean(1)  # B x T x S
    eos = (batch["labels"] == model.config.eos_token_id).int().argmax(1)
    q = model.config.num_query_tokens
    cells = probs[torch.arange(4), eos, q:]
    centres = model.prompt_extractor.cell_centres(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4),
                                                  model.roi_grid_for(None, None))
    inside = (centres[..., 0] >= boxes[:, None, 0]) & (centres[..., 0] <= boxes[:, None, 2]) & \
        (centres[..., 1] >= boxes[:, None, 1]) & (centres[..., 1] <= boxes[:, None, 3])
    assert bool(inside.any(-1).all())
    return (cells * inside).sum(-1)


def test_attention_supervision_is_off_by_default_and_moves_eos_attention_to_the_box():
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.7, 0.0, 1.0, 0.3], [0.0, 0.7, 0.3, 1.0], [0.6, 0.6, 1.0, 1.0]])
    model = small_model(seed=1, roi_grid=4, roi_position="sine").train()
    model.language_model.set_attn_implementation("eager")  # for output_attentions in _cell_mass
    batch = _refer_batch(model, boxes)
    assert "attn_cells" not in model(batch)  # the paper's loss unless the recipe asks for it

    model.config.attn_supervision_weight = 1.0
    # The loss recomputes the attention from the hooked inputs; it must be the attention transformers computes.
    first = model(batch)["attn_cells"]
    before = _cell_mass(model, batch, boxes)
    assert torch.allclose(first, -torch.log(before + 1e-6).mean(), atol=1e-4), (first, before)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        loss = model(batch)["attn_cells"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _cell_mass(model, batch, boxes)
    assert float(before.max()) < 0.4 and float(after.min()) > 0.8, (before, after)


def test_attention_supervision_reads_the_global_grid_of_the_unprompted_prefix():
    """The supervised cells are the ones the prefix holds: 4 x 4 global cells while box prompts use 2 x 2."""
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.7, 0.0, 1.0, 0.3], [0.0, 0.7, 0.3, 1.0], [0.6, 0.6, 1.0, 1.0]])
    model = small_model(seed=1, roi_grid=2, roi_position="sine", global_roi_grid=4,
                        attn_supervision_weight=1.0).train()
    model.language_model.set_attn_implementation("eager")
    batch = _refer_batch(model, boxes)
    loss = model(batch)["attn_cells"]
    assert torch.allclose(loss, -torch.log(_cell_mass(model, batch, boxes) + 1e-6).mean(), atol=1e-4)


def test_attention_supervision_without_roi_cells_is_refused():
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.3]]).expand(4, 4)
    model = small_model(roi_grid=0).train()
    model.config.attn_supervision_weight = 1.0  # as a training stage sets it
    with pytest.raises(ValueError, match="roi_grid"):
        model(_refer_batch(model, boxes))


def _train_caption_and_refer(refer_prompt: str, steps: int = 150):
    """One image, two targets under the same global-box prompt: a narrative sentence (trace task) and a
    referring expression (refer task). Returns the trained model and its first-token distribution unprompted."""
    torch.manual_seed(0)
    model = small_model(seed=2, roi_grid=4, roi_position="sine", refer_prompt=refer_prompt).train()
    tok = model.tokenizer
    s = model.config.image_size
    image = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(5)) * 255
    narrative = encode_text(tok, "in this picture we can see a large red circle.", eos=True)
    expression = encode_text(tok, "the green square", eos=True)
    caption = {"images": image, "labels": torch.tensor([narrative]),
               "token_boxes": torch.full((1, len(narrative), 4), 0.5) + torch.tensor([-0.2, -0.2, 0.2, 0.2]),
               "token_box_mask": torch.ones(1, len(narrative), dtype=torch.bool)}
    refer = {"images": image, "labels": torch.tensor([expression]),
             "refer_boxes": torch.tensor([[0.1, 0.1, 0.4, 0.4]]), "refer_valid": torch.ones(1, dtype=torch.bool)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        loss = model(caption if step % 2 == 0 else refer)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        prefix = model.encode_prefix(model.encode_image(image))
        step, _ = next(model.stream(prefix, max_new_tokens=1))
        logits, _ = model.teacher_forced(prefix, torch.tensor([[narrative[0]]]))
    probs = logits[0, 0].softmax(-1)
    return model, image, narrative, expression, float(probs[narrative[0]]), float(probs[expression[0]])


def test_refer_prompt_keeps_the_unprompted_caption_a_narrative():
    """Without a task prompt both targets share one input, so the unprompted first token is split between them;
    with `refer_prompt` the unprompted caption is the narrative, and `refer` (which adds the prompt) still
    gives the expression's box."""
    _, _, _, _, p_narrative, p_expression = _train_caption_and_refer("")
    assert min(p_narrative, p_expression) > 0.1, (p_narrative, p_expression)

    model, image, narrative, expression, p_narrative, p_expression = _train_caption_and_refer("refer:")
    assert p_narrative > 0.8 and p_expression < 0.05, (p_narrative, p_expression)  # label smoothing: <= 0.9
    with torch.no_grad():
        features = model.encode_image(image)
        tokens = [int(step.tokens[0]) for step, _ in model.stream(model.encode_prefix(features),
                                                                  max_new_tokens=len(narrative) + 3)]
        ids = torch.tensor([expression[:-1]])
        box = model.refer(features, ids, torch.ones_like(ids))["boxes"][0]
    assert tokens == narrative
    assert float((box - torch.tensor([0.1, 0.1, 0.4, 0.4])).abs().max()) < 0.05, box
