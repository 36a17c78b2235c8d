"""The model library's contracts (issue: PixelLLM model library): decoding, the location head, trainable sets,
persistence, presets, overfitting, batched captioning."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pixelllm.build import count_parameters, load_sam_weights, read_state_dict
from pixelllm.config import get_config
from pixelllm.modeling.heads import LocationHead
from pixelllm.modeling.language_model import Prefix
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.tokenizer import encode_text
from tests.helpers import make_prompt_sensitive, small_model

torch.set_num_threads(2)


def _prefix(model: PixelLLM, seed: int = 0, box=None) -> Prefix:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size, generator=gen) * 255
    with torch.no_grad():
        feats = model.encode_image(images)
        return model.encode_prefix(feats, boxes=None if box is None else torch.tensor([box]))


def _decode(model: PixelLLM, prefix: Prefix, n: int = 24, **kw) -> tuple[list[int], torch.Tensor | None]:
    tokens, boxes = [], []
    with torch.no_grad():
        for step, box in model.stream(prefix, max_new_tokens=n, **kw):
            tokens.append(int(step.tokens[0]))
            boxes.append(None if box is None else box[0])
    return tokens, (torch.stack(boxes) if boxes[0] is not None else None)


def test_incremental_decoding_matches_teacher_forcing():
    model = small_model(seed=1)
    prefix = _prefix(model, seed=3)
    tokens, boxes = _decode(model, prefix, n=24)
    assert len(tokens) >= 8, "random model ended too early for a meaningful cache test"
    labels = torch.tensor([tokens])
    with torch.no_grad():
        logits, points = model.teacher_forced(prefix, labels)
    assert logits[0].argmax(-1).tolist() == tokens
    torch.testing.assert_close(LocationHead.as_box(points[0]), boxes, atol=1e-5, rtol=0)


def test_location_head_does_not_change_tokens():
    model = small_model(seed=2)
    prefix = _prefix(model, seed=5, box=[0.1, 0.2, 0.6, 0.9])
    with_boxes, _ = _decode(model, prefix)
    without, none = _decode(model, prefix, with_boxes=False)
    assert none is None and with_boxes == without
    with torch.no_grad():  # scramble the head: tokens must not move
        for p in model.loc_head.parameters():
            p.normal_(0, 5.0)
    scrambled, boxes = _decode(model, prefix)
    assert scrambled == with_boxes and boxes is not None
    # and transformers' own greedy generate on the same prefix agrees
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        ref = model.language_model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=prefix.hidden),
                                            attention_mask=prefix.mask, max_new_tokens=24, do_sample=False)
    assert ref[0, 1:].tolist()[: len(with_boxes)] == with_boxes[: ref.shape[1] - 1]



def test_sampling_never_draws_byte_pieces_or_special_tokens():
    """Byte-fallback pieces alone decode to control characters or broken UTF-8: sampling an untrained random model
    (most of whose tiny vocabulary is the 256 byte pieces) drew them in nearly every caption."""
    from pixelllm.predictor import PixelLLMPredictor
    from pixelllm.tokenizer import BYTE_TOKENS, never_sampled
    from tests.helpers import random_image

    model = small_model(seed=3)
    tok = model.tokenizer
    blocked = set(never_sampled(tok, model.config.t5.vocab_size))
    assert set(tok.convert_tokens_to_ids(BYTE_TOKENS)) <= blocked
    assert {tok.pad_token_id, tok.unk_token_id} <= blocked and tok.eos_token_id not in blocked
    predictor = PixelLLMPredictor(model, device="cpu")
    state = predictor.set_image(random_image(1, 64, 64))
    drawn = [t for seed in range(4) for w in predictor.caption(state, do_sample=True, temperature=2.0, seed=seed,
                                                              max_new_tokens=24).words for t in w.token_ids]
    assert len(drawn) > 20 and not blocked & set(drawn)


def test_repetition_penalty_decodes_as_transformers_generate_alone_and_in_a_batch():
    """`repetition_penalty` (the embedded checkpoint's decoding default, docs/referring.md §18) picks the tokens
    transformers' generate() picks with the same penalty, also for a row of a batch whose other row ended early."""
    from transformers.modeling_outputs import BaseModelOutput

    model = small_model(seed=2)
    prefix = _prefix(model, seed=5, box=[0.1, 0.2, 0.6, 0.9])
    plain, _ = _decode(model, prefix, n=24)
    penalised, _ = _decode(model, prefix, n=24, repetition_penalty=1.5)
    assert len(set(plain)) < len(plain), "the random model repeats no token: nothing to penalise"
    assert penalised != plain
    with torch.no_grad():
        ref = model.language_model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=prefix.hidden),
                                            attention_mask=prefix.mask, max_new_tokens=24, do_sample=False,
                                            repetition_penalty=1.5)
    assert ref[0, 1:].tolist()[: len(penalised)] == penalised[: ref.shape[1] - 1]

    other = _prefix(model, seed=9)
    batch = Prefix(torch.cat([other.hidden, prefix.hidden]), torch.cat([other.mask, prefix.mask]))
    eos, model.config.eos_token_id = model.config.eos_token_id, -1
    free = [_decode(model, p, n=24, repetition_penalty=1.5)[0] for p in (other, prefix)]
    # an EOS id the first row emits part-way and the second never: the first row leaves the batch early
    model.config.eos_token_id = next(t for t in free[0][2:] if t not in free[1])
    rows: list[list[int]] = [[], []]
    with torch.no_grad():
        for step, _ in model.stream(batch, max_new_tokens=24, repetition_penalty=1.5):
            for i in range(2):
                if not bool(step.finished[i]):
                    rows[i].append(int(step.tokens[i]))
    singles = [_decode(model, p, n=24, repetition_penalty=1.5)[0] for p in (other, prefix)]
    model.config.eos_token_id = eos
    assert len(rows[0]) < len(rows[1]) == 24
    assert rows == singles
    with pytest.raises(ValueError, match="between 1 and 2"):  # a checkpoint that would favour repeats is refused
        get_config("tiny", repetition_penalty=0.5)

