"""Verification for ph7.11 secrets-management.

1. The learner's scanner runs over a planted corpus: a small repository tree with real-
   shaped secrets (AWS, GitHub, Stripe, Slack keys, a private key, random passwords and
   tokens assigned in Python, .env, YAML and JSON) and look-alikes that are not secrets
   (the AWS documentation key, placeholders, environment references, a checksum, a commit
   id, a public key, low-entropy and too-short values). Every secret must be found, by file
   and line, and no look-alike flagged.
2. The learner's Config runs on files laid out as Kubernetes mounts a Secret (a ..data
   symlink swapped atomically on rotation), with the test's clock: values with their
   trailing newline stripped, fail-fast errors, the rotated secret picked up after the TTL
   whether the file was rewritten in place, replaced by rename or swapped by the kubelet;
   and no secret value in its log file, its repr or any error message.
"""

from __future__ import annotations

import os
import random
import string
from pathlib import Path
from typing import Any

import pytest

RNG = random.Random(711)
ALNUM = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(n))


AWS = "AKIA" + rand(16, string.ascii_uppercase + string.digits)
GITHUB = "ghp_" + rand(36)
STRIPE = "sk_live_" + rand(24)
SLACK = "xoxb-" + rand(11, string.digits) + "-" + rand(24)
SECRET_KEY = rand(40)
DOTENV_PASSWORD = rand(18, ALNUM + "!#%&*+-")
CLIENT_SECRET = rand(24)
JSON_KEY = rand(32)


def shaped(counts: list[int]) -> str:
    """A random value whose characters repeat ``counts`` times: its entropy is fixed."""
    chars = RNG.sample(ALNUM, len(counts))
    value = [c for c, n in zip(chars, counts, strict=True) for _ in range(n)]
    RNG.shuffle(value)
    return "".join(value)


ASIA = "ASIA" + rand(16, string.ascii_uppercase + string.digits)
GITHUB_APP = "ghs_" + rand(36)
STRIPE_RESTRICTED = "rk_live_" + rand(30)
PASSWD = rand(20)
CAMEL_KEY = rand(28)
FLOW_TOKEN = rand(24)
SECRET_12 = shaped([1] * 12)                        # 12 characters: the shortest flagged
TOKEN_11 = shaped([1] * 11)                         # 11: too short, however random
MODERATE = shaped([2, 2, 2, 2, 2, 2, 2, 1, 1])      # 3.125 bits/char: flagged
AT_THRESHOLD = shaped([2] * 8)                      # exactly 3.0 bits/char: flagged (>=)
LOW = shaped([2, 2, 2, 2, 2, 3, 2, 1])              # 2.95 bits/char: not
# A placeholder is a whole VALUE (${X}, <...>, {{ }}): a comment beside a real secret that
# mentions one, or a random password that happens to hold a '$', is still a secret.
COMMENTED_PASSWORD = rand(22)
COMMENTED_SECRET = rand(26)
DOLLAR_PASSWORD = rand(9) + "$" + rand(1, string.ascii_uppercase) + rand(9)
AWS_AFTER_EXAMPLE = "AKIA" + rand(16, string.ascii_uppercase + string.digits)
LOOKUP_DEFAULT = rand(32)  # the default of an environment lookup: hard-coded all the same

