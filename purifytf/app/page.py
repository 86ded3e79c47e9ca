"""The web app's Gradio page and its launch: the layout of :mod:`purifytf.app.logic`, served offline.

Gradio is imported inside the functions: it is the optional ``app`` extra (``pip install "purifytf[app]"``).
"""

from __future__ import annotations

import argparse
import os

from . import logic

__all__ = ["OFFLINE_ENVIRONMENT", "add_arguments", "build_page", "launch", "run"]

OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # no telemetry and no version check against api.gradio.app
    "HF_HUB_DISABLE_TELEMETRY": "True",
    "HF_HUB_OFFLINE": "1",  # the embedded models are read from the package, nothing is downloaded
    "GRADIO_SHARE": "False",
}
"""Environment the app sets before importing Gradio: it makes no network request of its own."""

INTRO = f"""# purifytf: attack an image, watch each purifier clean it

Pick a bundled Fashion-MNIST test image or upload one, attack it, and compare purifytf's purifiers
on the embedded default models (a Fashion-MNIST classifier, DDPM and
IMPurify network shipped in the package; everything runs locally, offline).
Uploads: any PNG, JPEG, BMP, GIF, WebP or TIFF, grey or RGB, at most {logic.MAX_UPLOAD_BYTES // 2**20} MB and
{logic.MAX_UPLOAD_PIXELS:,} pixels (4096x4096); they are converted to the models' 28x28 grey (luma), centre-cropped
to a square and resized, as the results state. Fashion-MNIST items are light on a black background.
"""


def _theme():
    """Gradio's default theme on system fonts: no font is fetched from a CDN."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_page(models: logic.Models | None = None):
    """The page (a ``gr.Blocks``) on ``models`` (default: the embedded models, on CUDA when available)."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    import gradio as gr

    models = models if models is not None else logic.Models()
    names = logic.purifier_names()

    def attack_and_purify(source, index, upload, attack, eps, steps, eot, target, purifiers, seed,
                          progress=gr.Progress()):
        return logic.handle(models, source, index, upload, attack, eps, steps, eot, target, purifiers, seed,
                            progress=progress)

    with gr.Blocks(title="purifytf: attack and purify", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                source = gr.Radio(list(logic.SOURCES), value=logic.SOURCES[0], label="image", elem_id="source")
                index = gr.Slider(0, len(models.images) - 1, value=0, step=1, label="bundled test image #",
                                  elem_id="bundled-index")
                upload = gr.File(label="upload (used when 'upload' is chosen)", type="filepath", elem_id="upload")
            with gr.Column():
                attack = gr.Radio(list(logic.ATTACKS), value="PGD-EOT Linf", label="attack", elem_id="attack")
                eps = gr.Number(value=round(8 / 255, 5), label=f"eps, images in [0, 1] (Linf <= "
                                f"{logic.EPS_MAX['PGD-EOT Linf']}, L2 <= {logic.EPS_MAX['PGD-EOT L2']})",
                                elem_id="eps")
                steps = gr.Number(value=10, precision=0, label=f"PGD steps (1-{logic.STEPS_MAX})", elem_id="steps")
                eot = gr.Number(value=1, precision=0, label=f"EOT samples per step (1-{logic.EOT_MAX})",
                                elem_id="eot")
                target = gr.Dropdown([logic.BARE_CLASSIFIER, *names], value=logic.BARE_CLASSIFIER,
                                     label="attack against (adaptive: gradients through the purifier)",
                                     elem_id="target")
            with gr.Column():
                purifiers = gr.CheckboxGroup(names, value=list(logic.DEFAULT_PURIFIERS), label="purifiers to compare",
                                             elem_id="purifiers")
                seed = gr.Number(value=0, precision=0, label="seed (same inputs and seed: same page)", elem_id="seed")
                button = gr.Button("Attack and purify", variant="primary", elem_id="run")
        results = gr.HTML(label="results", elem_id="results")
        inputs = [source, index, upload, attack, eps, steps, eot, target, purifiers, seed]
        button.click(attack_and_purify, inputs=inputs, outputs=results)
    return page


def launch(host: str = "127.0.0.1", port: int = 7860, models: logic.Models | None = None, block: bool = True):
    """Serve the page on ``models`` (see :func:`build_page`) at ``host:port``, offline (no share link, analytics,
    telemetry or CDN fonts).

    ``block=False`` returns at once (the server runs in a thread; ``page.close()`` stops it). Returns the page.
    """
    page = build_page(models)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                max_file_size=logic.MAX_UPLOAD_BYTES, theme=_theme(), ssr_mode=False, mcp_server=False,
                footer_links=[])
    return page


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default 127.0.0.1, or $GRADIO_SERVER_NAME on a Space)")
    parser.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT", 7860),
                        help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('purifytf app needs Gradio: pip install "purifytf[app]"')
        return 1
    launch(args.host, args.port, logic.Models(args.device))
    return 0