def _full_batch(model: PixelLLM, b: int = 2, t: int = 6) -> dict:
    gen = torch.Generator().manual_seed(0)
    s = model.config.image_size
    labels = torch.randint(5, 200, (b, t), generator=gen)
    labels[:, -1] = model.config.eos_token_id
    return {
        "images": torch.rand(b, 3, s, s, generator=gen) * 255,
        "prompt_boxes": torch.tensor([[0.1, 0.1, 0.7, 0.8]] * b),
        "labels": labels,
        "token_boxes": torch.rand(b, t, 4, generator=gen).sort(-1).values,
        "token_box_mask": torch.ones(b, t, dtype=torch.bool),
        "refer_boxes": torch.tensor([[0.2, 0.2, 0.5, 0.6]] * b),
        "refer_valid": torch.ones(b, dtype=torch.bool),
        "masks": (torch.rand(b, s, s, generator=gen) > 0.5).float(),
        "mask_valid": torch.ones(b, dtype=torch.bool),
        "gt_boxes": torch.tensor([[[0.2, 0.2, 0.5, 0.6]]] * b),
        "gt_valid": torch.ones(b, 1, dtype=torch.bool),
    }


@pytest.mark.parametrize("stage, keys", [
    ("ln", ["labels", "token_boxes", "token_box_mask"]),
    ("multitask", None),
    ("finetune", ["labels", "token_boxes", "token_box_mask"]),
])
def test_gradients_reach_exactly_the_stage_parameters(stage, keys):
    model = small_model(seed=3).train()
    model.add_adapter("stage")
    with torch.no_grad():  # LoRA B starts at zero, which would hide gradients flowing into A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    trainable = set(model.set_stage(stage))
    batch = _full_batch(model)
    if keys is not None:
        batch = {k: v for k, v in batch.items() if k in keys or k in ("images", "prompt_boxes")}
    model(batch)["loss"].backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == trainable, (sorted(trainable - reached)[:5], sorted(reached - trainable)[:5])
    groups = model.parameter_groups()
    frozen = set(groups["sam_encoder"] + groups["prompt_encoder"] + groups["mask_decoder"] + groups["language_model"])
    assert not (trainable & frozen)
    assert set(groups["lora"]) <= trainable
    if stage == "ln":
        assert set(groups["extractor"]) | set(groups["loc_head"]) <= trainable