# (file, [(line text, secret description or None for a look-alike)])
CORPUS: dict[str, list[tuple[str, str | None]]] = {
    "app/settings.py": [
        ("import os", None),
        ("DEBUG = False", None),
        (f'AWS_ACCESS_KEY_ID = "{AWS}"', "an AWS access key id"),
        ('AWS_DOCS_KEY = "AKIAIOSFODNN7EXAMPLE"', None),
        ('DB_PASSWORD = os.environ["DB_PASSWORD"]', None),
        ('password = "changeme"', None),
        (f'SECRET_KEY = "{SECRET_KEY}"', "a random Django SECRET_KEY"),
        ('ADMIN_PASSWORD = "aaaaaaaaaaaaaaaaaaaaaaaa"', None),
        (f'AWS_SESSION_ID = "{ASIA}"', "an AWS temporary key id (ASIA...)"),
        ('API_TOKEN = os.environ.get("API_TOKEN")', None),
        (f'REFRESH_TOKEN = "{SECRET_12}"', "a 12-character random token (the minimum length)"),
        (f'SESSION_TOKEN = "{TOKEN_11}"', None),
        (f'WEBHOOK_SECRET = os.environ.get("WEBHOOK_SECRET", "{LOOKUP_DEFAULT}")',
         "a random secret given as the default of an environment lookup (the lookup makes "
         "it no reference: a hard-coded default is a hard-coded secret - gitleaks counts "
         "the comma between a quoted name and a quoted value as an assignment)"),
        ('CACHE_SECRET = os.getenv("CACHE_SECRET", "")', None),
        ('SIGNING_TOKEN = os.getenv("SIGNING_TOKEN", "${SIGNING_TOKEN}")', None),
        ("def verify(password, stored_password_hash_hex):", None),
    ],
    ".env": [
        (f"DB_PASSWORD={DOTENV_PASSWORD}", "a random password in .env"),
        ("API_TOKEN=${API_TOKEN}", None),
        ("LOG_LEVEL=debug", None),
        (f"DB_PASSWD={PASSWD}", "a random password under the name passwd"),
        (f"SESSION_SECRET={MODERATE}", "a secret of 3.125 bits/char (above the 3.0 threshold)"),
        (f"CACHE_TOKEN={LOW}", None),
        (f"WEBHOOK_SECRET={AT_THRESHOLD}",
         "a secret of exactly 3.0 bits/char (the threshold is inclusive: >= 3.0)"),
        (f"REDIS_PASSWORD={COMMENTED_PASSWORD} # moves to ${{VAULT_REDIS_PATH}} next sprint",
         "a random password followed by a comment that mentions a placeholder (${...} "
         "elsewhere on the line does not make the VALUE a placeholder)"),
    ],
    "deploy/values.yaml": [
        ("image: registry.local/shop:1.4.2", None),
        ("token: <your-token-here>", None),
        (f'client_secret: "{CLIENT_SECRET}"', "a random client_secret in YAML"),
        ("checksum: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", None),
        ("secret_ref: {{ .Values.dbSecretName }}", None),
        ("db_secret: {{.Values.dbSecretName}}", None),
        (f"auth: {{token_type: bearer, access_token: {FLOW_TOKEN}}}",
         "a random access_token, second assignment on its line"),
        (f"smtp_secret: {COMMENTED_SECRET}  # TODO: read it from <vault: mail/smtp>",
         "a random smtp_secret followed by a comment holding <...> (a placeholder is the "
         "whole value, not something anywhere on the line)"),
        (f'redis_password: "{DOLLAR_PASSWORD}"',
         "a random password that holds a '$' followed by a letter (a placeholder is the "
         "whole value: ${X} or $X from its first character to its last, not a value that "
         "merely contains one)"),
    ],
    ".github/workflows/ci.yml": [
        ("env:", None),
        (f"  GH_TOKEN: {GITHUB}", "a GitHub personal access token"),
        ("  GH_TOKEN_DOCS: ghp_xxxxxxxxxxxxxxxx", None),
        ("  GH_TOKEN_CI: ${{ secrets.GH_TOKEN }}", None),
        (f"  DEPLOY_AUTH: {GITHUB_APP}", "a GitHub app token (ghs_...)"),
    ],
    "config/payments.json": [
        ("{", None),
        (f'  "api_key": "{JSON_KEY}",', "a random api_key in JSON"),
        ('  "currency": "EUR",', None),
        (f'  "apiKey": "{CAMEL_KEY}",', "a random apiKey (camelCase) in JSON"),
        (f'  "restricted": "{STRIPE_RESTRICTED}",', "a Stripe restricted live key (rk_live_)"),
        (f'  "stripe": "{STRIPE}"', "a Stripe live key"),
        ("}", None),
    ],
    "keys/deploy_key": [
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "a private key"),
        (rand(70, ALNUM + "+/"), None),
        ("-----END OPENSSH PRIVATE KEY-----", None),
    ],
    "keys/service_account.pem": [
        ("-----BEGIN PRIVATE KEY-----", "a PKCS#8 private key (no key type in its header)"),
        (rand(64, ALNUM + "+/"), None),
        ("-----END PRIVATE KEY-----", None),
    ],
    "keys/backup.pem": [  # openssl genpkey -aes256: still a key, its passphrase is near
        ("-----BEGIN ENCRYPTED PRIVATE KEY-----",
         "an encrypted PKCS#8 private key (any word before PRIVATE KEY, not a list of types)"),
        (rand(64, ALNUM + "+/"), None),
        ("-----END ENCRYPTED PRIVATE KEY-----", None),
    ],
    "keys/release-signing.asc": [
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----", "a PGP private key block"),
        (rand(64, ALNUM + "+/"), None),
        ("-----END PGP PRIVATE KEY BLOCK-----", None),
    ],
    "keys/server.pub.pem": [
        ("-----BEGIN PUBLIC KEY-----", None),
        (rand(64, ALNUM + "+/"), None),
        ("-----END PUBLIC KEY-----", None),
    ],
    "docs/notes.md": [
        ("Fixed in commit 9fceb02d0ae598e95dc970b74767f19372d61af8.", None),
        (f"Alerts go to Slack with {SLACK}", "a Slack bot token"),
        (f"Replace the docs' AKIAIOSFODNN7EXAMPLE with our key, {AWS_AFTER_EXAMPLE}.",
         "an AWS key id after the docs' example key on the same line (the example is "
         "skipped, not the line: look at every match)"),
        ("Set the password with `export DB_PASSWORD=...` before starting.", None),
    ],
}


def build_corpus(root: Path) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], str]]:
    secrets, lookalikes = {}, {}
    for rel, lines in CORPUS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(text for text, _ in lines) + "\n")
        for number, (text, what) in enumerate(lines, 1):
            if what:
                secrets[(rel, number)] = what
            else:
                lookalikes[(rel, number)] = text
    (root / "app" / "old_settings.py").symlink_to("removed_settings.py")  # dangling
    (root / "assets").mkdir()
    # a PNG's signature and IHDR chunk length (NUL bytes: binary by any measure), then noise
    (root / "assets" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"
                                               + bytes(RNG.randrange(256) for _ in range(512)))
    return secrets, lookalikes


