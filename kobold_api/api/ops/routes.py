"""Operations routes: ``/health`` and ``/metrics``, and the ``X-Kobold-Replica`` header on every answer."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from ..services import services

ops = Blueprint("ops", __name__)
REPLICA_HEADER = "X-Kobold-Replica"


@ops.route("/health", methods=["GET"])
def health() -> Response:
    body, status = services().ops.health()
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


@ops.route("/metrics", methods=["GET"])
def metrics() -> Response:
    return Response(services().ops.metrics(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Cache-Control": "no-store"})


@ops.after_app_request
def name_the_replica(response: Response) -> Response:
    """Which replica answered: what a client behind the load balancer (and our tests) can see."""
    response.headers[REPLICA_HEADER] = services().settings.resolved_replica_name
    return response