def _outputs(model: PixelLLM) -> dict:
    prefix = _prefix(model, seed=7, box=[0.2, 0.1, 0.9, 0.7])
    tokens, boxes = _decode(model, prefix, n=12)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size, generator=gen) * 255
    with torch.no_grad():
        feats = model.encode_image(images)
        refer = model.refer(feats, torch.tensor([[10, 11, 12]]), torch.ones(1, 3, dtype=torch.long))
        proposals = model.propose(feats, score_threshold=0.0)
    # model.refer also returns "boxes": its keys get a prefix of their own, or the referral box would overwrite the
    # caption's per-word boxes and the round-trip checks would never compare the latter
    return {"tokens": tokens, "caption_boxes": boxes, **{f"refer_{k}": v for k, v in refer.items()},
            "proposals": proposals[0][0]}


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = small_model(seed=4)
    model.add_adapter("fix")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = _outputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapters", "adapters.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = PixelLLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.active_adapter == "fix" and loaded.adapters == ["fix"]
    after = _outputs(loaded)
    assert before["tokens"] == after["tokens"]
    assert set(before) == set(after) == {"tokens", "caption_boxes", "refer_boxes", "refer_score", "refer_mask_rows",
                                         "refer_mask_logits", "refer_mask_iou", "proposals"}
    assert before["caption_boxes"].shape == (len(before["tokens"]), 4)
    for key in sorted(set(before) - {"tokens"}):
        assert torch.equal(before[key], after[key]), key
    # the base model (adapter off) differs from the adapted one, so the adapter really was restored
    loaded.set_adapter(None)
    base = _outputs(loaded)
    assert not torch.equal(base["caption_boxes"], after["caption_boxes"])
    assert not torch.equal(base["refer_boxes"], after["refer_boxes"])


def test_saving_over_a_folder_drops_the_previous_saves_adapters(tmp_path):
    """Saving into a folder that held another model's adapters: loading the folder gave back the new weights with
    the old adapters, the old active one switched on."""
    with_adapter = small_model(seed=4)
    with_adapter.add_adapter("old")
    with_adapter.save_pretrained(tmp_path / "ckpt")
    small_model(seed=5).save_pretrained(tmp_path / "ckpt")
    loaded = PixelLLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.adapters == [] and loaded.active_adapter is None
    assert not (tmp_path / "ckpt" / "adapters").exists()


