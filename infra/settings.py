"""Settings read from the environment (CONTRACT.md, "Configuration")."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONTACT_EVENTS_TOPIC = "contact-events"
DEAD_LETTER_TOPIC = "contact-events.dlq"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    kafka_bootstrap: str | None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    metrics_port: int | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    public_url: str = "http://127.0.0.1:8000"
    admin_token: str = ""
    admin_token_generated: bool = False
    email_domains: tuple[str, ...] = ("example.com",)
    smtp_relay: str | None = None
    smtp_relay_user: str | None = None
    smtp_relay_password: str | None = None
    smtp_from: str | None = None
    smtp_max_bytes: int = 25 * 1024 * 1024
    smtp_tls_cert: str | None = None
    smtp_tls_key: str | None = None
    smtp_require_tls: bool = False
    smtp_auth_file: str | None = None
    ivr_config: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_api_base: str | None = None
    twilio_caller_id: str | None = None
    twilio_sms_from: str | None = None
    twilio_whatsapp_from: str | None = None
    chat_secret: str | None = None
    meta_app_secret: str | None = None
    meta_verify_token: str | None = None
    meta_access_token: str | None = None
    meta_graph_url: str | None = None
    # Idempotent producers need InitProducerId, which the embedded broker rejects; on for
    # a real Apache Kafka cluster.
    kafka_idempotence: bool = False
    kafka_partitions: int = 8
    consumer_group: str = "inbox-ingest"
    # Several deployments (or test runs) can share one cluster under different topic names.
    contact_events_topic: str = CONTACT_EVENTS_TOPIC
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def dead_letter_topic(self) -> str:
        return self.contact_events_topic + ".dlq"

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_path(self) -> Path:
        """The event store file; read models live beside it in their own file."""
        assert not self.is_postgres
        return Path(self.database_url.removeprefix("sqlite:///"))

    @property
    def views_path(self) -> Path:
        return self.sqlite_path.with_name(self.sqlite_path.stem + "-views.db")


def chat_secret(settings: Settings) -> bytes:
    """INBOX_CHAT_SECRET, or one made once and kept in the data directory, so visitor tokens
    survive a restart (several `inbox serve` processes must share a configured one)."""
    if settings.chat_secret:
        return settings.chat_secret.encode()
    path = settings.data_dir / "chat-secret"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"chat-secret.{os.getpid()}.tmp")
        temporary.write_text(secrets.token_urlsafe(32))
        temporary.chmod(0o600)
        # link() refuses to replace: when two processes race, both read the first one's.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        temporary.unlink()
    return path.read_text().strip().encode()


def _opt(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    data_dir = Path(env.get("INBOX_DATA_DIR") or "./var").resolve()
    database_url = _opt(env, "INBOX_DATABASE_URL") or f"sqlite:///{data_dir / 'inbox.db'}"
    admin_token = _opt(env, "INBOX_ADMIN_TOKEN")
    bootstrap = _opt(env, "INBOX_KAFKA_BOOTSTRAP")
    idempotence_default = "0" if bootstrap is None else "1"
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        kafka_bootstrap=bootstrap,
        http_host=env.get("INBOX_HTTP_HOST") or "127.0.0.1",
        http_port=int(env.get("INBOX_HTTP_PORT") or 8000),
        metrics_port=int(env["INBOX_METRICS_PORT"]) if env.get("INBOX_METRICS_PORT") else None,
        smtp_host=env.get("INBOX_SMTP_HOST") or "127.0.0.1",
        smtp_port=int(env.get("INBOX_SMTP_PORT") or 2525),
        public_url=(env.get("INBOX_PUBLIC_URL") or "http://127.0.0.1:8000").rstrip("/"),
        admin_token=admin_token or secrets.token_urlsafe(24),
        admin_token_generated=admin_token is None,
        email_domains=tuple(
            d.strip().lower()
            for d in (env.get("INBOX_EMAIL_DOMAINS") or "example.com").split(",")
            if d.strip()
        ),
        smtp_relay=_opt(env, "INBOX_SMTP_RELAY"),
        smtp_relay_user=_opt(env, "INBOX_SMTP_RELAY_USER"),
        smtp_relay_password=_opt(env, "INBOX_SMTP_RELAY_PASSWORD"),
        smtp_from=_opt(env, "INBOX_SMTP_FROM"),
        smtp_max_bytes=int(env.get("INBOX_SMTP_MAX_BYTES") or 25 * 1024 * 1024),
        smtp_tls_cert=_opt(env, "INBOX_SMTP_TLS_CERT"),
        smtp_tls_key=_opt(env, "INBOX_SMTP_TLS_KEY"),
        smtp_require_tls=(env.get("INBOX_SMTP_REQUIRE_TLS") or "0") == "1",
        smtp_auth_file=_opt(env, "INBOX_SMTP_AUTH_FILE"),
        ivr_config=_opt(env, "INBOX_IVR_CONFIG"),
        twilio_account_sid=_opt(env, "TWILIO_ACCOUNT_SID"),
        twilio_auth_token=_opt(env, "TWILIO_AUTH_TOKEN"),
        twilio_api_base=_opt(env, "TWILIO_API_BASE"),
        twilio_caller_id=_opt(env, "TWILIO_CALLER_ID"),
        twilio_sms_from=_opt(env, "TWILIO_SMS_FROM"),
        twilio_whatsapp_from=_opt(env, "TWILIO_WHATSAPP_FROM"),
        chat_secret=_opt(env, "INBOX_CHAT_SECRET"),
        meta_app_secret=_opt(env, "META_APP_SECRET"),
        meta_verify_token=_opt(env, "META_VERIFY_TOKEN"),
        meta_access_token=_opt(env, "META_ACCESS_TOKEN"),
        meta_graph_url=_opt(env, "META_GRAPH_URL"),
        kafka_idempotence=(env.get("INBOX_KAFKA_IDEMPOTENCE") or idempotence_default) == "1",
        kafka_partitions=int(env.get("INBOX_KAFKA_PARTITIONS") or 8),
        consumer_group=env.get("INBOX_CONSUMER_GROUP") or "inbox-ingest",
        contact_events_topic=env.get("INBOX_KAFKA_TOPIC") or CONTACT_EVENTS_TOPIC,
    )
