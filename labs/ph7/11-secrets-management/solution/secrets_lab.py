"""ph7.11 - secrets management: find secrets before they ship, and handle them at run
time without ever writing them down.

1. ``scan_tree(root)``: a secret scanner in the style of gitleaks / truffleHog: format rules
   for credentials with a known shape (AWS, GitHub, Stripe, Slack, private keys), plus an
   entropy check for values assigned to secret-sounding names; placeholders, references
   and documentation examples are not secrets.
2. ``Config``: secrets from the environment or from files (``NAME_FILE``, how Docker and
   Kubernetes mount them), re-read after a TTL so a rotated secret is picked up without a
   restart, and never shown: not in repr, not in logs, not in error messages.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

RULES = [
    ("aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("github-token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b")),
    ("stripe-live-key", re.compile(r"\b[sr]k_live_[A-Za-z0-9]{24,}\b")),
    ("slack-token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    # any PEM private key, whatever the words before (RSA, EC, ENCRYPTED, PGP ... BLOCK)
    ("private-key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
]
ASSIGNMENT = re.compile(
    r"""(?ix) (?P<name>[\w.-]*(?:password|passwd|secret|token|api_?key)[\w.-]*) ["']? \s*
        [:=] \s* (?P<quote>["']?) (?P<value>[^\s"',;]+) (?P=quote)""")
# A default handed to a lookup is assigned too - os.getenv("API_TOKEN", "<value>"),
# settings.get("password", "<value>"): a hard-coded default is a hard-coded secret (gitleaks
# counts the comma as an assignment). Both quoted, so a call's plain arguments are not.
LOOKUP_DEFAULT = re.compile(
    r"""(?ix) (?P<open>["']) (?P<name>[\w.-]*(?:password|passwd|secret|token|api_?key)[\w.-]*)
        (?P=open) \s* , \s* (?P<quote>["']) (?P<value>[^\s"',;]+) (?P=quote)""")
PLACEHOLDER = re.compile(r"^(?:\$\{.*\}|\$[A-Z_]+|<.*>|\{\{.*\}\}|%\(.*\)s|os\.environ.*|"
                         r"env\(.*\)|getenv\(.*\))$", re.IGNORECASE)
MIN_LENGTH = 12
MIN_ENTROPY = 3.0


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def scan_text(text: str) -> list[tuple[int, str]]:
    findings = []
    # lines end at "\n" (and "\r\n"), as editors and git count them; str.splitlines() would
    # also split at a form feed or U+0085 and shift every line number after it
    for number, line in enumerate(text.split("\n"), 1):
        hit = None
        for rule, pattern in RULES:
            # every match: the AWS docs' example key (…EXAMPLE) is no secret, but a real
            # key after it on the same line is
            if any("EXAMPLE" not in match.group(0) for match in pattern.finditer(line)):
                hit = rule
                break
        if hit is None:
            for match in [*ASSIGNMENT.finditer(line), *LOOKUP_DEFAULT.finditer(line)]:
                value = match.group("value")
                if (len(value) >= MIN_LENGTH and entropy(value) >= MIN_ENTROPY
                        and not PLACEHOLDER.match(value)):
                    hit = "high-entropy-assignment"
                    break
        if hit:
            findings.append((number, hit))
    return findings


def scan_tree(root: str) -> list[tuple[str, int]]:
    """(path relative to root, 1-based line) of every line holding a secret."""
    found = []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable: a dangling symlink, a file without read permission
        if b"\0" in data:
            continue  # binary, as git and grep -I tell it: a NUL byte
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # still text, in another encoding (a Latin-1 .properties file, a cp1252 note):
            # the credentials are ASCII whatever surrounds them, and Latin-1 decodes any
            # byte, one character each, so nothing is skipped and lines stay where they are
            text = data.decode("latin-1")
        found += [(str(path.relative_to(root)), n) for n, _ in scan_text(text)]
    return found


# ---- configuration ----------------------------------------------------------------------

class ConfigError(Exception):
    """The configuration is unusable; the message names the variable, never a value."""


SECRETS = ("DB_PASSWORD", "API_TOKEN")
PLAIN = {"DATABASE_HOST": None, "LOG_LEVEL": "INFO"}  # None: required


class Config:
    def __init__(self, env: Mapping[str, str], clock: Callable[[], float], log_path: str,
                 ttl: float = 60.0) -> None:
        self.env, self.clock, self.ttl = dict(env), clock, ttl
        self.log_path = log_path
        self.plain: dict[str, str] = {}
        for name, default in PLAIN.items():
            value = self.env.get(name, default)
            if value is None:
                raise ConfigError(f"{name} is required")
            self.plain[name] = value
        self._cache: dict[str, tuple[str, float]] = {}
        for name in SECRETS:
            self._load(name)  # fail fast: a missing secret stops the start, not a request
        self._log(f"config loaded: {self!r}")

    def _log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    def _load(self, name: str) -> str:
        direct, file = self.env.get(name), self.env.get(f"{name}_FILE")
        if direct is not None and file is not None:
            raise ConfigError(f"both {name} and {name}_FILE are set: choose one")
        if file is not None:
            try:
                # open by path every time: a rotation replaces the file (or the ..data
                # symlink Kubernetes swaps), so an old descriptor would keep the old secret
                value = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"{name}_FILE cannot be read ({exc.strerror})") from None
        elif direct is not None:
            value = direct
        else:
            raise ConfigError(f"{name} (or {name}_FILE) is required")
        if not value:
            raise ConfigError(f"{name} is empty")
        if name == "API_TOKEN" and len(value) < 20:
            raise ConfigError("API_TOKEN is too short: at least 20 characters")
        previous = self._cache.get(name)
        self._cache[name] = (value, self.clock())
        if previous is not None and previous[0] != value:
            self._log(f"secret {name} rotated")
        return value

    def get(self, name: str) -> str:
        if name in self.plain:
            return self.plain[name]
        if name not in SECRETS:
            raise KeyError(name)
        value, loaded = self._cache[name]
        if self.clock() - loaded >= self.ttl:
            value = self._load(name)
        return value

    def __repr__(self) -> str:
        shown = {**self.plain, **{name: "***" for name in SECRETS}}
        return f"Config({shown})"

    __str__ = __repr__