def test_pickle_weights_are_refused(tmp_path):
    model = small_model(seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        PixelLLM.from_pretrained(ckpt)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "sam.pth"
    bad.write_bytes(pickle.dumps({"image_encoder.x": Evil()}))
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(bad)


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PixelLLM.from_pretrained(str(tmp_path / "nope"))


def test_paper_preset_size_and_lora_targets():
    config = get_config("paper")
    params = count_parameters(config)
    assert 3.5e9 <= params <= 4.5e9, params
    assert config.semantic_encoder is not None
    with torch.device("meta"):
        model = PixelLLM(config)
        model.add_adapter("paper")
    lora = model.adapter_configs["paper"]
    assert lora.r == 32
    targeted = {n for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert targeted, "no LoRA layers injected"
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in targeted} == {"SelfAttention.q",
                                                                                   "SelfAttention.v"}
    # every self-attention q and v of both stacks: 24 encoder + 24 decoder layers
    assert len(targeted) == 2 * (config.t5.num_layers + config.t5.num_decoder_layers)


def test_batched_box_captions_equal_single_calls():
    model = make_prompt_sensitive(small_model(seed=6))
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(9)) * 255
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.1, 0.9, 0.6], [0.1, 0.5, 0.7, 1.0], [0.2, 0.2, 0.3, 0.9]])
    with torch.no_grad():
        feats = model.encode_image(images)
        batched = model.encode_prefix(feats, boxes=boxes)
        rows = [[] for _ in boxes]
        for step, _ in model.stream(batched, max_new_tokens=16):
            for i, tok in enumerate(step.tokens.tolist()):
                if not step.finished[i]:
                    rows[i].append(tok)
        singles = [_decode(model, model.encode_prefix(feats, boxes=b[None]), n=16)[0] for b in boxes]
    assert rows == singles
    assert len({tuple(r) for r in rows}) > 1, "boxes should condition the caption"


def test_rows_that_end_leave_the_decoding_batch():
    """A row leaves the batch at its EOS (its KV cache and prefix dropped): the decoder runs on fewer rows from then
    on, and every row's tokens and boxes are still those of decoding it alone."""
    model = make_prompt_sensitive(small_model(seed=6))
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(9)) * 255
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.1, 0.9, 0.6], [0.1, 0.5, 0.7, 1.0], [0.2, 0.2, 0.3, 0.9]])
    n = 12
    with torch.no_grad():
        feats = model.encode_image(images)
        prefix = model.encode_prefix(feats, boxes=boxes)
        model.config.eos_token_id = -1  # no EOS: every row runs n steps
        free = [[int(t) for t in step.tokens] for step, _ in model.stream(prefix, max_new_tokens=n)]
        # an EOS id that some rows emit and others never do (this random model repeats one token per row)
        emitted = [set(row) for row in zip(*free)]
        model.config.eos_token_id = next(t for t in sorted(set().union(*emitted))
                                         if 0 < sum(t in e for e in emitted) < len(boxes))
        widths = []
        handle = model.language_model.decoder.register_forward_pre_hook(
            lambda _m, _a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True)
        rows, row_boxes = [[] for _ in boxes], [[] for _ in boxes]
        for step, box in model.stream(prefix, max_new_tokens=n):
            for i in range(len(boxes)):
                if not step.finished[i]:
                    rows[i].append(int(step.tokens[i]))
                    row_boxes[i].append(box[i])
        handle.remove()
        singles = [_decode(model, model.encode_prefix(feats, boxes=b[None]), n=n) for b in boxes]
    for i, (tokens, single_boxes) in enumerate(singles):
        assert rows[i] == tokens
        assert torch.allclose(torch.stack(row_boxes[i]), single_boxes, atol=1e-5)
    lengths = [len(r) for r in rows]
    assert widths == [sum(length > step for length in lengths) for step in range(max(lengths))]
    assert widths[-1] < len(boxes)


def test_tracing_a_caption_gives_the_boxes_it_was_generated_with():
    """Controlled trace generation: `PixelLLM.trace` of the model's own greedy tokens reads the boxes and
    log-probabilities that decoding them gave (teacher forcing = incremental decoding on the same tokens)."""
    model = small_model(seed=1)
    prefix = _prefix(model, seed=3, box=[0.1, 0.1, 0.7, 0.8])
    eos, model.config.eos_token_id = model.config.eos_token_id, -1  # decode a fixed length
    with torch.no_grad():
        steps = [(int(step.tokens[0]), box[0], float(step.logprob[0]))
                 for step, box in model.stream(prefix, max_new_tokens=10)]
        model.config.eos_token_id = eos
        boxes, logp = model.trace(prefix, torch.tensor([t for t, _, _ in steps]))
    assert boxes.shape == (10, 4) and logp.shape == (11,)  # the caption's tokens and EOS
    assert torch.allclose(boxes, torch.stack([b for _, b, _ in steps]), atol=1e-5)
    assert torch.allclose(logp[:10], torch.tensor([lp for _, _, lp in steps]), atol=1e-4)


