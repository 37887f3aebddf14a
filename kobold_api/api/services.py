"""The per-app bundle of services that routes reach through ``current_app``.

Built once by the app factory; there is no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import current_app, request

from ..engine.engine import Engine
from ..settings import Settings
from .access import AccessPolicy
from .errors import ApiError
from .request_model import json_body

if TYPE_CHECKING:
    from ..horde.worker import HordeWorker
    from .chat.serving import ChatService
    from .kobold.serving import KoboldService
    from .ollama.serving import OllamaService
    from .openai.serving import OpenAIService
    from .ops.serving import OpsService
    from .textgen.serving import TextgenService

EXTENSION_KEY = "kobold_api"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    access: AccessPolicy
    kobold: "KoboldService"
    openai: "OpenAIService"
    chat: "ChatService"
    textgen: "TextgenService"
    ollama: "OllamaService"
    ops: "OpsService"
    #: The AI Horde worker, when ``horde_key`` is set.
    horde: "HordeWorker | None" = None


def services() -> Services:
    return current_app.extensions[EXTENSION_KEY]


def request_json(lenient: bool = False) -> dict[str, Any]:
    """The body as a JSON object, whatever Content-Type the client sent (or none).

    ``lenient`` turns an unparsable body into ``{}`` for routes where the body is optional.
    """
    try:
        return json_body(request.get_data(cache=True), request.content_type)
    except ApiError:
        if lenient:
            return {}
        raise
