"""Configuration in layers: defaults < file < environment < command line.

One typed section per component. The file is YAML (``ivr-bridge.yaml`` or ``--config``); environment variables
are ``IVR_BRIDGE__SECTION__KEY=value``; the command line takes ``--set section.key=value``. Secrets (the AMI
password, SIP passwords) come from the environment or from ``<var_dir>/secrets.yaml``, which set-up generates
with mode 0600 and which is never committed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets as _secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

ENV_PREFIX = "IVR_BRIDGE__"
PROJECT_DIR = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """Configuration that cannot be used; the message says which setting and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class GeneralConfig(Section):
    var_dir: Path = PROJECT_DIR / "var"
    log_level: str = "INFO"


class DatabaseConfig(Section):
    url: str = ""  # empty: SQLite file under var_dir

    def resolved_url(self, var_dir: Path) -> str:
        return self.url or f"sqlite+aiosqlite:///{var_dir / 'ivr-bridge.db'}"


class RedisConfig(Section):
    url: str = "redis://127.0.0.1:6379/0"
    events_channel: str = "ivr-bridge:events"


class AsteriskConfig(Section):
    root: Path | None = Path("/var/cache/ivr-bridge/asterisk-root")  # chroot holding Asterisk; None: native
    instance: str = "dev"
    host: str = "127.0.0.1"
    ami_port: int = 5038
    ami_user: str = "ivr-bridge"
    ami_secret: str = ""
    sip_bind: str = "127.0.0.1"
    sip_port: int = 5060
    media_address: str = "127.0.0.1"  # RTP address Asterisk uses (set with sip_bind for a LAN)
    rtp_start: int = 10000
    rtp_end: int = 10999
    trunk_match: str = "127.0.0.1"
    softphone_password: str = ""
    # The agents' desk phones (PJSIP endpoints with md5 digest credentials); each phone's password is derived
    # from agent_phone_secret (`ivr-bridge agents phone-password <phone>` prints it for provisioning).
    agent_phones: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")]] = Field(
        default_factory=lambda: ["agent1", "agent2", "agent3", "agent4"], max_length=500)
    agent_phone_secret: str = ""
    # Callbacks: Asterisk calls the customer through this endpoint at sip:<E.164>@callback_host ("" = callbacks
    # off: the queue node tells callers it cannot call back).
    callback_trunk: str = Field(default="hotline-trunk", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    callback_host: str = Field(default="", pattern=r"^([A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?)?$")
    callback_ring_seconds: int = Field(default=30, ge=5, le=120)
    heartbeat_interval: float = 3.0
    heartbeat_max: int = 12
    ami_timeout: float = 5.0
    reconnect_max_delay: float = 10.0

    @property
    def instance_dir(self) -> str:
        """The instance folder as Asterisk sees it (inside the chroot)."""
        return f"/var/lib/ivr-bridge/{self.instance}"

    @property
    def prompt_dir(self) -> str:
        return f"{self.instance_dir}/prompts"

    def agent_phone_password(self, phone: str) -> str:
        """The SIP password of one agent phone, derived from ``agent_phone_secret``."""
        if len(self.agent_phone_secret) < 16:
            raise ConfigError("no agent phone secret (run `ivr-bridge setup-secrets`)")
        digest = hmac.new(self.agent_phone_secret.encode(), b"agent-phone\0" + phone.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).decode()[:24]

    def host_path(self, asterisk_path: str) -> Path:
        """Where a path Asterisk sees lives on this host."""
        return (self.root or Path("/")) / asterisk_path.lstrip("/")


class FlowsConfig(Section):
    paths: list[Path] = [PROJECT_DIR / "flows"]
    reload_interval: float = 2.0
    default_flow: str = "hotline"
    default_region: str = "CN"  # how national caller numbers are read (ISO 3166 code)


class TtsConfig(Section):
    voices: dict[str, str] = {"en": "gmw/en-us", "zh-CN": "sit/cmn", "ko": "ko"}
    rate: int = 165
    workers: int = 2


class WebConfig(Section):
    """The aiohttp app (self-service pages, links, delivery reports; later chat and the agent desktop)."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"  # what links in SMS and email point at
    secure_cookies: bool = False   # True behind HTTPS (the default dev server speaks plain HTTP on loopback)
    dev_pages: bool = True         # /dev/outbox: the SMS and mail the dev sinks received
    trusted_proxies: list[str] = []  # whose X-Forwarded-For is believed for per-client limits
    # The web chat. Pages on these origins may embed the chat widget (frame /chat, open its websocket), e.g.
    # "https://shop.example.com"; scheme, host and port only.
    widget_origins: list[Annotated[str, StringConstraints(
        pattern=r"^https?://([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")]] = []
    chat_skill: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")] = "general"
    chat_token_hours: float = Field(default=24.0, gt=0, le=24 * 30)  # how long a visitor's chat token works
    chat_starts_per_hour: int = Field(default=20, ge=0)       # new chats per client address
    chat_messages_per_hour: int = Field(default=300, ge=0)    # visitor messages per chat (and 4x per address)


class LinksConfig(Section):
    secret: str = ""               # HMAC key for signed links (generated into secrets.yaml)
    ttl_days: int = Field(default=14, ge=1, le=365)


class SmsLimits(Section):
    """Against SMS pumping: counts per hour."""

    per_number: int = 3
    per_prefix: int = 20           # numbers sharing all but their last ``prefix_tail`` digits
    prefix_tail: int = 3
    per_country: int = 200
    global_: int = Field(default=1000, alias="global")


class KannelConfig(Section):
    host: str = "127.0.0.1"
    sendsms_port: int = 13013
    username: str = "ivr-bridge"
    password: str = ""             # generated into secrets.yaml
    admin_port: int = 13000
    smsc_port: int = 10000         # the fake SMSC's port (dev and tests)
    instance: str = "dev"          # var/kannel/<instance>: rendered config, logs, the fake SMSC's output
    timeout: float = 10.0
    smsbox_port: int = 13001       # bearerbox's port for smsbox (local instances)
    max_messages: int = Field(default=6, ge=1, le=20)   # SMS parts one text may take (UCS-2: 67 characters each)
    dlr_retries: int = Field(default=30, ge=0)          # smsbox retries a delivery report our web app did not take
    dlr_retry_delay: int = Field(default=10, ge=1)      # seconds between those retries


class HttpSmsConfig(Section):
    """A generic HTTP SMS provider: a URL and a body template; credentials from the environment."""

    url: str = ""
    method: str = "POST"
    body: str = ""                 # jinja2 template over to, sender, text, id (JSON or form, see content_type)
    content_type: str = "application/x-www-form-urlencoded"
    headers: dict[str, str] = {}   # values may name environment variables as ${NAME}
    success_status: list[int] = [200, 201, 202]
    ref_pattern: str = ""          # regex with one group that finds the provider's message id in the answer
    timeout: float = 10.0


class SmsConfig(Section):
    gateway: str = "kannel"        # kannel | http | none
    sender: str = "IVRBridge"
    countries: list[str] = ["CN", "US", "GB", "DE", "FR", "KR", "JP", "SG", "HK"]  # allowlist (ISO 3166)
    limits: SmsLimits = Field(default_factory=SmsLimits)
    kannel: KannelConfig = Field(default_factory=KannelConfig)
    http: HttpSmsConfig = Field(default_factory=HttpSmsConfig)


class EmailLimits(Section):
    per_address: int = 5           # an hour
    per_client: int = 10           # "email me this" requests per client address an hour
    global_: int = Field(default=2000, alias="global")


class EmailConfig(Section):
    gateway: str = "smtp"          # smtp | none
    host: str = "127.0.0.1"
    port: int = 8025               # the dev mail sink (``ivr-bridge dev-mail``)
    starttls: bool = False
    tls: bool = False              # implicit TLS (port 465)
    username: str = ""
    password: str = ""             # from the environment / secrets.yaml
    validate_certs: bool = True
    from_addr: str = "help@example.com"
    from_name: str = "Example Help"
    connections: int = 4           # SMTP connections kept open
    helo_name: str = ""            # the name given in EHLO; empty: this host's FQDN
    timeout: float = 30.0
    dev_sink_dir: Path | None = None   # default: <var_dir>/dev-mail
    limits: EmailLimits = Field(default_factory=EmailLimits)


class OutboxConfig(Section):
    enabled: bool = True           # run a dispatcher in ``ivr-bridge run``
    concurrency: int = Field(default=32, ge=1, le=512)
    batch: int = Field(default=200, ge=1, le=5000)
    poll_interval: float = 0.5
    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_base: float = 2.0      # seconds, doubled per attempt, with jitter
    backoff_max: float = 600.0
    lease: float = 120.0           # a claimed follow-up whose dispatcher is gone is taken back after this
    verify_timeout: float = 120.0  # how long a delivery report may take before an interrupted SMS is re-sent


class RouterConfig(Section):
    """The unified queue (Redis): offers, capacities, the rule across channels, wrap-up."""

    key_prefix: str = Field(default="ivr-bridge:{router}:", pattern=r"^[A-Za-z0-9:_{}.-]{1,64}$")
    offer_timeout: float = Field(default=15.0, gt=0, le=300)    # unanswered: back to the head, the agent "away"
    wrapup_seconds: float = Field(default=30.0, ge=0, le=3600)  # after-call work after a call (0: none)
    voice_capacity: int = Field(default=1, ge=0, le=1)
    chat_capacity: int = Field(default=4, ge=0, le=10)
    call_blocks_chats: bool = True   # no new chat is offered during a call; chats in progress continue
    tick_interval: float = Field(default=0.5, gt=0, le=10)      # offer and wrap-up deadlines are checked this often
    scan_limit: int = Field(default=200, ge=1, le=10000)        # queued interactions one assignment looks at


class ReportsConfig(Section):
    deflection_window_hours: float = 72.0


_WRAPUP_CODE = re.compile(r"[a-z0-9_]{1,32}")  # stored in interactions.wrapup_code (32 characters)


class DeskConfig(Section):
    """The agent desktop and the supervisor view (online_chat/desk.py): sessions, login limits, chat limits,
    wrap-up codes and canned replies (texts per UI language, ``en`` required; ``{agent}`` is the agent's name)."""

    session_idle: float = Field(default=1800.0, gt=0)       # seconds without an open desktop before a session ends
    session_lifetime: float = Field(default=43200.0, gt=0)  # seconds after login, however busy
    login_per_account: int = Field(default=10, ge=1)        # login attempts an hour per account name
    login_per_client: int = Field(default=30, ge=1)         # login attempts an hour per client address
    max_message: int = Field(default=2000, ge=1, le=2000)   # characters of an agent's chat message (the chat: 2000)
    wrapup_codes: dict[str, dict[str, str]] = {
        "resolved": {"en": "Resolved", "zh-CN": "已解决"},
        "help_link": {"en": "Answered with a help link", "zh-CN": "已发送帮助链接"},
        "follow_up": {"en": "Needs a follow-up", "zh-CN": "需要跟进"},
        "complaint": {"en": "Complaint", "zh-CN": "投诉"},
        "no_reply": {"en": "Customer did not reply", "zh-CN": "客户未回应"},
        "other": {"en": "Other", "zh-CN": "其他"},
    }
    canned_replies: list[dict[str, str]] = [
        {"en": "Hello, this is {agent}. How can I help you?", "zh-CN": "您好，我是{agent}，请问有什么可以帮您？"},
        {"en": "Thank you for waiting.", "zh-CN": "感谢您的耐心等待。"},
        {"en": "Let me check that for you; it will take a moment.", "zh-CN": "我帮您查一下，请稍等。"},
        {"en": "Is there anything else I can help you with?", "zh-CN": "请问还有其他可以帮您的吗？"},
        {"en": "Thank you for contacting us. Goodbye!", "zh-CN": "感谢您的咨询，再见！"},
    ]

    @field_validator("wrapup_codes")
    @classmethod
    def _codes(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for code, labels in value.items():
            if not _WRAPUP_CODE.fullmatch(code):
                raise ValueError(f"wrap-up code {code!r}: 1-32 of a-z, 0-9 and _")
            if not labels.get("en", "").strip():
                raise ValueError(f"wrap-up code {code!r} needs an English label (en)")
        return value

    @field_validator("canned_replies")
    @classmethod
    def _replies(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        if any(not reply.get("en", "").strip() for reply in value):
            raise ValueError("every canned reply needs an English text (en)")
        return value


class Config(Section):
    general: GeneralConfig = Field(default_factory=GeneralConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    asterisk: AsteriskConfig = Field(default_factory=AsteriskConfig)
    flows: FlowsConfig = Field(default_factory=FlowsConfig)
    tts: TtsConfig = Field(default_factory=TtsConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    links: LinksConfig = Field(default_factory=LinksConfig)
    sms: SmsConfig = Field(default_factory=SmsConfig)
    email: EmailConfig = Field(default_factory=EmailConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)
    desk: DeskConfig = Field(default_factory=DeskConfig)

    @property
    def database_url(self) -> str:
        return self.database.resolved_url(self.general.var_dir)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"setting {dotted!r} must be section.key")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted!r}: {part} is not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except YAMLError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    return data


def _parse_scalar(text: str) -> Any:
    """Environment and CLI values are YAML scalars or flow collections (``[a, b]``, ``{en: x}``)."""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError:
        return text


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Build the configuration from its layers and validate it."""
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    file = path or (Path(env["IVR_BRIDGE_CONFIG"]) if env.get("IVR_BRIDGE_CONFIG") else None)
    if file is None and (PROJECT_DIR / "ivr-bridge.yaml").exists():
        file = PROJECT_DIR / "ivr-bridge.yaml"
    if file is not None:
        tree = _merge(tree, _read_yaml(file))
    env_tree: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            _set_path(env_tree, key[len(ENV_PREFIX):].lower().replace("__", "."), _parse_scalar(value))
    tree = _merge(tree, env_tree)
    cli_tree: dict[str, Any] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set_path(cli_tree, name.strip(), _parse_scalar(value))
    tree = _merge(tree, cli_tree)
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
    _fill_secrets(config)
    return config


def secrets_path(config: Config) -> Path:
    return config.general.var_dir / "secrets.yaml"


def _fill_secrets(config: Config) -> None:
    """Take missing secrets from var/secrets.yaml (written by ``ensure_secrets``)."""
    path = secrets_path(config)
    if not path.exists():
        return
    stored = _read_yaml(path)
    ast = config.asterisk
    if not ast.ami_secret:
        ast.ami_secret = str(stored.get("ami_secret", ""))
    if not ast.softphone_password:
        ast.softphone_password = str(stored.get("softphone_password", ""))
    if not ast.agent_phone_secret:
        ast.agent_phone_secret = str(stored.get("agent_phone_secret", ""))
    if not config.links.secret:
        config.links.secret = str(stored.get("link_secret", ""))
    if not config.sms.kannel.password:
        config.sms.kannel.password = str(stored.get("kannel_password", ""))
    if not config.email.password:
        config.email.password = str(stored.get("smtp_password", ""))


def ensure_secrets(config: Config) -> None:
    """Generate secrets that are still missing into var/secrets.yaml (mode 0600) and into ``config``."""
    path = secrets_path(config)
    stored = _read_yaml(path) if path.exists() else {}
    changed = False
    for key in ("ami_secret", "softphone_password", "agent_phone_secret", "link_secret", "kannel_password"):
        if not stored.get(key):
            stored[key] = _secrets.token_urlsafe(24)
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("# generated by ivr-bridge; keep private\n")
            for key, value in stored.items():
                fh.write(f"{key}: {value}\n")
    _fill_secrets(config)