def test_predictor_traces_every_word_of_a_given_caption():
    """`PixelLLMPredictor.trace`: one word per whitespace-separated piece of the caption, in pixels, each the mean
    of its tokens' boxes from `PixelLLM.trace`; a blank caption is refused with a clear message."""
    from pixelllm.predictor import PixelLLMPredictor
    from tests.helpers import random_image

    model = small_model(seed=1)
    predictor = PixelLLMPredictor(model)
    state = predictor.set_image(random_image(3, 48, 80))
    text = "a large red circle on the left. the background is mint"
    traced = predictor.trace(state, text, box=[5, 5, 60, 40])
    assert [w.text for w in traced.words] == text.split() and traced.text == text
    pieces = [encode_text(model.tokenizer, w, eos=False) for w in text.split()]
    assert [w.token_ids for w in traced.words] == pieces
    with torch.no_grad():
        prefix = model.encode_prefix(state.features, boxes=torch.tensor([[5 / 80, 5 / 48, 60 / 80, 40 / 48]]))
        boxes, logp = model.trace(prefix, torch.tensor([t for p in pieces for t in p]))
    px = boxes.numpy() * [80, 48, 80, 48]
    start = 0
    for word, piece in zip(traced.words, pieces):
        np.testing.assert_allclose(word.box, px[start:start + len(piece)].mean(0), atol=0.01)
        start += len(piece)
    assert traced.score == pytest.approx(float(logp.mean().exp()), rel=1e-4)
    with pytest.raises(ValueError, match="give the caption"):
        predictor.trace(state, "   ")


