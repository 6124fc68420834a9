"""The Gradio page of the web demo (``pip install 'ovd[web]'``): layout, wiring and an offline launch.

Inputs: an image (upload by drag and drop or click, a webcam snapshot where the browser offers one, the
clipboard, or an example), the vocabulary (comma-separated names, with presets), a confidence slider, a
model and optionally a second model to compare with. Outputs per model: the annotated image, a sortable
table and the COCO-results JSON; a status line gives the model times or the error. Runs are queued (one
at a time: the models share the CPU); a bad input only produces a message.

Offline: Gradio's analytics and version check are off, the theme uses system fonts only, no share
link is created, and the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ovd.app.handlers import OWN_CLASSES_PRESET, TABLE_HEADERS, DemoHandlers
from ovd.app.models import ModelZoo
from ovd.errors import OVDError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_CONFIDENCE = 0.3
# Gradio refuses larger uploads before they reach the handlers.
MAX_UPLOAD_SIZE = "100mb"
# Selector value for "no second model".
NO_COMPARE = "(none)"
# Element ids the browser tests and the benchmark address.
IDS = ("image", "vocabulary", "preset", "confidence", "model", "compare", "run", "status")
_SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
_SYSTEM_MONO = ("ui-monospace", "monospace")


def _gradio() -> Any:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import and at Blocks()
    try:
        import gradio
    except ImportError as e:
        raise OVDError("the web demo needs Gradio: pip install 'ovd[web]'") from e
    return gradio


def _uploaded_file(payload: Any, allowed: Sequence[Path]) -> tuple[str | None, str | None]:
    """``(path, original name)`` of the image component's raw value; only files Gradio stored
    (uploads, webcam snapshots) or the examples are read."""
    if payload is None:
        return None, None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        raise OVDError("the image did not arrive; upload it again", field="image")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise OVDError("the image is not an upload of this page", field="image")
    return str(resolved), payload.get("orig_name") or resolved.name


def build_page(handlers: DemoHandlers, *, examples: Sequence[str | os.PathLike[str]] = ()) -> Any:
    """The ``gradio.Blocks`` page (not launched)."""
    gr = _gradio()
    zoo = handlers.zoo
    first = zoo.names[0]
    upload_root = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    allowed = [upload_root, *{Path(e).resolve().parent for e in examples}]

    with gr.Blocks(title="ovd: open-vocabulary detection", analytics_enabled=False) as page:
        gr.Markdown("## ovd: detect any classes you name\nUpload an image, type class names, press **Detect**.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Image", type="filepath", sources=["upload", "webcam", "clipboard"], elem_id="image"
                )
                if examples:
                    gr.Examples(
                        [[str(e)] for e in examples],
                        inputs=[image],
                        label="Examples (OV-Shapes val)",
                        elem_id="examples",
                    )
                with gr.Row():
                    model = gr.Dropdown(zoo.names, value=first, label="Model", elem_id="model")
                    compare = gr.Dropdown(
                        [NO_COMPARE, *zoo.names], value=NO_COMPARE, label="Compare with", elem_id="compare"
                    )
                preset = gr.Dropdown(
                    handlers.presets(), value=OWN_CLASSES_PRESET, label="Vocabulary preset", elem_id="preset"
                )
                vocabulary = gr.Textbox(
                    value=handlers.preset_text(OWN_CLASSES_PRESET, first),
                    label="Vocabulary (comma-separated class names)",
                    lines=3,
                    elem_id="vocabulary",
                )
                confidence = gr.Slider(
                    0.0, 1.0, DEFAULT_CONFIDENCE, step=0.01, label="Confidence", elem_id="confidence"
                )
                run = gr.Button("Detect", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", elem_id="status")
                outputs = []
                with gr.Row():
                    for suffix, label in (("", "Detections"), ("_b", "Compared model")):
                        with gr.Column():
                            outputs += [
                                gr.Image(label=label, format="png", interactive=False, elem_id=f"annotated{suffix}"),
                                gr.Dataframe(
                                    headers=TABLE_HEADERS, label="Table", interactive=False, elem_id=f"table{suffix}"
                                ),
                                gr.File(label="COCO results JSON", elem_id=f"json{suffix}"),
                            ]

        requests = itertools.count(1)

        def on_run(payload: Any, text: str, threshold: float, name: str, other: str) -> list[Any]:
            request = f"Request {next(requests)}:"  # numbered, so that each answer is told apart
            empty: list[Any] = [None, None, None] * 2
            try:
                path, original_name = _uploaded_file(payload, allowed)
                second = None if other in (None, NO_COMPARE) else other
                _, loaded, results = handlers.run(path, text, float(threshold), name, second, image_name=original_name)
            except OVDError as e:
                return [f"{request} **Error:** {e}", *empty]
            except Exception as e:  # one user's unexpected failure must not end the server
                logger.exception("run failed")
                return [f"{request} **Error:** internal error ({type(e).__name__}: {e})", *empty]
            lines = [f"{request} " + "; ".join(r.summary() for r in results)]
            if loaded.reduced:
                h, w = loaded.original_size
                lines.append(
                    f"The {w}x{h} image was reduced to {loaded.rgb.shape[1]}x{loaded.rgb.shape[0]} "
                    "for the model; table and JSON are in the original pixels."
                )
            values: list[Any] = []
            for r in [*results, None][:2]:
                values += [None, None, None] if r is None else [str(r.image_path), r.rows, str(r.json_path)]
            return ["\n\n".join(lines), *values]

        def on_preset(choice: str, name: str) -> Any:
            try:
                return handlers.preset_text(choice, name)
            except OVDError as e:
                raise gr.Error(str(e)) from e

        run.click(
            on_run,
            [image, vocabulary, confidence, model, compare],
            [status, *outputs],
            preprocess=False,  # the image arrives as Gradio's file record: decoded by ovd.app.inputs
            concurrency_id="detect",
            concurrency_limit=1,
            show_progress="minimal",  # a spinner on the status line, no overlay on every output
        )
        preset.input(on_preset, [preset, model], [vocabulary], concurrency_id="detect")
    return page


def offline_theme() -> Any:
    """Gradio's default theme with system fonts (nothing fetched from the internet)."""
    gr = _gradio()
    return gr.themes.Default(font=list(_SYSTEM_FONTS), font_mono=list(_SYSTEM_MONO))


def launch(
    zoo: ModelZoo,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    examples: Sequence[str | os.PathLike[str]] = (),
    workdir: str | os.PathLike[str] | None = None,
    block: bool = True,
) -> Any:
    """Serve the page; returns the launched ``gradio.Blocks`` (``page.close()`` stops it).

    Args:
        zoo: the models (loaded before serving, so the first run is fast).
        host, port: where to bind (default: this machine only).
        examples: example image files shown under the upload.
        workdir: folder for the result JSON files (default: a temporary folder).
        block: serve until interrupted (False: return at once, serving from a thread).
    """
    zoo.load_all()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ovd_web_"))
    page = build_page(DemoHandlers(zoo, workdir), examples=examples)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        quiet=not block,
        allowed_paths=[str(workdir), *{str(Path(e).resolve().parent) for e in examples}],
        max_file_size=MAX_UPLOAD_SIZE,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        run_history=False,  # runs (with the users' images) are not stored in the browser
        theme=offline_theme(),
    )
    return page
