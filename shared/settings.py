"""Typed configuration, declared once.

Every setting is read from the environment (or a ``.env`` file) by pydantic-settings. Env names follow the
product's serving docs: a top-level name such as ``REDIS_URL`` or ``SERVING_ADAPTER_TYPE``, and per-adapter
sections with their own prefix (``SIMPLE_``, ``TORCHSCRIPT_``, ``TRITON_``, ``TORCHSERVE_``, ``BATCH_``, ``ROUTING_``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

AdapterName = Literal["simple", "torchscript", "torchserve", "triton"]
DeviceName = Literal["cpu", "cuda"]


def state_dir() -> Path:
    """Where the fleet keeps local state by default (``$XDG_STATE_HOME/finsight-fleet``)."""
    import os  # NOTE: the one place that reads the environment directly: XDG is not a fleet setting

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "finsight-fleet"


def soft_time_limit(hard_s: float) -> float:
    """The soft time limit under a hard one: a tenth earlier, between 1 and 30 s (half of limits under 2 s)."""
    return max(hard_s - min(30.0, max(1.0, hard_s / 10)), hard_s / 2)


def _section(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, env_file=".env", extra="ignore", use_attribute_docstrings=True)


class SimpleSettings(BaseSettings):
    """In-process eager torch adapter and the per-process model cache it shares with TorchScript."""

    model_config = _section("SIMPLE_")

    max_models_in_memory: int = Field(5, ge=1)
    """LRU bound: at most this many models stay loaded in one worker process."""
    model_timeout_seconds: float = Field(3600, gt=0)
    """Idle TTL: a model not used for this long is unloaded."""
    cache_size_mb: float = Field(1024, gt=0)
    """Memory budget of the cache, counted from the real parameter and buffer bytes of loaded models."""
    enable_cache: bool = True
    """When off, every job loads its model and unloads it afterwards (useful for debugging only)."""


class TorchScriptSettings(BaseSettings):
    """TorchScript adapter: compile a stored model once, reuse the artefact while the source is unchanged."""

    model_config = _section("TORCHSCRIPT_")

    device: str = "cpu"
    """Torch device the compiled module is loaded on (``cpu``, ``cuda``, ``cuda:1``)."""
    optimize_for_inference: bool = True
    """Freeze the module and run ``torch.jit.optimize_for_inference`` on it."""
    enable_fusion: bool = True
    """Let the TorchScript fuser fuse elementwise kernels."""
    compile_mode: Literal["trace", "script"] = "trace"
    """``trace`` runs a real example input built from the model's config; ``script`` compiles the source."""
    max_models_in_memory: int = Field(5, ge=1)
    """LRU bound of the TorchScript adapter's per-process cache."""
    model_timeout_seconds: float = Field(3600, gt=0)
    """Idle TTL of the TorchScript adapter's per-process cache."""


class TritonSettings(BaseSettings):
    """Triton Inference Server adapter (through ``tritonclient``)."""

    model_config = _section("TRITON_")

    server_url: str = "127.0.0.1:8000"
    """HTTP endpoint (host:port) of the Triton server."""
    server_grpc_url: str = "127.0.0.1:8001"
    """gRPC endpoint (host:port) of the Triton server."""
    use_grpc: bool = False
    """Talk to Triton over gRPC instead of HTTP."""
    ssl: bool = False
    """Use TLS to reach the server."""
    insecure: bool = False
    """With SSL: skip certificate verification (test servers only)."""
    model_repository: Path = Field(default_factory=lambda: state_dir() / "triton-repository")
    """Repository the adapter writes models into; the server must see the same directory."""
    backend: Literal["python", "pytorch_libtorch"] = "python"
    """Triton backend of generated models: ``python`` (runs TorchScript in a Python model) or ``pytorch_libtorch``."""
    default_model_version: int = Field(1, ge=1)
    """Triton version used when a store version is not numeric (store versions map to Triton versions)."""
    max_batch_size: int = Field(32, ge=1)
    """``max_batch_size`` of generated configs (and rows per infer call)."""
    max_queue_delay_us: int = Field(2000, ge=0)
    """Triton dynamic batching: how long the server waits to fill a batch."""
    timeout_seconds: float = Field(10.0, gt=0)
    """Network timeout for every call to the server; a dead server fails jobs within it."""
    load_timeout_seconds: float = Field(120.0, gt=0)
    """How long loading a model on the server may take (a Python-backend model starts a process, imports torch)."""
    max_models_loaded: int = Field(8, ge=1)
    """LRU bound: at most this many models one worker process keeps loaded on the server (eviction unloads)."""
    model_timeout_seconds: float = Field(3600, gt=0)
    """Idle TTL: a model this process has not used for this long is unloaded from the server."""