def test_sam_checkpoint_and_t5_directory_load_into_base_style_build(tmp_path):
    """Component loading, with small random stand-ins of the real classes saved the way the originals are."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from transformers import T5Config, T5ForConditionalGeneration

    from pixelllm.build import build_pixelllm
    from tests.helpers import small_config, small_tokenizer

    tok = small_tokenizer()
    config = small_config(len(tok))
    vit, c, grid = config.image_encoder, config.prompt_embed_dim, config.grid_size
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=vit.img_size, patch_size=vit.patch_size, embed_dim=vit.embed_dim,
                                      depth=vit.depth, num_heads=vit.num_heads, out_chans=c, use_rel_pos=True,
                                      window_size=vit.window_size, global_attn_indexes=tuple(vit.global_attn_indexes),
                                      norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=c, image_embedding_size=(grid, grid),
                                     input_image_size=(vit.img_size, vit.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(transformer_dim=c, transformer=TwoWayTransformer(
            depth=config.mask_decoder_depth, embedding_dim=c, num_heads=config.mask_decoder_heads,
            mlp_dim=config.mask_decoder_mlp_dim), num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=c),
    )
    torch.save(sam.state_dict(), tmp_path / "sam_vit_test.pth")  # how the official checkpoints are stored
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=48, d_kv=12, d_ff=96, num_layers=2,
                                             num_decoder_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
                                             tie_word_embeddings=False, decoder_start_token_id=0))
    flan_dir = tmp_path / "flan-t5-test"
    t5.save_pretrained(flan_dir)
    # Flan-T5's files hold an lm_head of its own and say tie_word_embeddings: false (T5Config's argument only
    # drops the output scaling, so a model built from it ties the head: write the files as Flan's are)
    weights = {k: v.clone() for k, v in load_file(str(flan_dir / "model.safetensors")).items()}
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, str(flan_dir / "model.safetensors"), metadata={"format": "pt"})
    settings = json.loads((flan_dir / "config.json").read_text())
    (flan_dir / "config.json").write_text(json.dumps({**settings, "tie_word_embeddings": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t5 = T5ForConditionalGeneration.from_pretrained(flan_dir).eval()  # transformers' own reading of them
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    tok.save_pretrained(tmp_path / "flan-t5-test")

    model = build_pixelllm(config, sam_checkpoint=tmp_path / "sam_vit_test.pth", t5_dir=tmp_path / "flan-t5-test")
    assert model.config.t5.d_model == 48 and model.config.t5.num_decoder_layers == 3
    assert not model.language_model.config.scale_decoder_outputs  # Flan-T5 convention carried over
    for ours, theirs in [(model.image_encoder.sam_encoder, sam.image_encoder),
                         (model.prompt_extractor.prompt_encoder, sam.prompt_encoder),
                         (model.mask_head.mask_decoder, sam.mask_decoder), (model.language_model, t5)]:
        for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(theirs.state_dict().items())):
            assert torch.equal(a, b), name
    assert model.tokenizer is not None
    # the head stays its own: tied, loading wrote lm_head over the input embeddings (both keys, one storage)
    lm = model.language_model.eval()
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
    assert lm.encoder.embed_tokens.weight.data_ptr() == lm.decoder.embed_tokens.weight.data_ptr() \
        == lm.shared.weight.data_ptr()  # the input embeddings stay one tensor
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours, theirs = (m(input_ids=ids, decoder_input_ids=ids).logits for m in (lm, t5))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "pixelllm-base-style")
    again = PixelLLM.from_pretrained(tmp_path / "pixelllm-base-style").language_model
    assert torch.equal(again.lm_head.weight, t5.lm_head.weight) and torch.equal(again.shared.weight, t5.shared.weight)
    assert again.lm_head.weight.data_ptr() != again.shared.weight.data_ptr()

    # a SAM checkpoint of another size is refused with the offending tensors named
    other = small_model(seed=1, prompt_embed_dim=16)
    with pytest.raises(ValueError, match="does not match"):
        load_sam_weights(other, tmp_path / "sam_vit_test.pth")


def test_a_checkpoint_saved_while_flan_t5_s_head_was_tied_still_loads(tmp_path):
    """Before Flan-T5's lm_head was untied, a base/paper-style checkpoint stored no lm_head (it was the input
    embeddings): such a file, and a run's checkpoint to resume, load with the head set to those embeddings."""
    import dataclasses

    from tests.helpers import small_config

    tokenizer = small_model(seed=0).tokenizer
    config = small_config(len(tokenizer))
    model = PixelLLM(config.replace(t5=dataclasses.replace(config.t5, tie_word_embeddings=False)))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    state = load_file(str(weights))
    del state["language_model.lm_head.weight"]  # the layout a tied head was saved in
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="saved when Flan-T5's output head was tied"):
        loaded = PixelLLM.from_pretrained(tmp_path / "old")
    lm = loaded.language_model
    assert torch.equal(lm.lm_head.weight, lm.shared.weight)
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()  # equal now, its own weight to train
    del state["language_model.shared.weight"]  # anything else missing is still refused
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the model"):
        PixelLLM.from_pretrained(tmp_path / "old")


