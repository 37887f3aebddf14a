"""The AI Horde text worker: with ``horde_key`` and ``horde_name`` set, the server also takes
text jobs from the AI Horde (https://aihorde.net) while its own users are idle."""

from .worker import HordeWorker, Pacing

__all__ = ["HordeWorker", "Pacing"]