def scanned(learner: Any, root: Path, on_error: str) -> list[tuple[str, int]]:
    """scan_tree(root) as (path, line) pairs. The learner's scanner failing fails the test,
    its exception followed by ``on_error``: what the tree held, what was expected."""
    scan_tree = learner.function("secrets_lab", "scan_tree")
    try:
        return [(str(path), int(line)) for path, line in scan_tree(str(root))]
    except NotImplementedError as exc:
        pytest.fail(f"scan_tree is not written yet ({exc})", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - the learner's scanner failed: say on what
        pytest.fail(f"scan_tree raised {type(exc).__name__}: {exc}{on_error}", pytrace=False)


def test_scanner_finds_every_planted_secret_and_no_lookalike(learner: Any) -> None:
    root = learner.tmp_folder()
    secrets, lookalikes = build_corpus(root)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        os.chmod(folder, 0o755)
    entries = scanned(learner, root, ", expected it to skip what it cannot read: the tree "
                      "holds a binary file and a dangling symlink (app/old_settings.py -> a "
                      "file that is gone); a scanner that stops at the first odd file reports "
                      "nothing at all")
    found = set(entries)
    if found:
        shifted = {(p, n + 1) for p, n in found} & set(secrets)
        absolute = {(p, n) for p, n in found if os.path.isabs(p)}
        if len(shifted) > 2 * len(found & set(secrets)):
            pytest.fail(f"the scanner's line numbers are one less than the lines' (it "
                        f"reported {sorted(found)[:3]}...): lines are 1-based - "
                        "enumerate(lines, 1)", pytrace=False)
        if absolute:
            pytest.fail(f"the scanner reported absolute paths ({sorted(absolute)[0][0]}), "
                        "expected paths relative to the root it was given "
                        "(path.relative_to(root))", pytrace=False)
    twice = sorted({e for e in entries if entries.count(e) > 1})
    missed = {k: v for k, v in secrets.items() if k not in found}
    assert not missed, (
        f"the scanner missed {len(missed)} of {len(secrets)} planted secrets: "
        + "; ".join(f"{what} at {path}:{line}" for (path, line), what in missed.items())
        + "\nFormat rules catch credentials with a known shape (AKIA..., ghp_..., "
        "sk_live_..., xoxb-..., BEGIN ... PRIVATE KEY); random passwords and tokens have no "
        "shape: flag values assigned to secret-sounding names (password, secret, token, "
        "api_key) in any syntax (=, :, quoted or not) when they are long and random "
        "(Shannon entropy >= 3.0 bits/char, length >= 12).")
    flagged = {k: v for k, v in lookalikes.items() if k in found}
    assert not flagged, (
        f"the scanner flagged {len(flagged)} line(s) that hold no secret: "
        + "; ".join(f"{path}:{line} {text[:60]!r}" for (path, line), text in flagged.items())
        + "\nA scanner that cries wolf gets switched off. Not secrets: the AWS docs' example "
        "key (…EXAMPLE), placeholders (${X}, <...>, {{ }}), references (os.environ[...]), "
        "short or low-entropy values (changeme, aaaa...), and high-entropy values whose name "
        "is not secret-sounding (a checksum, a commit id, a PUBLIC key).")
    assert not twice, (
        f"the scanner reported {twice[:3]} more than once, expected one entry per line "
        "holding a secret (the line is what someone has to fix)")
    unknown = found - set(secrets) - set(lookalikes)
    assert not unknown, f"the scanner reported lines that do not exist: {sorted(unknown)}"



LATIN1_PASSWORD = rand(22)
LATIN1_KEY = "AKIA" + rand(16, string.ascii_uppercase + string.digits)
# A Java .properties file as Properties.load(InputStream) reads it: ISO-8859-1, so its
# accented comments are bytes (0xFC, 0xE9) that are not UTF-8. (Letters only: no byte of
# 0x80-0x9F, which Latin-1 turns into C1 controls.)
LATIN1_FILE = ("config/application.properties", [
    ("# Zugangsdaten f\u00fcr die Produktion - ne pas committer, s'il vous pla\u00eet", None),
    ("spring.datasource.url=jdbc:postgresql://db.intern:5432/shop", None),
    (f"spring.datasource.password={LATIN1_PASSWORD}", "a random password"),
    ("# Schl\u00fcssel f\u00fcr den Export (d\u00e9p\u00f4t S3)", None),
    (f"export.aws.accessKeyId={LATIN1_KEY}", "an AWS access key id"),
])


def test_scanner_reads_text_that_is_not_utf8(learner: Any) -> None:
    """A text file in ISO-8859-1 (a Java .properties file, whose accented comments are
    not UTF-8) holds two secrets after such a comment: a scanner must find both - it is
    text, not binary (no NUL byte), and the credentials in it are plain ASCII."""
    root = learner.tmp_folder()
    rel, lines = LATIN1_FILE
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(text + "\n" for text, _ in lines).encode("latin-1"))
    for folder in (root, path.parent):
        os.chmod(folder, 0o755)
    found = set(scanned(learner, root, f" on a tree holding one text file in ISO-8859-1 "
                                       f"({rel}): expected it read, as text"))
    secrets = {(rel, n): what for n, (_, what) in enumerate(lines, 1) if what}
    missed = [f"{what} at {p}:{n}" for (p, n), what in secrets.items() if (p, n) not in found]
    if missed:
        pytest.fail(
            f"the scanner missed {'; '.join(missed)} - in a text file in ISO-8859-1 (a Java "
            ".properties file: its accented comments are not UTF-8), expected every secret "
            "found: a file that does not decode as UTF-8 is not binary (binary means a NUL byte, "
            "as git and grep -I tell it; gitleaks skips only files whose signature says "
            "archive or executable, truffleHog scans the printable runs of non-UTF-8 data). "
            "Skip it and the secrets in every Latin-1/cp1252 file pass unseen: decode as UTF-8 "
            "and fall back to Latin-1 (every byte one character), or decode with "
            "errors='replace'", pytrace=False)
    extra = sorted(found - set(secrets))
    assert not extra, (
        f"the scanner reported {extra} in {rel}, where only lines "
        f"{sorted(n for _, n in secrets)} hold a secret: the lines of a Latin-1 file are "
        "counted as in any other (one per \\n)")