class TorchServeSettings(BaseSettings):
    """TorchServe adapter (inference and management APIs over HTTP, a ``.mar`` per model in a shared store)."""

    model_config = _section("TORCHSERVE_")

    inference_url: str = "http://127.0.0.1:8080"
    """TorchServe inference API (the benchmark's TorchServe system uses these settings)."""
    management_url: str = "http://127.0.0.1:8081"
    """TorchServe management API."""
    model_store: Path = Field(default_factory=lambda: state_dir() / "torchserve-model-store")
    """Where the adapter writes each model's ``.mar``; TorchServe's ``--model-store`` must be the same directory."""
    key_file: Path | None = None
    """TorchServe's token-authorization ``key_file.json`` (0.12 writes it into its working directory); its
    management and inference keys are sent as ``Authorization: Bearer``. Unset: no token (authorization off)."""
    batch_size: int = Field(16, ge=1)
    """Server-side batch size when registering a model (also the most rows one infer request carries)."""
    max_batch_delay_ms: int = Field(10, ge=0, validation_alias=AliasChoices("TORCHSERVE_MAX_BATCH_DELAY_MS",
                                                                           "TORCHSERVE_MAX_BATCH_DELAY"))
    """Server-side batching delay when registering a model (``TORCHSERVE_MAX_BATCH_DELAY`` works too)."""
    initial_workers: int = Field(1, ge=1)
    """Workers TorchServe starts per model."""
    max_workers: int = Field(1, ge=1)
    """Most workers TorchServe may scale a model to (``PUT /models/<name>?max_worker=``)."""
    timeout_seconds: float = Field(10.0, gt=0)
    """Network timeout for every call to TorchServe; a dead server fails jobs within it."""
    load_timeout_seconds: float = Field(120.0, gt=0)
    """How long registering a model may take (TorchServe starts a Python worker that imports torch)."""
    response_timeout_seconds: int = Field(60, ge=1)
    """TorchServe's own per-request timeout of a registered model (its ``response_timeout``)."""
    max_models_loaded: int = Field(8, ge=1)
    """LRU bound: at most this many models one worker process keeps registered (eviction unregisters)."""
    model_timeout_seconds: float = Field(3600, gt=0)
    """Idle TTL: a model this process has not used for this long is unregistered."""


class BatchSettings(BaseSettings):
    """Batching of predict jobs in the batching engine: one fetch takes up to a batch, one forward per model."""

    model_config = _section("BATCH_")

    max_batch_size: int = Field(32, ge=1)
    """At most this many jobs make one fetch of the batching engine, and rows one forward."""
    preferred_batch_size: int | None = Field(8, ge=1)
    """Rows per forward when a batch holds more: the size the model runs fastest at (8 on the CPUs measured: see
    (a) in the benchmark, 8 % less per row than 32); unset, forwards take up to the max batch size."""

    @property
    def forward_rows(self) -> int:
        """Rows per forward: the preferred size, never above the max; the max when no preference is set."""
        return min(self.preferred_batch_size or self.max_batch_size, self.max_batch_size)


