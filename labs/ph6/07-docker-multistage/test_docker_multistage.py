"""ph6.7 - a multi-stage Dockerfile for the C echo server of ph0.7.

Statically, with the field's own tools: the learner's Dockerfile is parsed with
dockerfile-parse and its stages checked (pinned bases, a build stage and a slim runtime stage
that copies the binary from it, a non-root USER, a HEALTHCHECK, an exec-form entrypoint); the
.dockerignore is applied to a build context with docker-py's own implementation of the
.dockerignore rules, and what would be sent to the daemon is checked.

Where a Docker engine answers ($DOCKER_HOST; CI's docker stage starts one), the image is also
built and run: the container echoes over a published port, runs as a non-root uid, its own
HEALTHCHECK command succeeds inside it, `docker stop` ends it with exit code 0, and the runtime
image is smaller than the build stage. CI has no registry: with
LABRUNNER_DOCKER_STANDINS="builder=<image> runtime=<image>" the parsed Dockerfile's base images
are replaced (dockerfile-parse's parent_images) by local stand-ins; without it, the pinned
bases are pulled as written."""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import shlex
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from dockerfile_parse import DockerfileParser

from labrunner.catalog import load_catalog
from labrunner.testing import wait_until

APP = Path(__file__).parent / "app"
# The server this image ships is ph0.7's reference echo server: one source, copied into the
# build context at test time rather than kept twice in the repository. Found through the
# catalog, not next to this file: grading runs these tests from a private copy of this lab
# alone, where a path into another lab's folder leads nowhere.
SERVER_C = load_catalog().lab("ph0.7").solution_dir / "server.c"
PORT = 8080
# What a careless build context holds besides the sources: (path, content).
JUNK = [(".git/HEAD", "ref: refs/heads/main\n"), (".git/config", "[core]\n"),
        ("bin/server", "a stale binary built on the host\n"),
        ("build/server.o", "object file\n"), ("src/server.o", "an in-tree object file\n"),
        (".env", "DATABASE_PASSWORD=hunter2\n"),
        ("debug.log", "x" * 4096)]
MUST_SEND = ["Makefile", "src/server.c"]
MUST_NOT_SEND = [".git/HEAD", "bin/server", "build/server.o", "src/server.o", ".env"]
COMPILERS = ("gcc", "clang", "buildpack-deps")
KNOWN_USERS = {"nobody", "nonroot", "daemon", "www-data"}   # in the bases already
# A secret known by its name: a part of it, or one word of it (split at _ and -).
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|API_?KEY|PRIVATE_KEY|"
                         r"CREDENTIAL", re.I)
SECRET_WORDS = {"PASS", "PW", "PWD", "KEY", "SK", "PAT", "CREDS", "SALT", "DSN"}
NOT_SECRET_WORDS = {"PUBLIC", "PUB", "FILE", "PATH", "DIR", "TTL", "TIMEOUT", "LENGTH", "LEN",
                    "ID", "GPG", "PGP", "FINGERPRINT"}   # GPG_KEY: a public key's fingerprint