# Line breaks are "\n" (and "\r\n"), as git, grep and editors count lines. Python's
# str.splitlines() also breaks at a form feed (^L, the page break of GNU and Emacs sources),
# at U+0085 - which is what the byte 0x85, cp1252's ellipsis, becomes when a Windows file
# is decoded as Latin-1 - and at other C1/Unicode separators: every line after one is
# reported one too low. Each file: (path, encoding, [(line, what it holds or None)]).
NEL_PASSWORD = rand(20)
NEL_KEY = "AKIA" + rand(16, string.ascii_uppercase + string.digits)
FF_TOKEN = rand(26)
SJIS_PASSWORD = rand(19)
ENCODED_FILES = [
    ("notes/handover.txt", "cp1252", "a Windows note in cp1252 whose ellipses are the byte "
     "0x85 (U+0085, NEL, once decoded as Latin-1)", [
        ("\u201cZugangsdaten f\u00fcr Produktion\u201d \u2013 bitte nicht committen\u2026", None),
        (f"db_password = {NEL_PASSWORD}", "a random password"),
        ("Export-Schl\u00fcssel\u2026 (S3) \u2026 siehe unten", None),
        (f"aws_access_key_id = {NEL_KEY}", "an AWS access key id"),
    ]),
    ("tools/deploy.py", "utf-8", "a Python file in UTF-8 with a form feed (^L, a page break) "
     "on a line of its own", [
        ("import os", None),
        ("\f", None),
        (f"DEPLOY_TOKEN = \"{FF_TOKEN}\"", "a random token"),
    ]),
    ("legacy/app.ini", "shift_jis", "an .ini file in Shift_JIS (its Japanese comment, half "
     "its bytes, has 0x81, 0x8D, 0x8F, 0x90: neither UTF-8 nor cp1252)", [
        ("; \u672c\u756a\u74b0\u5883\u306e\u30c7\u30fc\u30bf\u30d9\u30fc\u30b9\u63a5"
         "\u7d9a\u30d1\u30b9\u30ef\u30fc\u30c9\u8a2d\u5b9a\u30fc\uff08\u5909\u66f4\u3057"
         "\u306a\u3044\u3053\u3068\uff09", None),
        (f"password={SJIS_PASSWORD}", "a random password"),
    ]),
]


def test_scanner_counts_lines_by_newline_in_any_encoding(learner: Any) -> None:
    """A cp1252 note with 0x85 bytes, a UTF-8 source with a form feed, a Shift_JIS .ini:
    every secret found at its line as git counts it (one per \\n)."""
    root = learner.tmp_folder()
    for rel, encoding, _, lines in ENCODED_FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)
        path.write_bytes("".join(text + "\n" for text, _ in lines).encode(encoding))
    tree = ", ".join(f"{rel} ({e})" for rel, e, _, _ in ENCODED_FILES)
    found = set(scanned(learner, root, f" on a tree of {tree}: expected each read as text"))
    for rel, _, kind, lines in ENCODED_FILES:
        secrets = {n: what for n, (_, what) in enumerate(lines, 1) if what}
        seen = sorted(n for p, n in found if p == rel)
        if seen == sorted(secrets):
            continue
        missed = "; ".join(f"{what} at line {n}" for n, what in secrets.items())
        if not seen:
            pytest.fail(
                f"the scanner reported nothing in {rel}, {kind}; expected {missed}: the file "
                "was skipped - it is text (no NUL byte), in an encoding that is neither UTF-8 "
                "nor cp1252, and its credentials are plain ASCII. A fallback that can fail "
                "(cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined) skips it: fall back "
                "to Latin-1, which decodes every byte, or decode with errors='replace'",
                pytrace=False)
        shifted = len(seen) == len(secrets) and all(
            got > want for got, want in zip(seen, sorted(secrets), strict=True))
        pytest.fail(
            f"the scanner reported lines {seen} of {rel}, {kind}; expected {missed}"
            + (": every line after such a character is reported one line further down per "
               "break - the lines were split with str.splitlines(), which also breaks at a "
               "form feed, at U+0085 (NEL: the byte 0x85 decoded as Latin-1) and at U+2028. "
               "A line ends at \\n, as git, grep and editors count: text.split('\\n')"
               if shifted else ": lines are counted one per \\n, as git and grep count them"),
            pytrace=False)