class RoutingSettings(BaseSettings):
    """Cache-aware routing of jobs to the consumer processes that hold their model (see ``shared.routing``)."""

    model_config = _section("ROUTING_")

    cache_aware: bool = True
    """Send a predict or load job to a live process of its pool that holds its model (or to the one where loading
    it evicts least) through that process's own queue; off, every job goes to the pool queue."""
    max_backlog: int = Field(8, ge=1)
    """A process with this many jobs waiting in its own queue takes no more routed jobs: the next go to another
    holder, to a new copy of the model, or to the pool queue. The default is a forward's worth of rows
    (``BATCH_PREFERRED_BATCH_SIZE``): more waiting behind one process costs latency a copy would save."""


class FleetSettings(BaseSettings):
    """Top-level settings of a fleet process (API, worker, CLI)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", use_attribute_docstrings=True)

    serving_adapter_type: AdapterName = "simple"
    """Adapter used when a job does not name one; also the adapter a worker pool serves by default."""
    default_device: DeviceName = "cpu"
    """Device used when a job does not name one."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Broker, result backend and stats store."""
    redis_password: SecretStr | None = None
    """Redis' password (``requirepass``, or the ACL user's of the URL); it replaces a password in ``REDIS_URL``."""
    redis_password_file: Path | None = None
    """A file whose content (stripped) is Redis' password, e.g. a mounted Secret or a compose secret; it replaces a
    password in ``REDIS_URL``. Set it or ``REDIS_PASSWORD``, not both."""
    redis_ssl_ca_certs: Path | None = None
    """With a ``rediss://`` URL: the CA bundle that signed Redis' certificate (the system's when unset)."""
    redis_ssl_certfile: Path | None = None
    """With a ``rediss://`` URL: a client certificate, for a Redis that requires one (``tls-auth-clients``)."""
    redis_ssl_keyfile: Path | None = None
    """With a ``rediss://`` URL: the client certificate's private key."""
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """With a ``rediss://`` URL: whether Redis' certificate must verify (``none`` only for throwaway tests)."""
    redis_key_prefix: str = "fleet"
    """Prefix of every key the fleet writes besides Celery's own (tests use their own prefix)."""
    model_store_dir: Path = Field(default_factory=lambda: state_dir() / "model-store")
    """Root of the model store: ``<store>/<symbol>/<timeframe>/<model_type>/<version>/``."""
    result_ttl_seconds: int = Field(86400, gt=0)
    """How long job results, job documents and per-job keys live in Redis."""
    job_time_limit_seconds: int = Field(600, gt=0)
    """Hard time limit of one job (it then fails with ``JobTimeoutError``); the soft limit and the Redis
    visibility timeout are sized from it."""
    job_max_deliveries: int = Field(3, ge=1)
    """A job delivered this many times without finishing (its process died each time) fails with
    ``PoisonJobError`` instead of looping."""
    worker_engine: Literal["batching", "celery"] = "batching"
    """Engine of ``fleet worker``: ``batching`` (batches per fetch, the fastest) or ``celery`` (Celery's prefork)."""
    worker_lost_after_seconds: float = Field(30, gt=0)
    """A worker whose every process stopped heart-beating this long ago is lost (its host died): any live worker
    gives what it held back to the head of its queues."""
    worker_shutdown_grace_seconds: float = Field(30, gt=0)
    """On SIGTERM a batching-engine worker lets jobs in hand finish this long, then kills what is left."""
    worker_torch_threads: int = Field(0, ge=0)
    """Torch intra-op threads per worker process; 0 means cores // processes (never oversubscribe)."""
    log_level: str = "INFO"
    """Log level of every fleet process (DEBUG, INFO, WARNING, ERROR)."""
    enable_metrics: bool = True
    """Serve Prometheus metrics on the API's ``/metrics``."""
    enable_health_checks: bool = True
    """Serve ``/healthz`` and ``/readyz`` on the API."""
    api_max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Bodies larger than this are refused with 413."""
    api_redis_max_connections: int = Field(2048, ge=8)
    """Redis connections the API's pool may hold (for requests in flight; waits share one pub/sub connection)."""
    api_auth_enabled: bool = True
    """Every route but ``/healthz``, ``/readyz``, ``/docs`` and ``/openapi.json`` needs an API key (``X-API-Key``
    or ``Authorization: Bearer``); keys are made with ``fleet keys create``."""
    api_keys_file: Path | None = None
    """A JSON file of static keys (``[{"name", "key", "scopes"}]``), e.g. a mounted Kubernetes Secret; read at
    start-up, besides the keys stored in Redis."""
    api_metrics_key_file: Path | None = None
    """A file holding one key (the secret alone) that may read ``/metrics`` and nothing else, named
    ``prometheus``: what a scraper sends as its bearer token (the Helm chart makes one for its PodMonitor)."""
    api_key_cache_seconds: float = Field(5.0, ge=0)
    """How long the API trusts a key it looked up (a revoked key stops working within this)."""
    api_rate_limit: str = "100/minute"
    """Requests per key and window (the ``limits`` notation: ``100/minute``, ``10/second``), shared by every
    API replica through Redis."""
    api_rate_limits: dict[str, str] = Field(default_factory=dict)
    """Per-scope overrides of ``API_RATE_LIMIT`` as JSON, e.g. ``{"metrics": "600/minute"}``."""
    api_max_websockets: int = Field(1024, ge=1)
    """Event sockets the API holds open at once, over all keys (more are refused with 503)."""
    api_max_websockets_per_key: int = Field(32, ge=1)
    """Event sockets one key may hold open at once (more are refused with 429)."""
    api_websocket_max_seconds: float = Field(3600, gt=0)
    """An event socket is closed after this long even if its job has not ended."""
    api_max_result_values: int = Field(2_000_000, ge=1)
    """Largest result a job may ask for (items x n_steps x channels numbers); larger jobs are refused with 422."""
    api_grpc_port: int | None = Field(None, ge=0, le=65535)
    """Serve gRPC (the Open Inference Protocol's ``GRPCInferenceService``, the fleet's ``JobService``, health) on
    this port beside the HTTP API (0: any free port); unset, no gRPC. ``fleet api --grpc-port`` sets it."""
    api_grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds (loopback unless asked: ``0.0.0.0`` in a container)."""
    api_url: str = "http://127.0.0.1:8000"
    """Where the CLI's producer commands (``fleet predict``, ``fleet jobs``, ``fleet stats``) reach the API."""
    fleet_api_key: SecretStr | None = None
    """The key the CLI's producer commands send; unset, they read the one ``fleet up`` wrote to its state dir."""
    pools: str = "simple:cpu"
    """Comma-separated ``adapter:device`` pools the API expects live workers for (``/readyz``)."""
    flower_basic_auth: SecretStr | None = None
    """``user:password`` Flower asks for (Flower's own ``FLOWER_BASIC_AUTH``); ``fleet flower`` refuses to start
    without it."""

    simple: SimpleSettings = Field(default_factory=SimpleSettings)
    torchscript: TorchScriptSettings = Field(default_factory=TorchScriptSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    torchserve: TorchServeSettings = Field(default_factory=TorchServeSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)


def settings_table() -> list[tuple[str, str, str]]:
    """Every environment variable with its default and meaning (the README's configuration table)."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type[BaseSettings], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
                walk(annotation, str(annotation.model_config.get("env_prefix", "")))
                continue
            default = field.default_factory() if field.default_factory else field.default
            if isinstance(default, Path) and str(default).startswith(str(Path.home())):
                default = "~" + str(default)[len(str(Path.home())):]
            rows.append(((prefix + name).upper(), str(default), (field.description or "").replace("\n", " ")))

    walk(FleetSettings, "")
    return rows


@lru_cache(maxsize=1)
def get_settings() -> FleetSettings:
    """The process-wide settings, read once from the environment."""
    return FleetSettings()