# A secret known by its value, whatever the variable is called: what each format is.
SECRET_VALUES = [
    (re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:]*:[^\s/@]+@", re.I),
     "a URL with a password in it (scheme://user:password@host)"),
    (re.compile(r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{10,}"), "a Stripe secret key (sk_live_...)"),
    (re.compile(r"\b(?:gh[pousr]_[0-9A-Za-z]{20,}|github_pat_\w{20,})"),
     "a GitHub token (ghp_..., github_pat_...)"),
    (re.compile(r"\bglpat-[\w-]{20,}"), "a GitLab token (glpat-...)"),
    (re.compile(r"\bxox[abprs]-[\w-]{10,}"), "a Slack token (xoxb-...)"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id (AKIA...)"),
    (re.compile(r"\bAIza[\w-]{35}"), "a Google API key (AIza...)"),
    (re.compile(r"\bnpm_[0-9A-Za-z]{36}"), "an npm token (npm_...)"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"), "a PEM private key"),
    (re.compile(r"\beyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]{10,}"), "a JSON Web Token (eyJ...)"),
]


@dataclass
class Stage:
    index: int
    image: str
    name: str | None
    lines: list[dict[str, Any]] = field(default_factory=list)
    written: str = ""            # the image as the FROM line spells it (ARGs unexpanded)
    platform: str = ""           # its FROM --platform=..., '' when the target platform

    def all(self, instruction: str) -> list[dict[str, Any]]:
        return [i for i in self.lines if i["instruction"] == instruction]


def parse(path: Path) -> tuple[DockerfileParser, list[Stage]]:
    dfp = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    # The base images as Docker reads them: an ARG before the first FROM is substituted with
    # its default (ARG GCC_VERSION=13.2.0 ... FROM gcc:${GCC_VERSION}), as dockerfile-parse's
    # parent_images does.
    images = iter(dfp.parent_images)
    stages: list[Stage] = []
    for ins in dfp.structure:
        if ins["instruction"] == "FROM":
            words = [w for w in ins["value"].split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            platform = next((w.split("=", 1)[1] for w in ins["value"].split()
                             if w.startswith("--platform=")), "")
            if platform.replace("{", "").replace("}", "") == "$TARGETPLATFORM":
                platform = ""
            stages.append(Stage(len(stages), next(images, words[0] if words else ""), name,
                                written=words[0] if words else "", platform=platform))
        elif stages:
            stages[-1].lines.append(ins)
    if not stages:
        pytest.fail("the Dockerfile has no FROM: it does not start from any image")
    return dfp, stages


def copy_from(ins: dict[str, Any]) -> str | None:
    for word in cast(str, ins["value"]).split():
        if word.startswith("--from="):
            return word.split("=", 1)[1]
    return None


def build_stages(stages: list[Stage]) -> list[Stage]:
    final = stages[-1]
    sources = {copy_from(i) for i in final.all("COPY")} - {None}
    return [s for s in stages[:-1] if s.name in sources or str(s.index) in sources]


def pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    repo, _, tag = image.rpartition(":")
    if not repo or "/" in tag:          # no tag at all (the colon was a registry port)
        return False
    return tag != "latest" and bool(re.search(r"\d+\.\d+|\d{8}", tag))


def exec_args(value: str) -> list[str] | None:
    """The argv of an exec-form (JSON array) value, None for the shell form."""
    try:
        parsed = json.loads(value.strip())
    except ValueError:
        return None
    return [str(w) for w in parsed] if isinstance(parsed, list) else None


def copy_parts(ins: dict[str, Any]) -> tuple[str | None, list[str], str]:
    """(--from stage or None, sources, destination) of a COPY/ADD, shell or JSON form."""
    value = ins["value"].strip()
    words = [w for w in value.split() if not w.startswith("--")]
    flags = [w for w in value.split() if w.startswith("--")]
    rest = value[len(" ".join(flags)):].strip() if flags and value.startswith("--") else value
    listed = exec_args(rest)
    if listed:
        words = listed
    src = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return src, words[:-1], words[-1] if words else ""


def workdirs(stage: Stage) -> list[str]:
    """The working directory in force at each of the stage's instructions."""
    cwd, out = "/", []
    for ins in stage.lines:
        if ins["instruction"] == "WORKDIR":
            cwd = posixpath.normpath(posixpath.join(cwd, ins["value"].strip()))
        out.append(cwd)
    return out


def runs(stage: Stage) -> str:
    return "\n".join(i["value"] for i in stage.all("RUN"))


def base_name(image: str) -> tuple[str, str]:
    """(repository's last part, tag) of an image reference."""
    ref = image.split("@")[0]
    repo, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    return repo.rsplit("/", 1)[-1], tag


def stage_by_ref(stages: list[Stage], ref: str) -> Stage | None:
    return next((s for s in stages if s.name == ref or str(s.index) == ref), None)


def binary_made(builder: Stage) -> str:
    """Where the build stage's `make release` leaves bin/server."""
    cwds = workdirs(builder)
    at = next((cwds[k] for k, i in enumerate(builder.lines)
               if i["instruction"] == "RUN" and "make" in i["value"]), cwds[-1] if cwds else "/")
    return posixpath.join(at, "bin/server")


def shipped_binary(stages: list[Stage]) -> list[tuple[str, str]]:
    """(source in the build stage, path in the runtime image) of each COPY --from that
    carries the server binary, following directory copies."""
    final, out = stages[-1], []
    cwds = workdirs(final)
    for k, ins in enumerate(final.lines):
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        ref, sources, dest = copy_parts(ins)
        builder = stage_by_ref(stages, ref) if ref else None
        if builder is None:
            continue
        made = binary_made(builder)
        dest_abs = posixpath.join(cwds[k], dest)
        for src in sources:
            src_abs = posixpath.normpath(posixpath.join(workdirs(builder)[-1] if
                                                        builder.lines else "/", src))
            if src_abs == made or src_abs in runs(builder):
                into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
                out.append((src_abs, posixpath.normpath(
                    posixpath.join(dest_abs, posixpath.basename(src_abs)) if into_dir
                    else dest_abs)))
            elif made.startswith(src_abs.rstrip("/") + "/"):
                out.append((src_abs, posixpath.normpath(posixpath.join(
                    dest_abs, posixpath.relpath(made, src_abs)))))
    return out


def not_last(stages: list[Stage]) -> str:
    """'' unless a stage before the last copies from another stage (the runtime stage, put
    before a test or debug stage): its number and name."""
    shipping = [s for s in stages[:-1]
                if any(copy_from(i) is not None for i in s.all("COPY") + s.all("ADD"))]
    if not shipping:
        return ""
    s = shipping[-1]
    return f"{s.index}, FROM {s.image}" + (f" AS {s.name}" if s.name else "")


def final_image_is(stages: list[Stage]) -> str:
    """What the last stage's image holds, by the stage it starts from."""
    final = stages[-1]
    parent = stage_by_ref(stages, final.image)
    if parent is None:
        return f"the image {final.image} and what this stage adds to it"
    if parent in build_stages(stages) or any(
            copy_from(i) == final.image for s in stages for i in s.all("COPY")):
        return (f"the build stage {final.image} again: the compiler, the sources, running as "
                "root")
    return f"stage {final.image} plus what this stage adds (its USER, its tools)"


@pytest.fixture
def dockerfile(learner: Any) -> tuple[DockerfileParser, list[Stage]]:
    return parse(learner.path("Dockerfile"))


def test_base_images_are_pinned(dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    names = {s.name for s in stages if s.name}
    for s in stages:
        if s.image in names or s.image == "scratch":
            continue
        spelt = s.image if s.written in ("", s.image) else \
            f"{s.written} (that is {s.image}, by its ARG's default)"
        assert pinned(s.image), (
            f"FROM {spelt} is not pinned: expected an exact version tag (gcc:13.2.0, "
            "debian:12.8-slim) or a digest (image:tag@sha256:...). 'latest', no tag, a bare "
            "major or a codename (gcc:13, debian:bookworm-slim) move under you: the same "
            "Dockerfile builds a different image next month")


def test_a_build_stage_and_a_slim_runtime_stage(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2, (
        f"the Dockerfile has {len(stages)} stage: expected a build stage with the compiler and "
        "a runtime stage that copies only the binary (COPY --from=builder): a single stage "
        "ships gcc, make and the sources in the image")
    final = stages[-1]
    for ins in final.all("COPY") + final.all("ADD"):
        ref = copy_from(ins)
        if ref is not None and stage_by_ref(stages, ref) is None:
            pytest.fail(
                f"{ins['instruction']} --from={ref} names no stage of this Dockerfile (stages: "
                f"{[s.name or s.index for s in stages[:-1]]}): Docker takes it for an image "
                f"called {ref!r} and tries to pull it. Name the build stage as you copy from "
                "it: FROM gcc:<version> AS builder ... COPY --from=builder")
    builders = build_stages(stages)
    shipping = not_last(stages)
    assert builders or not shipping, (
        f"the stage that ships the binary (stage {shipping}) is not the last one: `docker "
        "build` without --target builds the LAST stage into the image, and here that is "
        f"FROM {final.image}, which copies no binary of its own ({final_image_is(stages)}). "
        "Put the runtime stage last: a test or debug stage goes before it (and is built with "
        "--target when wanted)")
    assert builders, (
        f"the final stage (FROM {final.image}) copies nothing from an earlier stage: expected "
        "COPY --from=<build stage> /src/bin/server ... so the binary is built in one stage and "
        "shipped in the other")
    assert all(b.name for b in builders), (
        "the build stage has no name: write FROM ... AS builder and COPY --from=builder "
        "(a stage index breaks when a stage is added, and `docker build --target` needs a name)")
    base = final.image.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
    assert base not in COMPILERS and all(final.image != b.image for b in builders), (
        f"the runtime stage starts FROM {final.image}, a compiler image like the build stage "
        f"({builders[0].image}): the runtime needs only libc; start it from a slim base such "
        "as debian:12.8-slim")
    repo, tag = base_name(final.image)
    static = "-static" in runs(builders[0]) or "-static" in (APP / "Makefile").read_text()
    assert repo != "alpine" and "alpine" not in tag, (
        f"the runtime stage starts FROM {final.image}, a musl image, while the build stage "
        f"({builders[0].image}) links the server against glibc: the binary does not start "
        "there ('exec ./server: no such file or directory', its loader is missing). Ship it "
        "on the libc it was built for: debian:12.8-slim")
    shellless = next((w for w in SHELLLESS if w in final.image.split("@")[0].lower()), None)
    needs_shell = [f"RUN {i['value'][:50]}" for i in final.all("RUN")] + [
        f"HEALTHCHECK {' '.join(health_argv(i['value'])[0])[:60]}"
        for i in final.all("HEALTHCHECK")[-1:]
        if health_argv(i["value"])[1] or posixpath.basename(
            (health_argv(i["value"])[0] or [""])[0]) in SHELLS]
    assert not (shellless and needs_shell), (
        f"the runtime stage starts FROM {final.image}, a {shellless.strip('/.')} image: it "
        "holds the C library and the program, but no shell, no bash and no useradd (a "
        "debug/-dev variant at most a busybox sh), and this stage needs them for "
        f"{needs_shell}: `docker build` fails at its first RUN ('exec: \"/bin/sh\": no such "
        "file or directory'), and a HEALTHCHECK that runs bash fails on a healthy server. "
        "Ship it on a slim Debian, which has them: debian:12.8-slim")
    assert static or (final.image != "scratch" and "static" not in repo + tag), (
        f"the runtime stage starts FROM {final.image}, which has no C library, and the "
        "server is linked dynamically: it cannot start there. Use debian:12.8-slim")
    assert repo != "debian" or "slim" in tag, (
        f"the runtime stage starts FROM {final.image}, the full Debian image: it only needs "
        "libc, so ship it on the slim variant (debian:12.8-slim), tens of MB smaller and "
        "with fewer packages to patch")


# Runtime bases with a C library and nothing to run commands with (no /bin/sh, no bash, no
# useradd): Google's distroless and Chainguard's images, by a word of their path.
SHELLLESS = ("distroless", "chainguard")


# The C library each glibc-based release ships, by codename, with Debian's and Ubuntu's
# version numbers for them. A binary asks for the versioned glibc symbols it was linked
# against (GLIBC_2.34 ...): it runs on that glibc or a newer one, not on an older one.
GLIBC = {"buster": "2.28", "bullseye": "2.31", "bookworm": "2.36", "trixie": "2.41",
         "focal": "2.31", "jammy": "2.35", "noble": "2.39"}
RELEASES = {("debian", "10"): "buster", ("debian", "11"): "bullseye",
            ("debian", "12"): "bookworm", ("debian", "13"): "trixie",
            ("ubuntu", "20.04"): "focal", ("ubuntu", "22.04"): "jammy",
            ("ubuntu", "24.04"): "noble"}
# Images whose tag does not name their release: the official gcc image of gcc 13 has been
# built on Debian bookworm since 13.1.0 (docker-library/gcc, 13/Dockerfile: FROM
# buildpack-deps:bookworm). Any other untold base is left alone: the tag cannot tell.
GCC_DEFAULT_RELEASE = {"13": "bookworm"}


def release_of(stages: list[Stage], stage: Stage) -> str | None:
    """The Debian/Ubuntu release a stage's base is built on, when its tag says so (an earlier
    stage as base: that stage's); None when the Dockerfile alone cannot tell."""
    seen = set()
    while (parent := stage_by_ref(stages, stage.image)) is not None and parent.index not in seen:
        seen.add(parent.index)
        stage = parent
    repo, tag = base_name(stage.image)
    words = re.split(r"[-.]", tag)
    named = next((w for w in words if w in GLIBC), None)
    if named:
        return named
    number = tag.split("-")[0]
    if repo == "debian":
        return RELEASES.get((repo, number.split(".")[0]))
    if repo == "ubuntu":
        return RELEASES.get((repo, number))
    if repo == "gcc" and re.fullmatch(r"\d+(\.\d+)*", number):
        return GCC_DEFAULT_RELEASE.get(number.split(".")[0])
    return None


def test_the_runtime_has_the_libc_the_binary_was_built_against(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    """A dynamically linked binary needs the glibc it was linked against or a newer one.
    What the Dockerfile alone tells: the release each base's tag names (stand-in bases in
    CI cannot show it by running the image)."""
    _, stages = dockerfile
    final = stages[-1]
    runtime = release_of(stages, final)
    if runtime is None:
        return
    for builder in build_stages(stages):
        built = release_of(stages, builder)
        if built is None:
            continue
        have, need = GLIBC[runtime], GLIBC[built]
        assert tuple(map(int, have.split("."))) >= tuple(map(int, need.split("."))), (
            f"the build stage (FROM {builder.image}) is {built}, glibc {need}; the runtime "
            f"stage (FROM {final.image}) is {runtime}, glibc {have}: the server is linked "
            f"against glibc {need}, and a binary is only sure to run on the glibc it was linked "
            "against or a newer one: on an older one the loader refuses it as soon as it "
            "needs a newer symbol ('version `GLIBC_2.34' not found'). Ship it on the "
            "builder's release (or a newer one): debian:12.8-slim for gcc:13.2.0 (bookworm)")


def test_runs_as_a_non_root_user(dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    users = stages[-1].all("USER")
    assert users, ("the runtime stage has no USER: the server would run as root, so a bug in "
                   "it is a root shell in the container. Create a system user (useradd -r) "
                   "and switch to it with USER")
    who = users[-1]["value"].strip()
    assert who.split(":")[0] not in ("root", "0"), (
        f"the runtime stage's last USER is {who!r}, which is root: switch to an unprivileged "
        "user after the steps that need root")
    switched = False
    for ins in stages[-1].lines:
        if ins["instruction"] == "USER":
            switched = ins["value"].strip().split(":")[0] not in ("root", "0")
        elif switched and ins["instruction"] == "RUN" and re.search(
                r"\b(useradd|adduser|groupadd|addgroup|apt-get|apt|apk|chown)\b", ins["value"]):
            pytest.fail(
                f"RUN {ins['value'][:70]} comes after USER switched to an unprivileged user: it "
                "runs as that user and fails (permission denied), so the image does not "
                "build. Do the steps that need root first, and USER after them")
    name = who.split(":")[0]
    if not name.isdigit() and name not in KNOWN_USERS:
        made = re.search(rf"\b(useradd|adduser)\b[^\n;&|]*\s{re.escape(name)}(\s|$)",
                         runs(stages[-1]))
        assert made, (
            f"USER {name}: no RUN of the runtime stage creates a user called {name!r} "
            "(useradd/adduser), and the base image has none: the container fails to start "
            "('unable to find user'). Create it in this stage, or switch to the numeric uid "
            "you gave useradd --uid")


# Who may change the program: the runtime user runs it, root owns it. A path the app user
# owns (chown, COPY --chown, useradd -m -d on it) or anyone may write (a mode with o+w) lets a
# compromised server replace its own binary - in place once it has stopped, or by a rename in
# a directory it owns, which works on a running one - and the next restart runs that.
ROOT_NAMES = ("", "root", "0")


def others_write(mode: str, whom: str = "o") -> bool:
    """Whether a chmod mode (octal or symbolic) gives write to others (o, a or ugo), or with
    whom="g" to the file's group."""
    if re.fullmatch(r"[0-7]{3,4}", mode):
        return bool(int(mode, 8) & (0o002 if whom == "o" else 0o020))
    return any(re.fullmatch(r"[ugoa]*", who) and (whom in who or "a" in who) and "w" in perms
               for who, perms in re.findall(r"([ugoa]*)[+=]([rwxXst]*)", mode))


def group_of(owner: str) -> str:
    """The group of a chown/--chown owner spec (user:group, user.group, :group), '' if none."""
    parts = re.split(r"[:.]", owner, maxsplit=1)
    return parts[1] if len(parts) == 2 and parts[1] not in ROOT_NAMES else ""


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, as word lists."""
    return [words for part in re.split(r"&&|\|\||;|\|", run)
            if (words := part.split())]


def writable_by_app(stage: Stage, code: set[str]) -> tuple[str, str] | None:
    """(the instruction, what it does) of the first step that hands the binary, or a
    directory on its path, to a non-root owner or to everyone's write."""
    def on_path(target: str, cwd: str) -> bool:
        target = posixpath.normpath(posixpath.join(cwd, target))
        return any(p == target or p.startswith(target.rstrip("/") + "/") for p in code)

    # A group other than root's handed a path on the binary's path, and a mode giving the
    # group write there: the app user is in that group (useradd made it its own), so it
    # may write there as well as an owner could. Either step may come first.
    grouped: dict[str, str] = {}
    group_writable: set[str] = set()

    def by_group(targets: list[str], cwd: str, group: str, writes: bool) -> str | None:
        for t in (posixpath.normpath(posixpath.join(cwd, t)) for t in targets):
            if not on_path(t, "/"):
                continue
            if group:
                grouped[t] = group
            if writes:
                group_writable.add(t)
            if t in grouped and t in group_writable:
                return grouped[t]
        return None

    for ins, cwd in zip(stage.lines, workdirs(stage), strict=True):
        what = f"{ins['instruction']} {ins['value'][:90]}"
        if ins["instruction"] in ("COPY", "ADD"):
            flags = dict(f.partition("=")[::2] for f in ins["value"].split()
                         if f.startswith("--"))
            owner, mode = flags.get("--chown", ""), flags.get("--chmod", "")
            if owner.split(":")[0] not in ROOT_NAMES:
                return what, f"makes {owner.split(':')[0]} the owner of what it copies"
            if mode and others_write(mode):
                return what, f"gives mode {mode}: everyone may write what it copies"
            if group_of(owner) and mode and others_write(mode, "g"):
                return what, (f"makes {group_of(owner)} the group of what it copies and "
                              f"gives mode {mode}: that group, the app user's, may write it")
        if ins["instruction"] != "RUN":
            continue
        for words in shell_commands(ins["value"]):
            what = "RUN ... " + " ".join(words)[:90]
            args = [w for w in words[1:] if not w.startswith("-")]
            if words[0] == "chown" and len(args) >= 2 and re.split(r"[:.]", args[0])[0] \
                    not in ROOT_NAMES and any(on_path(t, cwd) for t in args[1:]):
                return what, f"makes {re.split(r'[:.]', args[0])[0]} the owner of {args[1:]}"
            if words[0] == "chmod" and len(args) >= 2 and others_write(args[0]) and any(
                    on_path(t, cwd) for t in args[1:]):
                return what, f"gives {args[1:]} mode {args[0]}: everyone may write there"
            group = (group_of(args[0]) if words[0] == "chown" else
                     args[0] if words[0] == "chgrp" and args[0] not in ROOT_NAMES else "")
            writes = words[0] == "chmod" and others_write(args[0] if args else "", "g")
            if len(args) >= 2 and (group or writes) and (
                    found := by_group(args[1:], cwd, group, writes)):
                return what, (f"leaves {args[1:]} writable by the group {found}, the app "
                              "user's own (group and mode set together by this step and "
                              "another chgrp/chown/chmod)")
            if words[0] in ("useradd", "adduser") and re.search(
                    r"\s(-m|--create-home)\b", " " + " ".join(words)):
                home = re.search(r"\s(?:-d|--home-dir|--home)[= ](\S+)", " " + " ".join(words))
                if home and on_path(home.group(1), cwd):
                    return what, (f"creates the user's home {home.group(1)}, owned by that "
                                  "user, where the binary lives")
    return None


def test_the_app_user_cannot_change_the_binary(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    code = {p for _, dest in shipped_binary(stages) for p in (dest, posixpath.dirname(dest))}
    found = writable_by_app(stages[-1], code or {"/app/server", "/app"})
    assert found is None, (
        f"{found[0]} {found[1]}: the binary {sorted(code)} or its directory becomes writable "
        "by the unprivileged runtime user (or by anyone). Expected them root-owned, mode 755 "
        "(COPY --from without --chown; WORKDIR and COPY create root-owned paths): a "
        "compromised server running as that user could then replace its own program "
        "(`mv` over it works even while it runs, in a directory it owns) and every restart "
        "would run the attacker's code. The user exists so that the process cannot change "
        "the image's contents; it needs only to read and execute them") if found else ""



def set_id(mode: str) -> str:
    """'setuid', 'setgid' or '' : what a chmod mode (octal or symbolic) sets of those bits."""
    if re.fullmatch(r"[0-7]{4,5}", mode):
        bits = int(mode, 8)
        return "setuid" if bits & 0o4000 else "setgid" if bits & 0o2000 else ""
    for who, perms in re.findall(r"([ugoa]*)[+=]([rwxXst]*)", mode):
        if "s" in perms:
            return "setgid" if who == "g" else "setuid"
    return ""


def setid_steps(stage: Stage) -> list[tuple[str, str]]:
    """(the instruction, setuid or setgid) of each step of a stage that sets those bits:
    COPY/ADD --chmod, RUN chmod, RUN install -m."""
    found = []
    for ins in stage.lines:
        if ins["instruction"] in ("COPY", "ADD"):
            mode = next((f.split("=", 1)[1] for f in ins["value"].split()
                         if f.startswith("--chmod=")), "")
            if set_id(mode):
                found.append((f"{ins['instruction']} {ins['value'][:90]}", set_id(mode)))
        if ins["instruction"] != "RUN":
            continue
        for words in shell_commands(ins["value"]):
            args = [w for w in words[1:] if not w.startswith("-")]
            mode = (args[0] if words[0] == "chmod" and args else
                    next((re.split(r"[= ]", " ".join(words[k:k + 2]))[1]
                          for k, w in enumerate(words) if re.fullmatch(r"-m|--mode(=.*)?", w)),
                         "") if words[0] == "install" else "")
            if set_id(mode):
                found.append(("RUN ... " + " ".join(words)[:90], set_id(mode)))
    return found


def test_nothing_in_the_image_is_setuid(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    for stage in build_stages(stages) + [stages[-1]]:
        for what, bit in setid_steps(stage):
            where = ("" if stage is stages[-1] else
                     f" in the build stage {stage.name or stage.index}, whose output the "
                     "runtime stage copies (COPY --from keeps a file's mode, these bits too)")
            owner = "user" if bit == "setuid" else "group"
            pytest.fail(
                f"{what}{where} sets the {bit} bit: a {bit} program runs with the rights of "
                f"its file's {owner} - root, who owns what COPY and RUN make - whoever starts "
                "it, so the server (or anyone with a shell as the app user) runs as root "
                "again and USER is undone. The server needs no privilege: ship it mode 755 "
                "(make's own mode; no u+s/g+s, no 4755/2755), and where the runtime allows "
                "it, also refuse escalation (no-new-privileges, Kubernetes' "
                "allowPrivilegeEscalation: false)")


def health_argv(value: str) -> tuple[list[str], bool]:
    """The HEALTHCHECK's command as Docker runs it, and whether it is the shell form."""
    words = value.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    rest = " ".join(words[1:]) if words[:1] and words[0].upper() == "CMD" else " ".join(words)
    argv = exec_args(rest)
    return (argv, False) if argv is not None else (["/bin/sh", "-c", rest], True)


SHELLS = {"sh", "bash", "dash", "ash"}


def argv_misread(argv: list[str]) -> str:
    """'' unless an exec-form command's words are not the ones meant: Docker runs the JSON
    array as it is, with no shell to split it (a whole command line in one string names no
    program; an option and its operand in one string is an unknown option), and `sh -c`
    runs only the one word after -c (the words after it are $0, $1...)."""
    if not argv or re.search(r"\s", argv[0]):
        return (f"its program is {argv[0]!r}: Docker looks for a file of that whole name, "
                "spaces included, and the check fails on a healthy server" if argv else
                "its command is an empty list")
    glued = next((w for w in argv[1:] if w.startswith("-") and re.search(r"\s", w)), None)
    if glued is not None:
        return (f"{glued!r} is one word: {argv[0]} reads it as options, not an option and "
                "its operand, and refuses it")
    if posixpath.basename(argv[0]) in SHELLS and "-c" in argv[1:-1]:
        script, rest = argv[argv.index("-c") + 1], argv[argv.index("-c") + 2:]
        if rest and not re.search(r"\s", script):
            return (f"{argv[0]} -c runs only {script!r}; the words after it, {rest}, become "
                    "its $0 and $1, never run: the check tests nothing")
    return ""


def test_healthcheck_works_in_the_runtime_image(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    checks = final.all("HEALTHCHECK")
    assert checks and checks[-1]["value"].strip().upper() != "NONE", (
        "the runtime stage has no HEALTHCHECK: Docker (and Compose, Swarm) cannot tell a "
        "hung server from a healthy one")
    argv, shell_form = health_argv(checks[-1]["value"])
    misread = "" if shell_form else argv_misread(argv)
    assert not misread, (
        f"HEALTHCHECK CMD {json.dumps(argv)}: {misread}. The exec form is the argv itself, "
        "one word per element and no shell to split them: "
        f'HEALTHCHECK CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/{PORT}"]')
    command = " ".join(argv)
    if "/dev/tcp/" in command:
        before = command.split("/dev/tcp/")[0]
        assert re.search(r"(^|[\s/])bash\b", before), (
            f"HEALTHCHECK {'CMD ' + argv[2] if shell_form else argv} uses /dev/tcp, a bash "
            f"feature, but Docker runs it with {argv[0]} (dash in Debian"
            f"{', the shell form' if shell_form else ''}): "
            "there /dev/tcp is an ordinary missing file and the check fails on a healthy "
            'server. Run it with bash: HEALTHCHECK CMD ["bash", "-c", "exec 3<>/dev/tcp/'
            f'127.0.0.1/{PORT}"]')
    assert "http://" not in command and "https://" not in command, (
        f"HEALTHCHECK {command!r} speaks HTTP, but the server is a raw TCP echo server: it "
        "echoes the request line back and the HTTP client fails on a healthy server. Check "
        f"that port {PORT} accepts a connection (bash's /dev/tcp)")
    tools = [t for t in ("curl", "wget", "nc", "netcat") if re.search(rf"\b{t}\b", command)]
    installed = runs(final)
    missing = [t for t in tools if not re.search(rf"\b(install|add)\b[^\n]*\b{t}\b", installed)]
    assert not missing, (
        f"HEALTHCHECK {command!r} runs {missing[0]}, which {final.image} does not have (and no "
        "RUN of the runtime stage installs it): the check fails on a healthy server. Use what "
        f"the image has: bash -c 'exec 3<>/dev/tcp/127.0.0.1/{PORT}'")
    found = re.findall(r"/dev/tcp/[^/\s]+/(\d+)|(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d+)",
                       command)
    ports = {int(port) for pair in found for port in pair if port}
    assert not ports or PORT in ports, (
        f"HEALTHCHECK {command!r} probes port {sorted(ports)}, but the server listens on "
        f"{PORT}: the check fails on a healthy server. Probe {PORT}")


def test_exec_form_entrypoint_starts_the_copied_binary(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    entry, cmd = final.all("ENTRYPOINT")[-1:], final.all("CMD")[-1:]
    start = entry or cmd
    assert start, "the runtime stage has no ENTRYPOINT or CMD: the container would start bash"
    for ins in entry + cmd:
        value = ins["value"].strip()
        assert exec_args(value) is not None, (
            f"{ins['instruction']} {value} is in shell form: Docker runs it as "
            + (f"['/bin/sh', '-c', {value!r}], appended to the ENTRYPOINT: the server gets "
               "'/bin/sh' as its port argument" if ins is not start[0] else
               "/bin/sh -c '...', sh is PID 1 and `docker stop`'s SIGTERM never reaches the "
               "server (it is SIGKILLed after the grace period)")
            + '. Use the exec form: ENTRYPOINT ["./server"] CMD ["8080"]')
    # CMD alone is the whole command; after an ENTRYPOINT, CMD is its arguments.
    argv = [w for ins in entry + cmd for w in exec_args(ins["value"]) or []]
    assert argv, "the ENTRYPOINT/CMD is an empty list: nothing would start"
    assert posixpath.basename(argv[0]) not in SHELLS, (
        f"the container starts {argv}: the shell is PID 1, not the server, so `docker stop`'s "
        "SIGTERM goes to the shell and the server is SIGKILLed after the grace period. Start "
        'the server itself: ENTRYPOINT ["./server"] CMD ["8080"]')
    exposed = " ".join(i["value"] for i in final.all("EXPOSE"))
    assert str(PORT) in exposed.replace("/tcp", "").split(), (
        f"the runtime stage does not EXPOSE {PORT} (EXPOSE: {exposed or 'none'})")
    assert str(PORT) in argv[1:], (
        f"the container starts {argv}: the server takes its port as its argument and the "
        f"image EXPOSEs {PORT}; pass it: CMD [\"{PORT}\"]")
    shipped = {dest for _, dest in shipped_binary(stages)}
    cwd = workdirs(final)[-1] if final.lines else "/"
    program = argv[0]
    if "/" in program:
        where = {posixpath.normpath(posixpath.join(cwd, program))}
    else:
        where = {posixpath.join(d, program) for d in ("/usr/local/sbin", "/usr/local/bin",
                                                      "/usr/sbin", "/usr/bin", "/sbin", "/bin")}
    assert not shipped or where & shipped, (
        f"the container starts {program!r}, which is "
        f"{sorted(where)[0] if len(where) == 1 else 'looked up in PATH'}"
        f" (WORKDIR {cwd}), but the binary was copied to {sorted(shipped)}: the container "
        "exits at once ('no such file or directory'). Start the path you copied it to")


# The signals ph0.7's server ends on, draining and exiting 0 (`docker stop` sends the image's
# STOPSIGNAL, SIGTERM unless one is set). Any other ends it by the signal's default action:
# killed (SIGKILL, SIGHUP), or a core dump (SIGQUIT) - exit 137, 129, 131, no drain.
HANDLED_SIGNALS = {"SIGTERM", "TERM", "15", "SIGINT", "INT", "2"}


def stop_signal(stages: list[Stage]) -> str | None:
    """The STOPSIGNAL the image carries: the last one of the final stage or of the stages
    it starts from (FROM <stage>), None when none sets it."""
    stage: Stage | None = stages[-1]
    while stage is not None:
        found = stage.all("STOPSIGNAL")
        if found:
            return cast(str, found[-1]["value"]).strip()
        stage = stage_by_ref(stages[:stage.index], stage.image)
    return None


def test_docker_stop_sends_a_signal_the_server_handles(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    signal = stop_signal(stages)
    assert signal is None or signal.upper() in HANDLED_SIGNALS, (
        f"STOPSIGNAL {signal}: `docker stop` sends the server {signal}, which it does not "
        "handle - it ends on SIGTERM (or SIGINT), draining its connections and exiting 0; "
        f"on {signal} it dies by the signal's default action (killed, or a core dump: exit "
        "128+n) with its clients cut off. Leave STOPSIGNAL out (SIGTERM is the default) or "
        "name a signal the program handles")


def test_runtime_ships_only_the_binary(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    for ins in final.all("COPY") + final.all("ADD"):
        ref, sources, _ = copy_parts(ins)
        assert ref is not None, (
            f"the runtime stage runs {ins['instruction']} {ins['value']} from the build context: "
            "sources (or anything else of the checkout) land in the shipped image. The runtime "
            "stage takes only the binary, with COPY --from=builder")
        builder = stage_by_ref(stages, ref)
        if builder is None:
            continue
        made, cwd = binary_made(builder), workdirs(builder)[-1] if builder.lines else "/"
        for src in sources:
            src_abs = posixpath.normpath(posixpath.join(cwd, src))
            assert not (made.startswith(src_abs.rstrip("/") + "/")
                        and posixpath.dirname(made) != src_abs), (
                f"COPY --from={ref} {src} copies the build stage's {src_abs} whole (the "
                "sources, the Makefile, object files) into the runtime image: copy only the "
                f"binary, {made}")
    assert shipped_binary(stages), (
        f"the runtime stage copies nothing the build made: `make release` in the build "
        f"stage writes "
        f"{binary_made(build_stages(stages)[0]) if build_stages(stages) else 'bin/server'}"
        "; COPY --from=builder that path")


# Code generation for one CPU rather than the platform: -march/-mcpu other than the
# baseline (native: whatever CPU ran `docker build`; x86-64-v3, skylake...), and flags that
# switch on an instruction set extension the baseline lacks. -mtune only reorders code for a
# CPU and stays portable.
CPU_SPECIFIC = re.compile(
    r"(?<![\w-])(-m(?:arch|cpu)=(?!(?:x86-64|generic|armv8-a)(?![\w.+-]))[\w.+-]+"
    r"|-m(?:avx[\w-]*|sse3|ssse3|sse4[\w.]*|fma4?|bmi2?|popcnt|lzcnt|f16c|aes|pclmul|sha|"
    r"adx|movbe)(?![\w-]))")


def test_the_binary_runs_on_any_cpu_of_its_platform(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    dfp, _ = dockerfile
    for ins in dfp.structure:
        if ins["instruction"] not in ("RUN", "ENV", "ARG"):
            continue
        flag = CPU_SPECIFIC.search(ins["value"])
        assert flag is None, (
            f"{ins['instruction']} {ins['value'][:90]} compiles with {flag.group(1)}: the "
            "binary is made for "
            + ("the CPU of whichever machine runs `docker build` (a CI runner, a laptop)"
               if "native" in flag.group(1) else f"only the CPUs that have {flag.group(1)}'s "
               "instructions")
            + " and may use instructions (AVX2, AVX-512...) another host of the platform "
            "lacks: there the server dies at start with SIGILL (Illegal instruction, exit "
            "132), the HEALTHCHECK never passes and the container restarts in a loop. An "
            "image is built once and runs on every machine its base runs on: compile for the "
            "platform's baseline (no -march=native, -mcpu=native, -march=x86-64-v3, -mavx2; "
            "-mtune only reorders code and is harmless)")


# Flags that link the binary against a runtime library of the compiler's own (the official
# gcc image installs them in /usr/local/lib64; a slim Debian has none of them): the
# sanitizers' libasan, libubsan, libtsan, liblsan, OpenMP's libgomp, libquadmath, libitm.
COMPILER_RUNTIME = re.compile(
    r"(?<![\w-])(-fsanitize=[\w,-]+|-fopenmp\b|-lgomp\b|-lquadmath\b|-fgnu-tm\b|-litm\b)")
RUNTIME_LIBRARY = {"address": "libasan.so.8", "undefined": "libubsan.so.1",
                   "thread": "libtsan.so.2", "leak": "liblsan.so.0", "openmp": "libgomp.so.1",
                   "gomp": "libgomp.so.1", "quadmath": "libquadmath.so.0",
                   "gnu-tm": "libitm.so.1", "itm": "libitm.so.1"}


def test_the_binary_needs_only_the_libraries_the_runtime_has(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    # The stages the shipped binary is built in: those the runtime copies from, and the
    # stages they start from (a test stage with a sanitizer, never shipped, is fine).
    shipped: list[Stage] = []
    for stage in build_stages(stages):
        at: Stage | None = stage
        while at is not None and at not in shipped:
            shipped.append(at)
            at = stage_by_ref(stages[:at.index], at.image)
    for ins in (i for st in sorted(shipped, key=lambda st: st.index) for i in st.lines):
        if ins["instruction"] not in ("RUN", "ENV", "ARG"):
            continue
        flag = COMPILER_RUNTIME.search(ins["value"])
        if flag is None or "-static" in ins["value"]:
            continue
        word = re.split(r"[=,]", flag.group(1).lstrip("-"))
        builder = build_stages(stages)[0].image
        libraries = sorted({RUNTIME_LIBRARY.get(w.removeprefix("l").removeprefix("f"), "")
                            for w in word[1:] or word} - {""})
        pytest.fail(
            f"{ins['instruction']} {ins['value'][:90]} compiles with {flag.group(1)}: the "
            f"binary is then linked against {', '.join(libraries) or 'a runtime library'} of "
            f"the compiler (in {builder}, under /usr/local/lib64), which the slim runtime "
            "image does not "
            "have: the server dies at start ('error while loading shared libraries: "
            f"{libraries[0] if libraries else 'lib...so'}: cannot open shared object file'), "
            "though the image builds without a warning. Sanitizers and OpenMP belong "
            "to a test build; the image's build stage runs make release with plain flags "
            '(CFLAGS="-O2 -DNDEBUG")')


def test_the_binary_is_built_for_the_image_platform(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    for builder in build_stages(stages):
        cross = re.search(r"TARGET(PLATFORM|OS|ARCH|VARIANT)", "\n".join(
            i["value"] for i in builder.lines if i["instruction"] in ("ARG", "ENV", "RUN")))
        assert builder.platform == final.platform or cross, (
            f"the build stage starts FROM --platform={builder.platform} {builder.image}, the "
            "runtime stage FROM "
            + (f"--platform={final.platform} " if final.platform else "")
            + f"{final.image}: gcc in the build stage makes a binary for "
            + ("the machine that runs `docker build`" if "BUILDPLATFORM" in builder.platform
               else builder.platform)
            + ", while the runtime image is for "
            + (final.platform if final.platform else "the platform the image is built for "
               "(the building machine's, or docker build --platform)")
            + ": wherever the two differ (an arm64 laptop or server, an amd64 CI runner) the "
            "image ships a binary of the other architecture and the server dies at start "
            "('exec format error'). Leave --platform off both stages (or give both the same); "
            "$BUILDPLATFORM is for a cross-compiler told $TARGETARCH, which this build has not")


def test_layers_are_ordered_for_the_cache(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    for stage in stages:
        copied = None
        for ins in stage.lines:
            if ins["instruction"] in ("COPY", "ADD") and copy_from(ins) is None:
                copied = copied or ins
            if (ins["instruction"] == "RUN" and copied is not None and re.search(
                    r"\b(apt-get|apt|apk|yum|dnf|pip3?)\b[^\n]*\b(install|add)\b", ins["value"])):
                pytest.fail(
                    f"RUN {ins['value'][:80]} comes after {copied['instruction']} "
                    f"{copied['value']}: every edit of a source invalidates that layer, so the "
                    "packages are downloaded and installed again on every build. Install "
                    "first, copy the sources after")
    final = stages[-1]
    got_binary = False
    for ins in final.lines:
        if ins["instruction"] in ("COPY", "ADD") and copy_from(ins) is not None:
            got_binary = True
        elif ins["instruction"] == "RUN" and got_binary:
            pytest.fail(
                f"the runtime stage runs RUN {ins['value'][:80]} after copying the binary: "
                "every new build of the server changes that COPY layer, so this step runs "
                "again each time and adds a layer per release. Do the setup (useradd, "
                "packages) before COPY --from, and set modes with COPY --chmod/--chown")


def variables(ins: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(name, value) of each variable an ENV or ARG sets; value None for an ARG without a
    default (it comes from --build-arg). ENV K=V K2="v 2", the old ENV K v w, ARG K[=V]."""
    value = ins["value"].strip()
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    if ins["instruction"] == "ENV" and words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(k, v if sep else None) for k, sep, v in (w.partition("=") for w in words)]


def random_looking(value: str) -> bool:
    """A value that looks generated rather than chosen: one word of 20 or more characters
    from a key's alphabet, upper and lower case and digits mixed, and dense in information
    (a digest, a hex commit id, a version or a path are none of these)."""
    if len(value) < 20 or not re.fullmatch(r"[A-Za-z0-9+/=_-]+", value) or not all(
            re.search(c, value) for c in (r"[a-z]", r"[A-Z]", r"[0-9]")):
        return False
    counts = [value.count(c) for c in set(value)]
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts)
    return entropy >= 4.0


def secret_value(value: str) -> str:
    """What kind of secret value is, '' if it looks like none."""
    for pattern, what in SECRET_VALUES:
        if pattern.search(value):
            return what
    return "a random-looking key (long, mixed case and digits)" if random_looking(value) else ""


def secret_name(name: str, value: str | None) -> str:
    """Why a variable's name says it holds a secret, '' if it does not or its value
    plainly is no secret (a number, a switch, a path: DB_PASSWORD_FILE=/run/secrets/db)."""
    words = set(re.split(r"[_-]", name.upper()))
    if words & NOT_SECRET_WORDS or (value is not None and re.fullmatch(
            r"|[0-9.]+|true|false|yes|no|on|off|[./~][^\s$]*", value.strip(), re.I)):
        return ""
    hit = SECRET_NAME.search(name)
    word = next(iter(sorted(words & SECRET_WORDS)), "")
    return hit.group(0) if hit else word


def used_as_credential(name: str, run: str) -> str:
    """The part of a RUN command that hands $name over as a password or token, '' if none."""
    var = rf"\$\{{?{re.escape(name)}\b\}}?"
    places = [
        rf"://[^\s/@]*:?{var}@",                                # scheme://user:$PW@host
        rf"(?:-u|--user)[\s=]+[^\s:]*:{var}",                   # curl -u user:$PW
        rf"(?<![\w-])-p{var}",                                  # mysql -p$PW
        rf"(?i:--pass(?:word)?|--token|--auth\S*|password|passwd|token|secret|bearer|"
        rf"basic|authorization:|private-token:)[\s=:'\"]*{var}",  # --password $PW ...
        rf"{var}[^\n;&|]*>>?\s*\S*(?:netrc|npmrc|pypirc|git-credentials|credentials|pgpass|"
        r"config\.json)",                                       # echo $PW > ~/.netrc
    ]
    for place in places:
        found = re.search(place, run)
        if found:
            return found.group(0)
    return ""


def secret_in(ins: dict[str, Any], stage: Stage) -> str:
    """Why this ENV or ARG puts a secret in the image, '' if it does not: its name, its
    value or the use a RUN of its stage makes of it."""
    for name, value in variables(ins):
        why = secret_value(value or "")
        if why:
            return f"{name}'s value is {why}"
        word = secret_name(name, value)
        if word:
            return f"its name {name} says so ({word})"
        use = used_as_credential(name, runs(stage))
        if use:
            return f"a RUN of this stage uses {name} as a credential ({use})"
    return ""


def test_no_secret_baked_into_a_layer(
        dockerfile: tuple[DockerfileParser, list[Stage]]) -> None:
    _, stages = dockerfile
    for stage in stages:
        for ins in stage.all("ENV") + stage.all("ARG"):
            why = secret_in(ins, stage)
            assert not why, (
                f"{ins['instruction']} {ins['value'][:60]} puts a secret into the "
                + ("image" if stage is stages[-1] else
                   f"build stage {stage.name or stage.index} (cached, pushed with "
                   "--cache-to, its build args in the image's provenance)")
                + f": {why}. ENV values are kept in the image's config (docker inspect) for "
                "anyone who pulls it, and a build ARG that a RUN uses is written into that "
                "layer's record in `docker history` (|1 NAME=value) and the build cache. "
                "Pass secrets at run time (docker run -e / --env-file, a mounted file, "
                "NAME_FILE=/run/secrets/...) or to a build step with RUN "
                "--mount=type=secret,id=...; ordinary settings (PORT, LOG_LEVEL) stay in ENV")
        for ins in stage.all("COPY") + stage.all("ADD"):
            _, sources, _ = copy_parts(ins)
            env = [s for s in sources if posixpath.basename(s.rstrip("/")).startswith(".env")]
            assert not env, (
                f"{ins['instruction']} {ins['value']} copies {env[0]} into a layer: the password "
                "stays in the image (and its history) for anyone who pulls it. Give it to the "
                "container at run time (--env-file)")


def context_dir(tmp: Path, learner: Any) -> Path:
    ctx = tmp / "context"
    shutil.copytree(APP, ctx)
    (ctx / "src").mkdir(exist_ok=True)
    shutil.copy(SERVER_C, ctx / "src" / "server.c")
    for rel, text in JUNK:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text)
    shutil.copy(learner.path("Dockerfile"), ctx / "Dockerfile")
    shutil.copy(learner.path(".dockerignore"), ctx / ".dockerignore")
    return ctx


def test_dockerignore_keeps_the_context_small(learner: Any, tmp_path: Path) -> None:
    from docker.utils.build import exclude_paths

    ctx = context_dir(tmp_path, learner)
    patterns = [line.strip() for line in (ctx / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sent = set(exclude_paths(str(ctx), patterns, dockerfile="Dockerfile"))
    leaked = [p for p in MUST_NOT_SEND if p in sent]
    commented = [p for p in patterns if re.search(r"\s#", p)]
    if leaked and commented:
        meant = [re.split(r"\s#", p)[0].strip() for p in patterns]
        kept = set(exclude_paths(str(ctx), meant, dockerfile="Dockerfile"))
        hidden = [p for p in leaked if p not in kept]
        assert not hidden, (
            f"with this .dockerignore the build context sends {hidden} to the daemon, though "
            f"a line seems to exclude them: {commented[0]!r} is one pattern, the whole line - "
            "a .dockerignore has comments only on lines that START with #, never after a "
            "pattern, so that pattern names a file called exactly that and matches nothing. "
            "Put the comment on a line of its own above the pattern")
    assert not leaked, (
        f"with this .dockerignore the build context sends {leaked} to the daemon: the git "
        "history, host binaries and object files and the .env secrets end up in the context "
        "(and in the image with COPY . .); exclude them"
        + (". A pattern without a slash matches the context's top level only (*.o is not "
           "src/server.o, unlike .gitignore): write **/*.o" if "src/server.o" in leaked else ""))
    lost = [p for p in MUST_SEND if p not in sent]
    assert not lost, (f"this .dockerignore leaves {lost} out of the build context: the build "
                      "stage cannot compile without them")


# --- built and run, where a Docker engine answers -----------------------------------------

def docker_client() -> Any:
    """A client of the Docker engine at $DOCKER_HOST, or the reason there is none."""
    import docker

    # The ignores: mypy run from the repository's root takes its docker/ folder (a namespace
    # package) for this import, not the Docker SDK (untyped, so Any either way)
    try:
        docker.from_env(timeout=10).ping()  # type: ignore[attr-defined]
        return docker.from_env(timeout=600)  # type: ignore[attr-defined]  # builds take time
    except Exception as exc:
        return (f"no Docker engine answers ({os.environ.get('DOCKER_HOST') or 'default socket'}"
                f": {str(exc).splitlines()[0][:120]}); the image is built and run where one "
                "does, as in CI's docker stage (docker/ci-docker.sh)")


# The build-and-run check exists only where an engine answers (or CI demands one): a skipped
# test would mark the whole lab "not verifiable" on a machine without Docker, where the
# static checks above are the verification.
_ENGINE = docker_client()
REQUIRE_DOCKER = os.environ.get("LABRUNNER_REQUIRE_DOCKER") == "1"


def standins() -> dict[str, str]:
    raw = os.environ.get("LABRUNNER_DOCKER_STANDINS", "")
    return dict(part.split("=", 1) for part in raw.split() if "=" in part)


def built_and_run_in_docker(learner: Any, tmp_path: Path) -> None:
    if isinstance(_ENGINE, str):
        pytest.fail(_ENGINE)
    client = _ENGINE
    import docker.errors

    ctx = context_dir(tmp_path, learner)
    dfp = DockerfileParser(path=str(ctx / "Dockerfile"))
    _, stages = parse(ctx / "Dockerfile")
    builders = build_stages(stages)
    if len(stages) < 2 or not builders or not builders[0].name:
        pytest.fail("no named build stage to build: see the static checks above")
    swap = standins()
    if swap:
        names = {s.name for s in stages if s.name}
        dfp.parent_images = [img if img in names else
                             swap["runtime"] if i == len(stages) - 1 else swap["builder"]
                             for i, img in enumerate(dfp.parent_images)]
    tag = f"lr-ph6-7-{uuid.uuid4().hex[:10]}"
    made: list[str] = []
    container = None
    try:
        try:
            client.images.build(path=str(ctx), tag=f"{tag}:build", target=builders[0].name,
                                network_mode="host", rm=True, forcerm=True)
            made.append(f"{tag}:build")
            client.images.build(path=str(ctx), tag=f"{tag}:run", network_mode="host",
                                rm=True, forcerm=True)
            made.append(f"{tag}:run")
        except docker.errors.BuildError as exc:
            log = "".join(str(c.get("stream") or c.get("error") or "") for c in exc.build_log)
            pytest.fail(f"docker build failed: {exc.msg}\n{log[-2500:]}")
        build_img, run_img = client.images.get(f"{tag}:build"), client.images.get(f"{tag}:run")
        assert run_img.attrs["Size"] < build_img.attrs["Size"], (
            f"the runtime image is {run_img.attrs['Size'] >> 20} MiB, the build stage "
            f"{build_img.attrs['Size'] >> 20} MiB: the runtime stage should ship only the "
            "binary on a slim base")
        container = client.containers.run(f"{tag}:run", detach=True,
                                          ports={f"{PORT}/tcp": ("127.0.0.1", None)},
                                          labels={"labrunner": "1"})

        def host_port() -> int | None:
            container.reload()
            if container.status == "exited":
                pytest.fail(f"the container exited: {container.logs().decode()[-800:]}")
            bound = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{PORT}/tcp")
            return int(bound[0]["HostPort"]) if bound else None

        wait_until(lambda: bool(host_port()), f"the container's port {PORT} to be published",
                   timeout=60)
        port = host_port()

        def echoes() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"ping\n")
                    return s.recv(16) == b"ping\n"
            except OSError:
                return False

        wait_until(echoes, "the server in the container to echo 'ping'", timeout=60)
        code, out = container.exec_run(["id", "-u"])
        assert code == 0 and out.decode().strip() != "0", (
            f"the server runs as uid {out.decode().strip()} in the container: expected a "
            "non-root uid (USER)")
        for path in sorted({p for _, dest in shipped_binary(stages)
                            for p in (dest, posixpath.dirname(dest))}):
            code, _ = container.exec_run(["test", "-w", path])
            assert code != 0, (
                f"{path} is writable by the server's uid {out.decode().strip()} in the "
                "container: expected the binary and its directory root-owned and read-only to "
                "it, so a compromised server cannot replace the program the next restart runs")
        health = run_img.attrs["Config"].get("Healthcheck") or {}
        test = health.get("Test") or []
        cmd = (["/bin/sh", "-c", test[1]] if test[:1] == ["CMD-SHELL"] else test[1:])
        code, out = container.exec_run(cmd)
        assert code == 0, (
            f"the HEALTHCHECK command {cmd} fails inside the running container (exit {code}: "
            f"{out.decode().strip()[:300]}): Docker would mark a working server unhealthy. "
            "Is its program installed in the runtime image (curl is not, in a slim one)?")
        container.stop(timeout=20)
        container.reload()
        code = container.attrs["State"]["ExitCode"]
        assert code == 0, (
            f"after `docker stop` the container exited with {code}: expected 0, the server "
            "ending on SIGTERM. 137 means it was SIGKILLed - the signal never reached it "
            "(shell-form ENTRYPOINT)")
    finally:
        if container is not None:
            container.remove(force=True)
        for image in made:
            try:
                client.images.remove(image, force=True)
            except docker.errors.APIError:
                pass


if REQUIRE_DOCKER or not isinstance(_ENGINE, str):
    test_built_and_run_in_docker = built_and_run_in_docker