# ---- configuration ----------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def k8s_secret(folder: Path, version: str, values: dict[str, str]) -> None:
    """Lay out (or rotate) a Secret volume as the kubelet does: files in a timestamped
    folder, a ..data symlink to it swapped atomically, and per-key symlinks through it."""
    target = folder / f"..{version}"
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    target.mkdir()
    for key, value in values.items():
        (target / key).write_text(value)
        os.chmod(target / key, 0o644)
    os.chmod(target, 0o755)
    tmp = folder / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, folder / "..data")       # the atomic swap
    for key in values:
        link = folder / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")
    if old is not None:  # the kubelet removes the version it replaced
        for path in (folder / old).iterdir():
            path.unlink()
        (folder / old).rmdir()


def get_after_rotation(config: Any, name: str) -> str:
    try:
        return str(config.get(name))
    except Exception as exc:  # noqa: BLE001 - the learner's error, explained
        pytest.fail(f"config.get({name!r}) raised {type(exc).__name__}: {exc} after the "
                    "secret was rotated, expected the new value: Kubernetes swaps the ..data "
                    "symlink and REMOVES the old version's folder - open the path you were "
                    "given (NAME_FILE) again, not the file it pointed to at start (realpath)",
                    pytrace=False)


@pytest.fixture
def setup(learner: Any) -> Any:
    module = learner.load("secrets_lab")
    folder = learner.tmp_folder()
    logs = learner.tmp_folder(learner_writes=True)
    log = logs / "config.log"
    log.write_text(EARLIER + "\n")
    os.chmod(log, 0o666)
    return module, folder, log


V1, V2 = rand(20), rand(20)
TOKEN = rand(32)
TOKEN_20, TOKEN_19 = rand(20), rand(19)
EARLIER = "2026-01-01T00:00:00 an earlier line of the service's log"


def base_env(folder: Path) -> dict[str, str]:
    return {"DATABASE_HOST": "db.internal", "DB_PASSWORD_FILE": str(folder / "db_password"),
            "API_TOKEN": TOKEN}


def make_config(module: Any, env: dict[str, str], clock: Clock, log: Path,
                what: str = "a complete configuration", **kw: Any) -> Any:
    try:
        return module.Config(env, clock, str(log), **kw)
    except Exception as exc:  # noqa: BLE001 - the learner's error, reported
        pytest.fail(f"{what}: Config(env, clock, log_path) raised {type(exc).__name__}: {exc}, "
                    f"expected it to start (variables {sorted(env)}): read NAME or NAME_FILE "
                    "for each secret", pytrace=False)


def raises_config_error(module: Any, env: dict[str, str], log: Path, what: str) -> str:
    try:
        module.Config(env, Clock(), str(log))
    except Exception as exc:  # noqa: BLE001 - its class is checked here
        if type(exc).__name__ != "ConfigError":
            pytest.fail(f"{what}: Config raised {type(exc).__name__}: {exc}, expected "
                        "ConfigError (fail fast, with a message naming the variable)",
                        pytrace=False)
        return str(exc)
    pytest.fail(f"{what}: Config started anyway, expected ConfigError\nFail fast: a "
                "configuration that is missing, unreadable, ambiguous or invalid stops the "
                "start, with a message naming the variable, instead of failing (or "
                "guessing) later on a request.", pytrace=False)


def test_config_from_env_and_files_fails_fast(setup: Any) -> None:
    module, folder, log = setup
    if not hasattr(module, "ConfigError"):
        pytest.fail("secrets_lab.py defines no ConfigError exception", pytrace=False)
    k8s_secret(folder, "2026_01_01", {"db_password": V1 + "\n", "empty": "\n",
                                      "token19": TOKEN_19 + "\n", "token20": TOKEN_20 + "\n"})
    config = make_config(module, base_env(folder), Clock(), log)
    got = config.get("DB_PASSWORD")
    assert got == V1, (
        f"DB_PASSWORD from DB_PASSWORD_FILE is {got!r}, expected {V1!r}"
        + ("\nSecret files end with a newline: strip it (rstrip('\\n')), or the password "
           "has a stray character." if got == V1 + "\n" else ""))
    assert config.get("API_TOKEN") == TOKEN, "API_TOKEN from the environment"
    assert config.get("DATABASE_HOST") == "db.internal", "DATABASE_HOST from the environment"
    assert config.get("LOG_LEVEL") == "INFO", "LOG_LEVEL defaults to INFO"
    swapped = make_config(module, {"DATABASE_HOST": "db.internal", "DB_PASSWORD": V2,
                                   "API_TOKEN_FILE": str(folder / "token20")}, Clock(), log,
                          "DB_PASSWORD from the environment and API_TOKEN_FILE holding exactly "
                          "20 characters (the minimum) and a newline")
    got = swapped.get("API_TOKEN")
    assert got == TOKEN_20, (
        f"API_TOKEN from API_TOKEN_FILE (20 characters and a newline, the minimum) is "
        f"{got!r}, expected {TOKEN_20!r}: every secret may come from NAME or NAME_FILE")
    assert swapped.get("DB_PASSWORD") == V2, "DB_PASSWORD from the environment"
    messages = []
    cases = [
        ({k: v for k, v in base_env(folder).items() if k != "DATABASE_HOST"},
         "DATABASE_HOST missing"),
        ({k: v for k, v in base_env(folder).items() if k != "DB_PASSWORD_FILE"},
         "neither DB_PASSWORD nor DB_PASSWORD_FILE"),
        ({**base_env(folder), "DB_PASSWORD": V2},
         "both DB_PASSWORD and DB_PASSWORD_FILE set (which one wins is a guess)"),
        ({**base_env(folder), "DB_PASSWORD_FILE": str(folder / "missing")},
         "DB_PASSWORD_FILE names no file"),
        ({**base_env(folder), "API_TOKEN": "short-" + V2[:8]}, "API_TOKEN shorter than 20"),
        ({**base_env(folder), "API_TOKEN": TOKEN_19}, "API_TOKEN of 19 characters"),
        ({**base_env(folder), "DB_PASSWORD_FILE": str(folder / "empty")},
         "DB_PASSWORD_FILE holds only a newline (an empty password)"),
        ({**base_env(folder), "API_TOKEN": ""}, "API_TOKEN set but empty"),
        ({**base_env(folder), "DB_PASSWORD": ""},
         "both DB_PASSWORD (set, empty) and DB_PASSWORD_FILE set"),
        ({k: v for k, v in base_env(folder).items() if k != "API_TOKEN"}
         | {"API_TOKEN_FILE": str(folder / "token19")},
         "API_TOKEN_FILE holding 19 characters and a newline"),
    ]
    for env, what in cases:
        messages.append((what, raises_config_error(module, env, log, what)))
    for what, message in messages:
        for secret in (V1, V2, V2[:8], TOKEN):
            assert secret not in message, (
                f"the ConfigError for '{what}' shows a secret value: {message!r}\nName the "
                "variable and the problem, never the value: error messages end up in logs "
                "and crash reports.")


