"""PixelLLM Studio, the Gradio app (this is the only package that imports gradio).

`build_demo(predictor, store, ...)` returns the Blocks; `callbacks` holds the logic, `render` the drawing helpers,
`layout` the wiring, `static/` the viewer's HTML/CSS/JS.
"""

from pixelllm.ui.layout import MAX_FILE_SIZE, STATE_SESSION_CAPACITY, build_demo

__all__ = ["build_demo", "MAX_FILE_SIZE", "STATE_SESSION_CAPACITY"]
