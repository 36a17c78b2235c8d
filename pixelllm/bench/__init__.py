"""Performance benchmark (DESIGN §7): `python -m pixelllm.bench [--checkpoint DIR] [--device cpu|cuda]
[--json OUT] [--quick] [--no-fail]`.

Every figure is a ratio of two things measured side by side in one run: the two arms alternate (A B, B A, ...),
warm-up runs are excluded, the figure is the ratio of the medians, and torch's intra-op threads are pinned.

1. location-head overhead   our streaming decode (`PixelLLM.stream`, with boxes) / transformers `generate()`
                            (greedy, KV cache, `encoder_outputs=` the same prefix), same LM weights, same number
                            of new tokens (EOS is not a stop on either side), target <= 1.10
2. prompt reuse             first call on a new image (image encoding included) / a second prompt on an image
                            already encoded (embedding-cache hit), same caption length, target >= 5
3. batched dense captioning 16 single `caption_boxes` calls / the same 16 boxes in one batched call, target >= 4
4. flat per-token cost      time of decoding step 40 / step 5 in one decode (KV cache), target <= 1.3
5. app overhead             a gradio_client `/caption` call against the app running in this process (with an
                            annotation store, as deployed) / the predictor's streamed caption alone; the greedy
                            global caption of an example image, 20 words on both sides (EOS banned so that a
                            model with shorter captions still writes 20 words), target <= 1.5
6. training scale-out       samples/s of `torchrun --nproc_per_node=2 -m training.train` / one process, CPU,
                            small generated config (read from the runs' metrics.jsonl), target >= 1.3

Absolute figures (machine described): time to first streamed word on a cached image, words per second, peak RSS
of `app.py` serving the checkpoint (a subprocess, psutil + VmHWM), and the `paper` preset's parameter count and
bf16 weight memory (built on the meta device). With `--device cuda` the model runs on the GPU in bfloat16; the
training scale-out is a CPU measurement in every case (gloo, two processes).

Exit status 1 when a target is missed (unless --no-fail); rows that cannot run here are "n/a" with the reason.
`--quick` shrinks sizes and repetitions for a CI smoke run: its timings are not meaningful.
"""