PASSPHRASE = f" {rand(8)} {rand(10)} "  # a passphrase that begins and ends with a space


def test_a_secret_file_loses_its_newline_only(setup: Any) -> None:
    module, folder, log = setup
    k8s_secret(folder, "2026_01_01", {"db_password": PASSPHRASE + "\n"})
    config = make_config(module, base_env(folder), Clock(), log,
                         "DB_PASSWORD_FILE holding a passphrase with a space at each end")
    got = config.get("DB_PASSWORD")
    assert got == PASSPHRASE, (
        f"DB_PASSWORD from a file holding {len(PASSPHRASE)} characters and a newline is "
        f"{len(got)} characters ({got!r}), expected {PASSPHRASE!r}: only the trailing newline "
        "is the file's - spaces at either end are part of the secret (a passphrase may "
        "begin or end with one), and a password trimmed by strip() or rstrip() fails to "
        "log in; remove the newline alone (rstrip('\n') or removesuffix)")


def test_two_configs_keep_their_own_secrets(setup: Any) -> None:
    """A reload builds a new Config while the old one still serves (and a test builds
    several): each reads its own variables, caches its own values."""
    module, folder, log = setup
    k8s_secret(folder, "2026_01_01", {"db_password": V1 + "\n", "token20": TOKEN_20 + "\n"})
    clock = Clock()
    old = make_config(module, base_env(folder), clock, log, "the serving Config")
    new = make_config(module, {"DATABASE_HOST": "db.internal", "DB_PASSWORD": V2,
                               "API_TOKEN_FILE": str(folder / "token20")}, clock, log,
                      "a second Config, built beside the first (a reload)")
    fresh = rand(20)
    steps = [("before any re-read", None), ("61 s later, the first's file rotated", fresh)]
    for when, rotated in steps:
        if rotated:
            k8s_secret(folder, "2026_02_01", {"db_password": rotated + "\n",
                                              "token20": TOKEN_20 + "\n"})
            clock.now += 61
        want = {("the serving Config", "DB_PASSWORD"): rotated or V1,
                ("the serving Config", "API_TOKEN"): TOKEN,
                ("the second Config", "DB_PASSWORD"): V2,
                ("the second Config", "API_TOKEN"): TOKEN_20}
        for (who, name), value in want.items():
            got = get_after_rotation(old if who == "the serving Config" else new, name)
            theirs = next(v for (w, n), v in want.items() if n == name and w != who)
            assert got != theirs or got == value, (
                f"{when}, {who}'s get({name!r}) returned the other Config's value, expected "
                "its own: the cache of secrets is shared between instances (a module "
                "global, or a dict at class level: one dict for every Config) - make it in "
                "__init__ (self._cache = {}), so each Config keeps its own variables' values")
            assert got == value, (
                f"{when}, {who}'s get({name!r}) returned a {len(got)}-character value that "
                "is not its own, expected the value of its own variables")


def rewrite_in_place(folder: Path, version: str, value: str) -> None:
    """The same file (inode) given new content, as `echo new > file` does."""
    with open(folder / "db_password", "r+", encoding="utf-8") as file:
        file.truncate(0)
        file.write(value)


def replace_by_rename(folder: Path, version: str, value: str) -> None:
    """A new file written beside the old one and renamed over it: readers see the old or the
    new secret, never half of one. The path now names a new file; the old one lives on,
    unlinked, for whoever still holds it open."""
    current = Path(os.path.realpath(folder / "db_password"))
    fresh = current.with_name(".db_password.new")
    fresh.write_text(value)
    os.chmod(fresh, 0o644)
    os.replace(fresh, current)


def kubelet_swap(folder: Path, version: str, value: str) -> None:
    k8s_secret(folder, version, {"db_password": value})


# Each way a secret file is rotated, in this order; which of them a Config picks up tells
# how it reads the file (see stale_because).
IN_PLACE, RENAMED, KUBELET = (
    "rewritten in place (the same file, new content)",
    "replaced by rename (a new file written beside it and renamed over it, the atomic way "
    "to rotate)",
    "rotated by the kubelet (a new version folder, the ..data symlink swapped, the old "
    "folder removed)")
