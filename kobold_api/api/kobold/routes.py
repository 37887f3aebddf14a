"""KoboldAI United routes (mounted on /api/v1 and /api/latest) and KoboldCpp's /api/extra."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..services import request_json, services
from ..sse import disconnect_probe, sse_response
from .schemas import parse_generation_input
from .serving import KOBOLD_API_VERSION

kobold = Blueprint("kobold", __name__)
extra = Blueprint("kobold_extra", __name__)
#: KoboldCpp's routes outside /api: llama.cpp's /props and the service discovery document.
probes = Blueprint("kobold_probes", __name__)


def _route(blueprint: Blueprint, rule: str, methods: list[str]):
    """Every Kobold route accepts a trailing slash (the Horde worker sends one)."""
    return blueprint.route(rule, methods=methods, strict_slashes=False)


@_route(kobold, "/model", ["GET"])
def model() -> Response:
    return jsonify(result=services().kobold.model_id)


@_route(kobold, "/info/version", ["GET"])
def info_version() -> Response:
    return jsonify(result=KOBOLD_API_VERSION)


@_route(kobold, "/info/version/latest", ["GET"])
def info_version_latest() -> Response:
    return jsonify(result=KOBOLD_API_VERSION)


@_route(kobold, "/info/version/list", ["GET"])
def info_version_list() -> Response:
    return jsonify(results=[KOBOLD_API_VERSION])


@_route(kobold, "/config/max_length", ["GET"])
def config_max_length() -> Response:
    return jsonify(value=services().kobold.default_max_length())


@_route(kobold, "/config/max_context_length", ["GET"])
def config_max_context_length() -> Response:
    return jsonify(value=services().kobold.default_max_context_length())


@_route(kobold, "/config/soft_prompt", ["GET"])
def config_soft_prompt() -> Response:
    return jsonify(value="")


@_route(kobold, "/config/soft_prompt", ["PUT"])
def put_soft_prompt() -> Response:
    return jsonify(services().kobold.set_soft_prompt(request_json()))


@_route(kobold, "/config/soft_prompts_list", ["GET"])
def config_soft_prompts_list() -> Response:
    return jsonify(values=[])


@_route(kobold, "/generate", ["POST"])
def generate() -> Response:
    svc = services()
    parsed = parse_generation_input(request_json(), svc.settings.generation)
    return jsonify(svc.kobold.generate(parsed, disconnect_probe()))


@_route(extra, "/version", ["GET"])
def extra_version() -> Response:
    return jsonify(services().kobold.version_info())


@_route(extra, "/true_max_context_length", ["GET"])
def extra_true_max_context_length() -> Response:
    return jsonify(value=services().kobold.context_size)


@_route(extra, "/preloadstory", ["GET"])
def extra_preloadstory() -> Response:
    """KoboldCpp's story to open Kobold Lite with: none is preloaded here."""
    return jsonify({})


@_route(extra, "/perf", ["GET"])
def extra_perf() -> Response:
    return jsonify(services().kobold.perf())


@_route(extra, "/generate/stream", ["POST"])
def extra_generate_stream() -> Response:
    svc = services()
    parsed = parse_generation_input(request_json(), svc.settings.generation)
    return sse_response(svc.kobold.stream(parsed, disconnect_probe()))


@_route(extra, "/generate/check", ["GET"])
def extra_generate_check() -> Response:
    return jsonify(services().kobold.check_request(request.args.to_dict()))


@_route(extra, "/generate/check", ["POST"])
def extra_generate_check_post() -> Response:
    return jsonify(services().kobold.check_request(request_json(lenient=True)))


@_route(extra, "/abort", ["POST"])
def extra_abort() -> Response:
    # SillyTavern sends no body and no content type: anything unparsable means "no genkey".
    return jsonify(services().kobold.abort_request(request_json(lenient=True)))


@_route(extra, "/last_logprobs", ["POST"])
def extra_last_logprobs() -> Response:
    return jsonify(services().kobold.last_logprobs(request_json(lenient=True)))


@_route(extra, "/json_to_grammar", ["POST"])
def extra_json_to_grammar() -> Response:
    return jsonify(services().kobold.json_to_grammar(request_json()))


@_route(extra, "/tokencount", ["POST"])
def extra_tokencount() -> Response:
    return jsonify(services().kobold.tokencount(request_json()))


@_route(extra, "/tokenize", ["POST"])
def extra_tokenize() -> Response:
    return jsonify(services().kobold.tokencount(request_json()))


@_route(extra, "/detokenize", ["POST"])
def extra_detokenize() -> Response:
    return jsonify(services().kobold.detokenize(request_json()))


@_route(probes, "/props", ["GET"])
def props() -> Response:
    svc = services()
    return jsonify(svc.kobold.props(getattr(svc.openai.template, "source", None)))


@_route(probes, "/.well-known/serviceinfo", ["GET"])
def serviceinfo() -> Response:
    return jsonify(services().kobold.service_info(request.host_url))
