"""The Flask app factory, and ``init_app`` to mount the API into an existing Flask app."""

from __future__ import annotations

from typing import Callable

from flask import Flask

from .api import errors, security
from .api.access import AccessPolicy
from .api.chat.routes import chat
from .api.chat.serving import ChatService
from .api.services import EXTENSION_KEY, Services
from .api.docs import docs
from .api.kobold.routes import extra, kobold, probes
from .api.kobold.serving import KoboldService
from .api.ollama.routes import ollama
from .api.ollama.serving import OllamaService
from .api.openai.routes import openai
from .api.openai.serving import OpenAIService
from .api.ops.routes import ops
from .api.ops.serving import OpsService
from .api.textgen.routes import textgen
from .api.textgen.serving import TextgenService
from .chat.templates import template_for_model
from .engine.engine import Engine
from .horde import HordeWorker
from .settings import Settings, load_settings
from .web import page


def load_engine(settings: Settings, progress: Callable[[str], None] | None = None) -> Engine:
    """Prepare and open the model named by the settings."""
    return Engine.load(
        settings.model, settings.provider, settings.cache_path, cpu_threads=settings.cpu_threads,
        queue_size=settings.queue_size, prefix_cache_mb=settings.prefix_cache_mb,
        max_batch_size=settings.max_batch_size, progress=progress, quant=settings.quant,
        context_shift=settings.context_shift, context_size=settings.context_size,
        kv_cache_mb=settings.kv_cache_mb, prefill_chunk=settings.prefill_chunk_tokens,
        kv_layout=settings.kv_layout, cuda_graphs=settings.cuda_graphs,
    )


def init_app(app: Flask, settings: Settings, engine: Engine | None = None) -> Services:
    """Register every route, error handler and service on ``app``.

    Use this to mount kobold_api into a Flask app of your own; ``create_app`` is this
    plus a fresh Flask object.
    """
    engine = engine or load_engine(settings)
    # The loaded model's own chat template (ChatML when its folder has none), built once.
    template = template_for_model(engine.tokenizer.chat_template, engine.tokenizer.eos_token, engine.model_name)
    access = AccessPolicy.from_settings(settings)
    chat_service = ChatService.from_settings(engine, settings, template, security.untrusted_origin(access))
    bundle = Services(
        settings=settings,
        engine=engine,
        access=access,
        kobold=KoboldService(engine, settings),
        openai=OpenAIService(engine, settings, template),
        chat=chat_service,
        textgen=TextgenService(engine, settings, chat_service),
        ollama=OllamaService(engine, settings, template),
        ops=OpsService(engine, settings, chat_service.conversations.ping),
    )
    if settings.horde_key:  # also an AI Horde worker, while local users are idle (README: the AI Horde)
        bundle.horde = bundle.kobold.horde = HordeWorker.from_settings(settings, engine)
        bundle.horde.start()
    app.extensions[EXTENSION_KEY] = bundle
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_upload_mb, 1) * 2**20 + 2**16
    errors.init_app(app)
    security.init_app(app, settings, access)
    app.register_blueprint(kobold, url_prefix="/api/v1")
    app.register_blueprint(kobold, url_prefix="/api/latest", name="kobold_latest")
    app.register_blueprint(extra, url_prefix="/api/extra")
    app.register_blueprint(probes)
    app.register_blueprint(chat, url_prefix="/api/v1")
    app.register_blueprint(textgen, url_prefix="/api/v1")
    app.register_blueprint(openai, url_prefix="/v1")
    app.register_blueprint(ollama, url_prefix="/api")
    app.register_blueprint(docs, url_prefix="/api")
    app.register_blueprint(page)
    app.register_blueprint(ops)
    return bundle


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Flask:
    """A ready app: settings from the usual sources unless given, the model loaded unless given."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    init_app(app, settings, engine)
    return app