ROTATIONS = ((IN_PLACE, rewrite_in_place), (RENAMED, replace_by_rename),
             (KUBELET, kubelet_swap))


def stale_because(picked_up: dict[str, bool]) -> str:
    """Why a Config returned an old secret after a rotation, from which rotations it picked
    up: each way of reading misses rotations of its own."""
    if picked_up[IN_PLACE] and not picked_up[RENAMED]:
        return ("the same file rewritten in place was picked up, yet not a new file renamed "
                "over it: the re-read goes through a file descriptor kept open (seek(0) and "
                "read), which still points at the OLD file - a rename gives the path a new "
                "file, and the old one lives on, unlinked, for whoever holds it open. Reopen "
                "the path on each re-read (Path(file).read_text()); Kubernetes rotates by "
                "swapping a ..data symlink, so a kept descriptor never sees a new secret")
    if not picked_up[IN_PLACE] and (picked_up[RENAMED] or picked_up[KUBELET]):
        return ("a new file renamed over it was picked up, yet not the same file rewritten "
                "in place: the secret is re-read only when the path names another file "
                "(another inode) - re-read the content whenever the TTL has passed, "
                "whatever file it is")
    if not picked_up[IN_PLACE]:
        return ("no rotation was picked up, however it was done: re-read the file when the "
                "cached value is older than the TTL (by the clock Config was given, not "
                "time.time()), by path - a value read once at start keeps the old secret "
                "until a restart")
    return ("the kubelet's swap of the ..data symlink was missed: open the path you were "
            "given (NAME_FILE) on each re-read, not the file it led to at start")


def test_rotation_is_picked_up_after_the_ttl(setup: Any) -> None:
    module, folder, log = setup
    k8s_secret(folder, "2026_01_01", {"db_password": V1 + "\n"})
    clock = Clock()
    config = make_config(module, base_env(folder), clock, log, ttl=60.0)
    assert config.get("DB_PASSWORD") == V1, "DB_PASSWORD before the rotation"
    values, got, picked_up = [V1], {}, {}
    for month, (how, rotate) in enumerate(ROTATIONS, 2):
        values.append(rand(20))
        rotate(folder, f"2026_{month:02}_01", values[-1] + "\n")
        clock.now += 61
        got[how] = get_after_rotation(config, "DB_PASSWORD")
        picked_up[how] = got[how] == values[-1]
    for how, value in got.items():
        assert picked_up[how], (
            f"61 s (ttl 60) after the secret file was {how}, DB_PASSWORD is still "
            + (f"an old value, expected the new one: {stale_because(picked_up)}"
               if value in values else f"{value!r}, expected the new one: read the file's "
               "whole content, its trailing newline stripped"))
    clock.now += 500
    assert get_after_rotation(config, "DB_PASSWORD") == values[-1], "DB_PASSWORD later on"


def test_each_secret_ages_from_its_own_read(setup: Any) -> None:
    """A busy service calls get() far more often than the TTL, for each secret in turn: each
    value is read again once IT is older than the TTL, counted from when it was read - not
    from the last get() (a sliding TTL never expires under load), and not from a time
    shared by every secret (re-reading one must not make the other look fresh)."""
    module, folder, log = setup
    k8s_secret(folder, "2026_01_01", {"db_password": V1 + "\n", "api_token": TOKEN + "\n"})
    env = {"DATABASE_HOST": "db.internal", "DB_PASSWORD_FILE": str(folder / "db_password"),
           "API_TOKEN_FILE": str(folder / "api_token")}
    clock = Clock()
    config = make_config(module, env, clock, log, "both secrets from files", ttl=60.0)
    clock.now += 30  # within the TTL: the values read at start, whatever the files hold
    for name, value in (("DB_PASSWORD", V1), ("API_TOKEN", TOKEN)):
        got = get_after_rotation(config, name)
        assert got == value, f"30 s after start (ttl 60), get({name!r}) is its value at start"
    new_password, new_token = rand(20), rand(32)
    k8s_secret(folder, "2026_02_01", {"db_password": new_password + "\n",
                                      "api_token": new_token + "\n"})
    clock.now += 31  # 61 s after both were read, 31 s after the last get()
    got = get_after_rotation(config, "API_TOKEN")
    assert got == new_token, (
        f"61 s after API_TOKEN was read (ttl 60) and its file rotated, get('API_TOKEN') "
        f"returned {'the old value' if got == TOKEN else repr(got)}, expected the new one; "
        "the last get() was 31 s before: the TTL was counted from the last get(), not from "
        "the read - a value's age is the time since it was READ (store the clock at the "
        "read, never refresh it on a cache hit), or a service that asks more often than "
        "the TTL never sees a rotation")
    got = get_after_rotation(config, "DB_PASSWORD")
    assert got == new_password, (
        f"61 s after DB_PASSWORD was read (ttl 60) and its file rotated, right after "
        f"get('API_TOKEN') re-read its own file, get('DB_PASSWORD') returned "
        f"{'the old value' if got == V1 else repr(got)}, expected the new one: one "
        "load time is kept for every secret, and re-reading API_TOKEN reset it - each "
        "secret's age is its own (keep the read time beside each value, or re-read every "
        "stale secret together)")