def test_config_json_is_plain_and_round_trips(tmp_path):
    model = small_model(seed=8)
    model.save_pretrained(tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    assert data["num_query_tokens"] == model.config.num_query_tokens
    assert PixelLLM.from_pretrained(tmp_path / "c").config == model.config


@pytest.mark.slow
def test_tiny_model_overfits_four_examples():
    """300 CPU steps on 4 (image, caption, per-token boxes) examples: greedy decoding then reproduces every
    caption exactly, and the per-token box error is below 0.02 (mean absolute error per coordinate)."""
    from pixelllm.tokenizer import encode_text

    torch.manual_seed(0)
    model = small_model(seed=0).train()
    model.set_stage("scratch")
    tok = model.tokenizer
    captions = ["a large red circle on the left.", "a small blue star.", "the green square on the right",
                "orange triangle in the centre"]
    s = model.config.image_size
    images = torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(1)) * 255
    seqs = [encode_text(tok, c, eos=True) for c in captions]
    length = max(map(len, seqs))
    labels = torch.full((4, length), -100)
    boxes = torch.zeros(4, length, 4)
    rng = np.random.default_rng(0)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
        for j in range(len(seq)):
            x0, y0 = rng.uniform(0, 0.6, 2)
            boxes[i, j] = torch.tensor([x0, y0, x0 + rng.uniform(0.1, 0.4), y0 + rng.uniform(0.1, 0.4)])
    batch = {"images": images, "labels": labels, "token_boxes": boxes, "token_box_mask": labels != -100}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.config.loc_loss_weight = 1.0  # the overfit target is the boxes too; lambda only balances real data
    for _ in range(300):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    errors = []
    with torch.no_grad():
        feats = model.encode_image(images)
        for i, seq in enumerate(seqs):
            prefix = model.encode_prefix(feats.index(i))
            tokens, pred = _decode(model, prefix, n=length + 4)
            assert tokens == seq, (captions[i], tok.decode(tokens))
            errors.append((pred - boxes[i, : len(seq)]).abs().mean())
    assert float(torch.stack(errors).mean()) < 0.02, errors


def test_expressions_grouped_by_image_train_as_the_flat_batch():
    """`image_index` (the `refer_image` task): two images encoded once for four expressions give the same referring
    losses — caption, EOS box, attention supervision, SAM mask — as the four rows with their images repeated."""
    model = small_model(seed=2, roi_grid=4, roi_position="sine", refer_prompt="refer:").train()
    model.config.attn_supervision_weight = 1.0
    s = model.config.image_size
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, s, s, generator=gen) * 255
    tok = model.tokenizer
    seqs = [encode_text(tok, w, eos=True) for w in ["the green square", "orange triangle", "a large red circle",
                                                      "the small blue star"]]
    labels = torch.full((4, max(map(len, seqs))), -100)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
    image_index = torch.tensor([0, 0, 1, 1])
    targets = {
        "labels": labels,
        "refer_boxes": torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.0, 0.5, 0.5, 1.0],
                                     [0.6, 0.6, 0.8, 0.9]]),
        "refer_valid": torch.ones(4, dtype=torch.bool),
        "masks": (torch.rand(4, s, s, generator=gen) > 0.7).float(),
        "mask_valid": torch.tensor([True, False, True, True]),
    }
    gt = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6]], [[0.0, 0.5, 0.5, 1.0], [0.6, 0.6, 0.8, 0.9]]])
    grouped = {**targets, "images": images, "image_index": image_index, "gt_boxes": gt,
               "gt_valid": torch.ones(2, 2, dtype=torch.bool)}
    flat = {**targets, "images": images[image_index], "gt_boxes": gt[image_index],
            "gt_valid": torch.ones(4, 2, dtype=torch.bool)}
    a, b = model(grouped), model(flat)
    for name in ("caption", "eos_l1", "eos_giou", "attn_cells", "mask_focal", "mask_dice", "mask_iou"):
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, a[name], b[name])
    # the encoder pass is shared: gradients reach the image encoder from every row, once per image
    a["loss"].backward()
    assert model.image_encoder.sam_encoder.patch_embed.proj.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="need 4 rows, one per target row"):  # a prompt per image is refused
        model({**grouped, "prompt_boxes": targets["refer_boxes"][:2]})


