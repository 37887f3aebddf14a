"""The one settings object.

Values resolve in this order, later wins: built-in defaults < ``settings.json`` <
environment (``KOBOLD_API_<FIELD>``) < command-line flags.  Everything else reads a
:class:`Settings` instance that the CLI or the test fixtures build; nothing reads the
environment on its own.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .engine.layouts import DEFAULT_PREFILL_CHUNK, KV_LAYOUTS
from .engine.sampling import DEFAULT_SAMPLER_ORDER

ENV_PREFIX = "KOBOLD_API_"
DEFAULT_SETTINGS_FILE = "settings.json"
PROVIDERS = ("auto", "cpu", "cuda")
#: The SQLite file conversations are kept in, in the data dir (unless ``database_url`` says otherwise).
DATABASE_FILE = "conversations.db"
#: Precisions a model can be prepared at (``engine/importer/precision.py`` says what each means).
QUANTS = ("auto", "fit", "int4", "mixed", "int8", "fp16", "fp32")


#: What a ``cors_origins`` entry must look like: scheme://host[:port], ``*`` allowed in the host.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9*_.-]+)(:[0-9]{1,5})?", re.IGNORECASE)
#: An ``allowed_hosts`` entry: a name or IP (a leading dot takes the subdomains too).
_HOST_NAME = re.compile(r"\.?([a-z0-9_-]+\.)*[a-z0-9_-]+\.?|\[?[0-9a-f:.]+\]?", re.IGNORECASE)


class SettingsError(ValueError):
    """A settings file, variable or flag holds a value we cannot use."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Values used when a request omits a field (KoboldCpp's defaults, except ``trim_stop``)."""

    max_length: int = 200
    max_context_length: int = 2048
    temperature: float = 0.7
    top_k: int = 100
    top_a: float = 0.0
    top_p: float = 0.92
    tfs: float = 1.0
    typical: float = 1.0
    min_p: float = 0.0
    rep_pen: float = 1.0
    rep_pen_range: int = 320
    rep_pen_slope: float = 1.0
    sampler_order: tuple[int, ...] = DEFAULT_SAMPLER_ORDER
    trim_stop: bool = True


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; see README.md for what each field does."""

    #: The address to listen on: loopback unless the user opts in to the network (``--listen`` or
    #: ``--host 0.0.0.0``); the server warns at start-up when it listens beyond loopback without a key.
    host: str = "127.0.0.1"
    port: int = 5000
    #: text-generation-webui's legacy websocket streaming (``/api/v1/stream``, ``/api/v1/chat-stream``); 0 = off.
    ws_port: int = 5005
    threads: int = 8
    model: str = "default"
    provider: str = "auto"
    #: Precision of the prepared model: auto (on the CPU mixed under 0.5B parameters, above fit for a
    #: quantized GGUF and int4 otherwise; fp16 on CUDA), fit (4/8-bit within 1.10x the GGUF's bytes),
    #: int4, mixed (4-bit ffn gate/up inside, 8-bit elsewhere), int8, fp16, fp32.
    quant: str = "auto"
    data_dir: str = "data"
    cache_dir: str = ""
    #: Where uploaded characters go (and cards users add by hand); empty: ``<data_dir>/characters``.
    #: The shipped characters are read from the package and never written.
    characters_dir: str = ""
    database_url: str = ""
    context_size: int = 8192
    cpu_threads: int = 0
    queue_size: int = 16
    max_batch_size: int = 8
    #: Generations one request may ask for (a list of prompts times ``n``); more is a 4xx.
    max_request_choices: int = 16
    #: Tokens one request may generate over all its generations: each of its results is clamped
    #: to its share (as every result is clamped to the context), so no request holds the batch for
    #: long. A request with one result is held only by the context.
    max_request_tokens: int = 16384
    #: Finished sequences' keys kept for prompts that start the same way (a chat's next turn,
    #: a swipe), in MB, but never less than one whole context's keys (0: none kept).
    prefix_cache_mb: int = 256
    #: Memory for the batch's key/value slots (rows x ``context_size`` positions); 0: no limit
    #: (on the CPU a slot's pages are only used as its row fills them). Too small: fewer rows,
    #: then a shorter context. Sized for a GPU, where the slots are allocated whole.
    kv_cache_mb: int = 0
    #: Prompt tokens per session run: a long prompt runs in parts of this many, between two steps
    #: of the running streams when there are any, so it does not stall them for its whole prefill,
    #: and its attention scratch stays bounded (0: the whole prompt at once).
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK
    #: How a batch keeps its keys: ``slots`` (fixed slots, in device memory on CUDA), ``concat``
    #: (each step's presents become the next pasts) or ``auto``: slots on the CPU, concat on CUDA
    #: until a GPU run has measured its slots (README, "On a GPU").
    kv_layout: str = "auto"
    #: Decode steps replay CUDA graphs captured per batch size (with ``kv_layout`` ``slots`` on
    #: CUDA only). Off until a GPU run has checked and measured it (README, "On a GPU").
    cuda_graphs: bool = False
    #: Reuse a cached chat whose oldest turns were dropped by moving the rest into place
    #: (KoboldCpp's ContextShift); off: only a shared prefix is reused (see README, "Long chats").
    context_shift: bool = True
    #: Browser origins trusted with stored data (characters, conversations), comma-separated, on
    #: top of the server's own page and localhost origins; ``*`` wildcards a part, ``*`` alone
    #: trusts every origin. Generation and probe routes answer any origin whatever this says.
    cors_origins: str = ""
    #: Host names the server answers to besides localhost names, IP addresses, this machine's
    #: name and ``host``, comma-separated (a reverse proxy's public name; ``.example.com`` takes its
    #: subdomains too; ``*`` turns the check off). Any other Host header gets a 403.
    allowed_hosts: str = ""
    api_key: str = ""
    #: Needed for destructive and admin routes (deleting or replacing characters) when set; the
    #: plain ``api_key`` is refused there. Empty: those routes take what every route takes.
    admin_key: str = ""
    open_probes: bool = True
    max_upload_mb: int = 8
    log_level: str = "INFO"
    #: This process's name in the ``X-Kobold-Replica`` header, ``/health`` and ``/metrics``, and as the
    #: owner of the chat turns it runs; empty: ``<host name>:<port>``.
    replica_name: str = ""
    #: How long a chat turn's lease on its conversation lasts without renewal. The process that runs a
    #: turn renews it every third of this; a replica that dies stops renewing, and once the lease has
    #: run out the turn is marked failed and the conversation takes turns again (on any replica).
    turn_lease_seconds: float = 30.0
    #: The AI Horde worker: with a key and a name the server also generates for the Horde (see README).
    horde_key: str = ""
    horde_name: str = ""
    horde_url: str = "https://aihorde.net"
    #: The longest generation and context this worker takes from the Horde.
    horde_max_length: int = 512
    horde_max_context: int = 2048
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @staticmethod
    def _list(value: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in value.split(",") if item.strip())

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return self._list(self.cors_origins)

    @property
    def allowed_host_list(self) -> tuple[str, ...]:
        return self._list(self.allowed_hosts)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def cache_path(self) -> Path:
        """Where prepared models live; under the data dir unless set."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else self.data_path / "models"

    @property
    def characters_path(self) -> Path:
        return Path(self.characters_dir).expanduser() if self.characters_dir else self.data_path / "characters"

    @property
    def resolved_replica_name(self) -> str:
        return self.replica_name or f"{socket.gethostname()}:{self.port}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_path / DATABASE_FILE).resolve()}"