# A rotation that leaves a bad secret behind: (variable, its file's new content, what it is).
BAD_ROTATIONS = (
    ("API_TOKEN", TOKEN_19 + "\n", "an API_TOKEN of 19 characters"),
    ("DB_PASSWORD", "", "an empty file (caught between `open(path, 'w')`'s truncation and "
     "the write)"),
    ("DB_PASSWORD", "\n", "a file holding only a newline"),
)


def test_a_rotated_secret_is_validated_again(setup: Any) -> None:
    module, folder, log = setup
    k8s_secret(folder, "2026_01_01", {"db_password": V1 + "\n", "api_token": TOKEN + "\n"})
    env = {"DATABASE_HOST": "db.internal", "DB_PASSWORD_FILE": str(folder / "db_password"),
           "API_TOKEN_FILE": str(folder / "api_token")}
    clock = Clock()
    config = make_config(module, env, clock, log, "both secrets from files", ttl=60.0)
    good = {"DB_PASSWORD": V1, "API_TOKEN": TOKEN}
    for month, (name, content, what) in enumerate(BAD_ROTATIONS, 2):
        k8s_secret(folder, f"2026_{month:02}_01",
                   {"db_password": good["DB_PASSWORD"] + "\n", "api_token":
                    good["API_TOKEN"] + "\n", name.lower(): content})
        clock.now += 61
        try:
            got = config.get(name)
        except Exception as exc:  # noqa: BLE001 - its class is checked here
            assert type(exc).__name__ == "ConfigError", (
                f"61 s (ttl 60) after {name}_FILE was rotated to {what}, get({name!r}) raised "
                f"{type(exc).__name__}: {exc}, expected ConfigError (the same error as at "
                "start) or the last valid value")
            continue
        assert got == good[name], (
            f"61 s (ttl 60) after {name}_FILE was rotated to {what}, get({name!r}) returned "
            f"a {len(got)}-character value that is not the last valid one, expected "
            "ConfigError (or the last valid value kept): a rotated secret is new input and "
            "must pass the same checks as the first one (not empty, API_TOKEN at least 20 "
            "characters) - validate every value read, at start AND on each re-read, or the "
            "app is handed an empty or truncated credential at run time")
    fresh = rand(24)
    k8s_secret(folder, "2026_09_01", {"db_password": fresh + "\n", "api_token": TOKEN + "\n"})
    clock.now += 61
    got = get_after_rotation(config, "DB_PASSWORD")
    assert got == fresh, (
        f"after a bad rotation, DB_PASSWORD_FILE was rotated again to a valid value and 61 s "
        f"later get('DB_PASSWORD') returned {'an old value' if got in (V1, '') else repr(got)}"
        ", expected the new one: a rejected value must not stick")


def test_no_secret_in_logs_or_repr(setup: Any) -> None:
    module, folder, log = setup
    k8s_secret(folder, "2026_01_01", {"db_password": V1 + "\n"})
    clock = Clock()
    config = make_config(module, base_env(folder), clock, log, ttl=10.0)
    config.get("DB_PASSWORD")
    k8s_secret(folder, "2026_02_01", {"db_password": V2 + "\n"})
    clock.now += 11
    got = get_after_rotation(config, "DB_PASSWORD")
    assert got == V2, (
        f"with ttl=10, 11 s after the secret file was rotated DB_PASSWORD is still "
        f"{'the old value' if got == V1 else repr(got)}, expected the new one: use the ttl "
        "Config was given (here 10 s), not a fixed 60")
    shown = {"repr(config)": repr(config), "str(config)": str(config),
             "the log file": log.read_text(errors="replace")}
    for where, text in shown.items():
        for name, secret in (("DB_PASSWORD v1", V1), ("DB_PASSWORD v2", V2),
                             ("API_TOKEN", TOKEN)):
            assert secret not in text, (
                f"{name} appears in {where}: {text[:200]!r}\nNever show a secret: give "
                "Config a __repr__ that masks secret values (the default repr of a "
                "dataclass or a dict of the environment prints them), and log that.")
    for where, text in shown.items():
        for name, secret in (("DB_PASSWORD v1", V1), ("DB_PASSWORD v2", V2),
                             ("API_TOKEN", TOKEN)):
            parts = {secret[i:i + 4] for i in range(len(secret) - 3)}
            seen = sorted(p for p in parts if p in text)
            assert not seen, (
                f"part of {name} ({seen[0]!r}, 4 of its characters) appears in {where}: "
                f"{text[:200]!r}\nA mask that keeps part of the value (the first or last "
                "characters) still gives part of the secret away: show '***' only")
    logged = shown["the log file"]
    assert logged.startswith(EARLIER), (
        f"the log file no longer starts with the line it held before Config started "
        f"({EARLIER!r}); it now starts {logged[:80]!r}: append to log_path (mode 'a'), "
        "never rewrite it - a service's log is history")
    assert "db.internal" in logged[len(EARLIER):], (
        f"the log file holds no configuration (DATABASE_HOST 'db.internal' is not in "
        f"{logged[len(EARLIER):][:200]!r}): log the configuration at start, secrets masked "
        "- an operator needs to see what the service runs with")
    assert "db.internal" in shown["str(config)"], (
        "str(config) does not show DATABASE_HOST: mask the secrets, keep the rest visible "
        "(it is what an operator needs to see)")