def test_region_rows_grouped_by_image_train_as_the_flat_batch():
    """`image_index` with per-row box prompts (the `region_image` task): two images encoded once for four boxes give
    the same caption, trace and attention losses as the four rows with their images repeated, and the image encoder
    gets the gradient of every row."""
    model = small_model(seed=3, roi_grid=4, roi_position="sine").train()
    model.config.attn_supervision_weight = 1.0
    s = model.config.image_size
    images = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(6)) * 255
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.0, 0.5, 0.5, 1.0], [0.6, 0.6, 0.8, 0.9]])
    seqs = [encode_text(model.tokenizer, w, eos=True) for w in ["large green square", "small orange triangle",
                                                                "large red circle", "small blue star"]]
    labels = torch.full((4, max(map(len, seqs))), -100)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
    image_index = torch.tensor([0, 0, 1, 1])
    targets = {"labels": labels, "prompt_boxes": boxes, "token_boxes": boxes[:, None].expand(4, labels.shape[1], 4),
               "token_box_mask": labels != -100}
    grouped = {**targets, "images": images, "image_index": image_index}
    flat = {**targets, "images": images[image_index]}
    a, b = model(grouped), model(flat)
    for name in ("caption", "location", "attn_cells"):
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, a[name], b[name])
    # swapping the rows' images changes the losses: each row reads its own image's features
    swapped = model({**grouped, "image_index": torch.tensor([1, 1, 0, 0])})
    assert not torch.allclose(swapped["caption"], a["caption"], atol=1e-4)
    a["loss"].backward()
    grad_grouped = model.image_encoder.sam_encoder.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    b["loss"].backward()
    assert torch.allclose(grad_grouped, model.image_encoder.sam_encoder.patch_embed.proj.weight.grad, atol=1e-5)


def test_saved_folder_has_a_model_card_describing_it(tmp_path):
    """README.md beside the weights (pixelllm.model_card): what the network is, its size, the dtype the weights
    were saved in, its adapters; how it was trained when the caller says (training.train does), else that it is
    not recorded."""
    model = small_model(seed=4)
    model.add_adapter("fix")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    card = (tmp_path / "half" / "README.md").read_text()
    count = sum(p.numel() for p in model.parameters())
    assert "# PixelLLM `tiny`" in card and f"{count / 1e6:.2f} M parameters" in card
    assert "weights, float16" in card and "(fix)" in card and "Not recorded" in card
    assert "More Information Needed" not in card  # not huggingface_hub's generic mixin text
    plain = small_model(seed=4)
    plain.save_pretrained(tmp_path / "full", model_card_kwargs={"training": "1 step of `narrative`"})
    card = (tmp_path / "full" / "README.md").read_text()
    assert "weights, float32" in card and "1 step of `narrative`" in card and "Not recorded" not in card
    assert "adapters/" not in card
    PixelLLM.from_pretrained(tmp_path / "half")  # the card does not disturb loading


def test_loading_reads_the_weights_into_the_dtype_asked_for_and_draws_no_random_initialisation(small_checkpoint):
    """from_pretrained builds the model without computing an initialisation the file overwrites (minutes and a
    float32 copy for the paper preset) and holds the weights in the dtype asked for; tied tensors stay one
    tensor, and the constants no file holds (pixel mean/std) are set."""
    from pixelllm import PixelLLM

    file = load_file(small_checkpoint / "model.safetensors")
    before = torch.get_rng_state()
    full = PixelLLM.from_pretrained(small_checkpoint)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn: the weights were read, not initialised
    half = PixelLLM.from_pretrained(small_checkpoint, dtype=torch.bfloat16)
    for name, value in full.state_dict().items():
        if name in file:
            assert torch.equal(value, file[name].float()), name
    for name, value in half.state_dict().items():  # SAM's Fourier matrix (shared by two modules) stays float32
        if value.is_floating_point() and not name.endswith("pe_layer.positional_encoding_gaussian_matrix"):
            assert value.dtype == torch.bfloat16 and torch.equal(value, full.state_dict()[name].bfloat16()), name
    for model in (full, half):
        lm = model.language_model
        assert lm.shared.weight is lm.encoder.embed_tokens.weight is lm.decoder.embed_tokens.weight
        assert model.pixel_mean.flatten().tolist() == pytest.approx(list(model.config.pixel_mean), rel=1e-2)
        assert model.pixel_std.flatten().tolist() == pytest.approx(list(model.config.pixel_std), rel=1e-2)
