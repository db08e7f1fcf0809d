"""The playground's page: a Gradio Blocks app over one `medm.infer.Predictor`.

    app = build_app(Predictor.from_pretrained("runs/demo/finetune"), "runs/demo/finetune", work_dir="/tmp/x")
    launch(app, host="127.0.0.1", port=7860)

Nothing here holds state between calls: the predictor is read-only and shared, and each browser tab keeps its own
`Session` (conversation, upload, slice) in a `gr.State`, so several people can use one server at once. Endpoints
(also for `gradio_client`): `/upload` (file, window), `/select_slice` (index), `/select_window` (window), `/send`
(question, temperature, top_p, max_new_tokens; streams), `/regenerate` (the settings; streams), `/clear`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
from PIL import Image

from medm.infer import GenerationSettings
from medm.playground.chat import Session
from medm.playground.media import UploadError, open_upload
from medm.playground.model_info import Example, model_markdown, takes_volumes
from medm.playground.viewer import DEFAULT_WINDOW, WINDOW_CHOICES

__all__ = ["DISCLAIMER", "build_app", "launch"]

logger = logging.getLogger(__name__)

DISCLAIMER = ("Research demo of a small medical vision-language model. **Not for clinical use**: answers are generated "
              "text and may be wrong.")
HELP = ("Upload a 2D image (PNG, JPEG, DICOM) or a volume (NIfTI, `.npy`, a `.zip` of one DICOM series), then ask. "
        "{volumes} A new picture starts the model's context afresh; earlier turns stay on screen.")
SLICE_HELP = "The model is given the picture shown: for a volume, the axial slice on screen at the window chosen."
VOLUME_HELP = "This model has a 3D encoder: it is given a volume whole; the slice and window are for looking."


# Pictures smaller than this (pixels, longest side) are shown enlarged by a whole factor, pixels kept sharp.
DISPLAY_SIDE = 320


def _for_display(picture: Image.Image) -> Image.Image:
    """A copy to look at: small pictures (a 64 px phantom) enlarged, pixels kept sharp; the model gets the original."""
    factor = DISPLAY_SIDE // max(picture.size)
    if factor < 2:
        return picture
    return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)


def _settings(temperature: float, top_p: float, max_new_tokens: float) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max(1, int(max_new_tokens)), temperature=float(temperature),
                              top_p=float(top_p))


def build_app(predictor, model_dir: str, *, work_dir: str | Path, examples: Sequence[Example] = (),
              examples_label: str = "Example cases", title: str = "medm playground") -> gr.Blocks:
    """Build the page (not launched).

    Args:
        predictor: a `medm.infer.Predictor` (any model kind); only `stream` is used, from several threads at once.
        model_dir: the checkpoint directory, for the model panel.
        work_dir: the app's own directory for pictures shown in the chat, unpacked DICOM zips and the volume cache.
        examples: example cases offered one click away.
    """
    work = Path(work_dir)
    (work / "pictures").mkdir(parents=True, exist_ok=True)
    model_panel = model_markdown(model_dir)
    whole_volumes = takes_volumes(model_dir)
    defaults = GenerationSettings()

    def new_session() -> Session:
        return Session(whole_volumes=whole_volumes)

    def save_picture(session: Session) -> str:
        path = work / "pictures" / f"{uuid.uuid4().hex}.png"
        session.upload.picture().save(path)
        return str(path)

    def view(session: Session):
        """Preview, slider and caption for the session's upload."""
        up = session.upload
        if up is None:
            return None, gr.update(visible=False, value=0, maximum=1), ""
        if up.is_volume:
            v = up.viewer
            slider = gr.update(visible=True, minimum=0, maximum=max(v.num_slices - 1, 1), step=1, value=v.index,
                               interactive=v.num_slices > 1)
        else:
            slider = gr.update(visible=False)
        return _for_display(up.picture()), slider, up.caption()

    def on_upload(file: str | None, window: str | None, session: Session | None):
        session = session or new_session()
        if not file:
            session.set_upload(None)
            return (*view(session), session)
        name = Path(file).name  # gradio keeps the uploaded file's own name inside its cache folder
        try:
            upload = open_upload(file, name, window or DEFAULT_WINDOW, work / "uploads")
        except UploadError as e:
            logger.info("rejected upload: %s", e)
            gr.Warning(str(e))
            session.set_upload(None)
            return None, gr.update(visible=False), f"**Error:** {e}", session
        session.set_upload(upload)
        return (*view(session), session)

    def on_slice(index: float, session: Session | None):
        session = session or new_session()
        if session.upload is not None and session.upload.is_volume:
            session.upload.viewer.set_index(int(index))
            session.view_changed()
        preview, _, caption = view(session)
        return preview, caption, session

    def on_window(window: str, session: Session | None):
        session = session or new_session()
        if session.upload is not None:
            try:
                session.upload.set_window(window or DEFAULT_WINDOW)
            except (UploadError, ValueError) as e:
                gr.Warning(str(e))
            session.view_changed()
        preview, _, caption = view(session)
        return preview, caption, session

    def stream(session: Session, temperature, top_p, max_new_tokens):
        settings = _settings(temperature, top_p, max_new_tokens)
        try:
            for _ in session.stream_answer(predictor, settings):
                yield session.chat, session
        except Exception as e:  # shown in the chat and as a toast; the server keeps running
            logger.exception("generation failed")
            gr.Warning(f"generation failed: {e}")
            yield session.chat, session

    def on_send(question: str | None, temperature, top_p, max_new_tokens, session: Session | None):
        session = session or new_session()
        question = (question or "").strip()
        if not question:
            gr.Warning("Type a question first.")
            yield session.chat, session, question
            return
        picture = save_picture(session) if session.upload is not None and not session.attached else None
        session.ask(question, picture)
        yield session.chat, session, ""
        for chat, session in stream(session, temperature, top_p, max_new_tokens):
            yield chat, session, ""

    def on_regenerate(temperature, top_p, max_new_tokens, session: Session | None):
        session = session or new_session()
        if not session.can_regenerate():
            gr.Warning("There is no answer to regenerate yet.")
            yield session.chat, session
            return
        session.forget_answer()
        yield session.chat, session
        yield from stream(session, temperature, top_p, max_new_tokens)

    def on_clear(session: Session | None):
        session = session or new_session()
        session.clear()
        return session.chat, session

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        session = gr.State(None, time_to_live=4 * 3600)
        gr.Markdown(f"# {title}\n{DISCLAIMER}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=560, elem_id="medm-chat", buttons=["copy"],
                                     feedback_options=None,
                                     placeholder=HELP.format(volumes=VOLUME_HELP if whole_volumes else SLICE_HELP))
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image, then press Enter", show_label=False,
                                          scale=5, elem_id="medm-question", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="medm-send")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", size="sm", elem_id="medm-regenerate")
                    clear = gr.Button("Clear", size="sm", elem_id="medm-clear")
                with gr.Accordion("Generation settings", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                                            info="0: greedy (always the most likely token)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p",
                                      info="nucleus sampling mass (when temperature > 0)")
                    max_new_tokens = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1,
                                               label="Max new tokens")
            with gr.Column(scale=2):
                upload = gr.File(label="Image or volume", file_count="single", type="filepath", height=120,
                                 elem_id="medm-upload")
                preview = gr.Image(label="Viewer" if whole_volumes else "What the model sees", type="pil",
                                   format="png", interactive=False, height=300, elem_id="medm-preview",
                                   buttons=["download"])
                caption = gr.Markdown(elem_id="medm-caption")
                slider = gr.Slider(0, 1, value=0, step=1, label="Axial slice", visible=False, elem_id="medm-slice")
                window = gr.Dropdown(WINDOW_CHOICES, value=DEFAULT_WINDOW, label="Window",
                                     info="CT presets in HU; applies to DICOM, 16-bit images and volumes")
                with gr.Accordion("Model", open=True):
                    gr.Markdown(model_panel, elem_id="medm-model")
        if examples:
            gr.Examples([[e.image, e.question] for e in examples], inputs=[upload, question], label=examples_label,
                        elem_id="medm-examples")

        settings = [temperature, top_p, max_new_tokens]
        upload.change(on_upload, [upload, window, session], [preview, slider, caption, session], api_name="upload")
        slider.input(on_slice, [slider, session], [preview, caption, session], api_name="select_slice",
                     trigger_mode="always_last", show_progress="hidden")
        window.input(on_window, [window, session], [preview, caption, session], api_name="select_window")
        send.click(on_send, [question, *settings, session], [chatbot, session, question], api_name="send")
        question.submit(on_send, [question, *settings, session], [chatbot, session, question],
                        api_visibility="undocumented")
        regenerate.click(on_regenerate, [*settings, session], [chatbot, session], api_name="regenerate")
        chatbot.retry(on_regenerate, [*settings, session], [chatbot, session], api_visibility="undocumented")
        clear.click(on_clear, [session], [chatbot, session], api_name="clear")
        chatbot.clear(on_clear, [session], [chatbot, session], api_visibility="undocumented")
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, *, max_file_size: str | int = "200mb",
           concurrency: int = 4, allowed_paths: Sequence[str] = (), block: bool = True, quiet: bool = False) -> None:
    """Serve the page on `host:port` (loopback unless told otherwise).

    Args:
        max_file_size: largest upload, bytes or e.g. "200mb" (gradio refuses bigger files before they reach us).
        concurrency: answers generated at once (each a thread over the shared model); more requests queue.
        allowed_paths: files the page may serve besides its cache (the example images); a folder here would
            serve everything in it to anyone reaching the port.
        block: wait until the server stops (False: return once it is up, for tests and notebooks).
    """
    app.queue(default_concurrency_limit=concurrency)
    app.launch(server_name=host, server_port=port, share=False, max_file_size=max_file_size,
               allowed_paths=list(allowed_paths), ssr_mode=False, mcp_server=False, enable_monitoring=False,
               prevent_thread_lock=True, quiet=quiet, footer_links=["api"], show_error=True)
    if not block:
        return
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        # Blocks.close also stops the queue and the open pages' heartbeats, so the server ends at once.
        app.close(verbose=False)