def _coerce(name: str, value: Any, target_type: Any) -> Any:
    """Turn JSON/env/CLI values into the field's type, with a clear error."""
    type_name = target_type if isinstance(target_type, str) else getattr(target_type, "__name__", str(target_type))
    try:
        if "bool" in type_name:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "tuple" in type_name:
            items = json.loads(value) if isinstance(value, str) else value
            return tuple(int(item) for item in items)
        if "int" in type_name:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if "float" in type_name:
            return float(value)
        return str(value)
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SettingsError(f"setting {name!r} must be of type {type_name}, got {value!r}") from exc


def _apply(base: Any, values: Mapping[str, Any], origin: str) -> Any:
    """Return a copy of dataclass ``base`` with ``values`` applied; unknown keys are errors."""
    known = {f.name: f for f in fields(base)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("_"):
            continue  # comments in settings.json
        if key not in known:
            raise SettingsError(f"unknown setting {key!r} in {origin}")
        if key == "generation":
            if not isinstance(value, Mapping):
                raise SettingsError(f"'generation' in {origin} must be an object")
            changes[key] = _apply(base.generation, value, origin)
        else:
            changes[key] = _coerce(key, value, known[key].type)
    return replace(base, **changes)


def _validate(settings: Settings) -> Settings:
    if settings.provider not in PROVIDERS:
        raise SettingsError(f"provider must be one of {', '.join(PROVIDERS)}, got {settings.provider!r}")
    if settings.quant not in QUANTS:
        raise SettingsError(f"quant must be one of {', '.join(QUANTS)}, got {settings.quant!r}")
    if not 0 < settings.port < 65536:
        raise SettingsError(f"port must be 1-65535, got {settings.port}")
    for name in ("threads", "queue_size", "max_batch_size", "context_size", "max_request_choices"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"{name} must be at least 1")
    if settings.kv_cache_mb < 0:
        raise SettingsError("kv_cache_mb must be 0 (no limit) or more")
    if settings.kv_layout not in KV_LAYOUTS:
        raise SettingsError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {settings.kv_layout!r}")
    if settings.prefill_chunk_tokens < 0 or 0 < settings.prefill_chunk_tokens < 16:
        raise SettingsError("prefill_chunk_tokens must be 0 (whole prompts) or at least 16")
    if settings.max_request_tokens < 16 * settings.max_request_choices:
        raise SettingsError("max_request_tokens must be at least 16 tokens for each of max_request_choices")
    if settings.turn_lease_seconds < 0.5:
        raise SettingsError("turn_lease_seconds must be at least 0.5")
    if bool(settings.horde_key) != bool(settings.horde_name):
        raise SettingsError("the AI Horde worker needs both horde_key and horde_name")
    if settings.horde_key and not settings.horde_url.startswith(("http://", "https://")):
        raise SettingsError(f"horde_url must be an http(s) URL, got {settings.horde_url!r}")
    for name in ("horde_max_length", "horde_max_context"):
        if getattr(settings, name) < 16:
            raise SettingsError(f"{name} must be at least 16")
    if settings.admin_key and settings.admin_key == settings.api_key:
        raise SettingsError("admin_key must differ from api_key (with the same value every client is an admin)")
    for origin in settings.cors_origin_list:
        if origin not in ("*", "null") and not _ORIGIN.fullmatch(origin):
            raise SettingsError(f"cors_origins: {origin!r} is not an origin such as https://example.com or "
                                "http://localhost:8000 (scheme and host, a port if any, no path)")
    for host in settings.allowed_host_list:
        if host != "*" and not _HOST_NAME.fullmatch(host):
            raise SettingsError(f"allowed_hosts: {host!r} is not a host name such as chat.example.com or "
                                ".example.com (no scheme, port or path)")
    return settings


def load_settings(
    settings_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults < file < environment < ``overrides`` (CLI flags).

    Without ``settings_file`` the ``settings.json`` of the working directory is used if
    it exists (or the file named by ``KOBOLD_API_SETTINGS``).
    """
    environ = os.environ if environ is None else environ
    settings = Settings()
    path = settings_file or environ.get(f"{ENV_PREFIX}SETTINGS")
    if path is None and Path(DEFAULT_SETTINGS_FILE).is_file():
        path = DEFAULT_SETTINGS_FILE
    if path is not None:
        try:
            file_values = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SettingsError(f"settings file {path} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise SettingsError(f"settings file {path} is not valid JSON: {exc}") from exc
        if not isinstance(file_values, dict):
            raise SettingsError(f"settings file {path} must hold a JSON object")
        settings = _apply(settings, file_values, str(path))
    env_values = {
        f.name: environ[ENV_PREFIX + f.name.upper()]
        for f in fields(Settings)
        if f.name != "generation" and ENV_PREFIX + f.name.upper() in environ
    }
    settings = _apply(settings, env_values, "environment")
    settings = _apply(settings, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    return _validate(settings)
