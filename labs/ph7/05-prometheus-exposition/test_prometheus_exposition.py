"""ph7.5 The exposition format by hand, read back by its two consumers: prometheus_client's
parser (every HELP, TYPE, label and value must come back as written) and a real Prometheus
that scrapes it. Then PromQL over a counter that resets when a worker restarts: the learner's
query, evaluated by Prometheus, must count what the test did.

Label-value escaping is checked first, on its own, against the text the format requires for
each case (LABEL_ESCAPES): a wrong escaper makes the parser (or Prometheus) reject the whole
exposition with an error about the line, not about the mistake; compared case by case, the
mistake is named (which character is not escaped, or escaped in which wrong order)."""

from __future__ import annotations

import itertools
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labrunner.testing import serve_wsgi

# Data meant to catch every escaping rule: quotes, backslashes and line feeds in label values,
# a backslash, a quote and a line feed in HELP, non-ASCII, negative, tiny and large numbers.
FAMILIES: list[dict[str, Any]] = [
    {"name": "http_requests", "type": "counter",
     "help": ('Requests served, by "path" and method.\nA \\ stays a backslash, and '
              'C:\\new is no line feed.'),
     "samples": [
         {"labels": {"path": '/search?q="a b"', "method": "GET"}, "value": 3},
         {"labels": {"path": "C:\\temp\\new", "method": "POST"}, "value": 12345678},
         {"labels": {"path": "two\nlines", "method": "PUT"}, "value": 0},
         {"labels": {"path": "/tab\there", "method": "GET"}, "value": 7},
         # past float64's integer precision: 9007199254740993 and 9007199254740992.0 are
         # both the float 2**53 to the parser and to Prometheus - either is right
         {"labels": {"path": "/busy", "method": "GET"}, "value": 2**53 + 1},
     ]},
    # Characters other line splitters break at (CR, form feed, NEL, LINE SEPARATOR) and a
    # trailing line feed: HELP keeps them all, escaping only the backslash and the line feed.
    {"name": "jobs_done", "type": "counter",
     "help": "Jobs done.\r\nOne per job\x0cand retry\x85or\u2028resume, then a line feed:\n",
     "samples": [{"labels": {"queue": "bulk"}, "value": 4}]},
    {"name": "queue_depth", "type": "gauge", "help": "Jobs waiting, per queue.",
     "samples": [
         {"labels": {}, "value": -2.5},
         {"labels": {"queue": "café"}, "value": 1e-06},
         {"labels": {"queue": "bulk"}, "value": 1.5e+20},
         {"labels": {"queue": "thin"}, "value": 1.23456789e-09},
         {"labels": {"queue": "third"}, "value": 1 / 3},
     ]},
]


# Label values, and the text the exposition format requires for each between the quotes of
# v="...": the backslash, the double quote and the line feed escaped (\\, \", \n), the
# backslash first so no escape is escaped again, anything else as it is.
LABEL_ESCAPES: list[tuple[str, str]] = [
    ("C:\\temp", r"C:\\temp"),                     # a backslash
    ('say "hi"', r'say \"hi\"'),                     # double quotes
    ("two\nlines", r"two\nlines"),                   # a line feed
    ('a\\"b', r'a\\\"b'),                           # a backslash, then a quote
    ('a"\\b', r'a\"\\b'),                           # a quote, then a backslash
    ("ends in \\", r"ends in \\"),                  # a trailing backslash
    ("\\n is no line feed", r"\\n is no line feed"),  # a backslash and an n
    ("\\\n", r"\\\n"),                              # a backslash, then a line feed
    ("tab\there, café", "tab\there, café"),          # nothing else is escaped
    # nor any other line-breaking character: a CR (alone, or before a line feed), a form
    # feed, NEL, U+2028 - the parser undoes \\, \" and \n only, the rest comes back as written
    ("crlf\r\nend", "crlf\r\\nend"),
    ("cr\r ff\x0c nel\x85 ls\u2028", "cr\r ff\x0c nel\x85 ls\u2028"),
]
OTHER_BREAKS = {"\r": "CR", "\x0c": "form feed", "\x85": "NEL", "\u2028": "U+2028", "\t": "tab"}
ESCAPE = {"\\": r"\\", '"': r"\"", "\n": r"\n"}
CHAR = {"\\": "backslash", '"': "double quote", "\n": "line feed"}


def _escaper(order: tuple[str, ...]) -> Any:
    """A label escaper that replaces the characters of ``order``, in that order."""
    def escape(value: str) -> str:
        for char in order:
            value = value.replace(char, ESCAPE[char])
        return value
    return escape


def _escaping_mistake(got: dict[str, str]) -> str:
    """The first line of the message: what a label escaper that wrote ``got`` (value -> text)
    did wrong, found by trying the escapers people write (the three replaces in some order,
    some left out; JSON's escapes) on every case."""
    for k in range(3, -1, -1):
        for order in itertools.permutations(ESCAPE, k):
            if all(_escaper(order)(value) == text for value, text in got.items()):
                return _named(order)
    if any(all(json.dumps(value, ensure_ascii=ascii)[1:-1] == text
               for value, text in got.items()) for ascii in (True, False)):
        return (r"label values: render() escapes them as JSON strings (a tab as \t, é as "
                r"\u00e9) - the format escapes only the backslash (\\), the double quote "
                r'(\") and the line feed (\n), and a parser does not undo other escapes')
    changed = sorted({name for value, text in got.items() for char, name in OTHER_BREAKS.items()
                      if char in value and text.count(char) < value.count(char)})
    if changed:
        return (f"label values: render() escaped or replaced the {', the '.join(changed)} - "
                r'a label value escapes only the backslash (\\), the double quote (\") and '
                r"the line feed (\n); every other character, line-breaking or not, is written "
                r"as it is (a parser turns only \\, \" and \n back, so \r or a CRLF read as "
                "one line break comes back changed)")
    return ("label values escaped wrongly - escape backslashes first, then quotes and line "
            "feeds, nothing else")


def _named(order: tuple[str, ...]) -> str:
    """The mistake of an escaper that replaces the characters of ``order`` in that order."""
    missing = [CHAR[c] for c in ESCAPE if c not in order]
    before = list(order[:order.index("\\")]) if "\\" in order else []
    if before:
        first = '"' if '"' in before else before[0]
        return (
            "label values: escape backslashes first, then quotes and line feeds - render() "
            f"escaped the backslash after the {' and the '.join(CHAR[c] for c in before)}, "
            f"so the backslash of each {ESCAPE[first]} it had just written was escaped "
            f"again ({ESCAPE[first]} became \\{ESCAPE[first]}: "
            + ("the quote then ends the value)" if first == '"' else
               "a line feed reads back as a backslash and an n)")
            + (f"; and the {' and the '.join(missing)} not escaped" if missing else ""))
    return (f"label values: render() does not escape the {' nor the '.join(missing)} - a "
            r'label value escapes the backslash (\\), the double quote (\") and the line '
            r"feed (\n), the backslash first")


def _label_escaping(learner: Any) -> str:
    """'' when render() writes every LABEL_ESCAPES value as the format requires; else the
    message naming the mistake, each case's expected and actual text below it."""
    render = learner.function("exposition", "render")
    got: dict[str, str] = {}
    texts = [render([{"name": "escape_probe", "type": "gauge", "help": "Label escaping.",
                      "samples": [{"labels": {"v": value}, "value": 1}]}])
             for value, _ in LABEL_ESCAPES]
    stale = _stale(texts)
    if stale:
        return stale
    for (value, _), text in zip(LABEL_ESCAPES, texts, strict=True):
        start = text.find("escape_probe{") if isinstance(text, str) else -1
        if start < 0:
            return ("render() of a gauge escape_probe with one sample labelled v wrote no "
                    f"'escape_probe{{v=\"...\"}} 1' line: {text!r}")
        labels = text[start + len("escape_probe{"):text.rfind("}")].rstrip(",")
        got[value] = labels[3:-1] if labels.startswith('v="') and labels.endswith('"') \
            else labels
    wrong = [(value, want, got[value]) for value, want in LABEL_ESCAPES if got[value] != want]
    if not wrong:
        return ""
    return (
        _escaping_mistake(got) + "\n"
        + r'A label value escapes exactly three characters: \ as \\, " as \", a line feed '
        r"as \n - the backslash FIRST: escaped after the others, it doubles the backslash "
        "each of their escapes begins with. Each value (as Python writes it), the text the "
        'format requires between v="...", and what render() wrote:\n'
        + "\n".join(f"  {value!r}: expected {want}  got {text}"
                    for value, want, text in wrong))


def _stale(texts: list[Any]) -> str:
    """'' unless render(), called with one family of one sample after another (the same
    name, other label values), wrote what an earlier call had: kept lines of it, or the
    same text for other values."""
    types = [t.count("# TYPE escape_probe ") for t in texts if isinstance(t, str)]
    kept = any(n > 1 for n in types)
    if not kept and not (len(texts) > 1 and all(t == texts[0] for t in texts)):
        return ""
    return ("render() wrote what an earlier call had written: called with one gauge "
            "escape_probe of one sample at a time, label v different each call, it "
            + (f"wrote {max(types)} '# TYPE escape_probe' lines in one text (lines of earlier "
               "calls kept, in a list or cache at module level)" if kept else
               "wrote the same text every time (what it wrote for the family's name is "
               "kept and served again)")
            + " - an endpoint renders its families at every scrape, with the values they "
            "have then: build each text from the families given, and keep nothing between "
            f"calls. First two texts: {texts[:2]!r}")


def test_label_values_are_escaped_backslash_first(learner: Any) -> None:
    mistake = _label_escaping(learner)
    if mistake:
        pytest.fail(mistake, pytrace=False)


def _sample_name(family: dict[str, Any]) -> str:
    return cast(str, family["name"]) + ("_total" if family["type"] == "counter" else "")


def _rendered(learner: Any, families: list[dict[str, Any]]) -> str:
    """The text render() writes for ``families``, rendered twice where the learner's code
    runs (the harness), as an endpoint renders the same families at every scrape: a render
    that changed the families it was given is named."""
    out = json.loads(learner.harness().render_twice(learner.load("exposition"),
                                                    json.dumps(families)))
    text, again = out["texts"]
    assert isinstance(text, str), f"render() returned {out['type']}, expected str"
    given, after = out["given"], out["after"]
    changed = [f"{old['name']!r} -> {new.get('name')!r}" if old["name"] != new.get("name")
               else repr(old["name"]) for old, new in zip(given, after, strict=False)
               if old != new]
    assert not changed and len(given) == len(after) and again == text, (
        f"render() changed the families it was given ({', '.join(changed) or 'the list'}): "
        "the caller renders the same families at every scrape, so the next /metrics would "
        "show them changed (e.g. http_requests_total_total) - build the output from local "
        "names, leave the input as it was")
    return text


@contextmanager
def _exporter(first: str) -> Iterator[tuple[str, Any]]:
    """The test's own /metrics endpoint serving whatever text it was last given."""
    current = {"text": first}
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with lock:
            body = current["text"].encode()
        start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
        return [body]

    def publish(text: str) -> None:
        with lock:
            current["text"] = text

    with serve_wsgi(app) as address:
        yield address, publish


def _grouping_mistake(text: str) -> str | None:
    """The format's grouping rules, None if kept: one HELP and one TYPE line per metric name,
    and a family's lines (its HELP, TYPE and samples) together, no other family's between."""
    lines = text.split("\n")  # HELP text may hold other line-breaking characters
    metadata: dict[tuple[str, str], int] = {}
    for line in lines:
        if line[:7] in ("# HELP ", "# TYPE "):
            key = (line[2:6], line[7:].split(" ")[0])
            metadata[key] = metadata.get(key, 0) + 1
    declared = {name for _, name in metadata}
    blocks: list[str] = []  # the metric name of each run of consecutive lines
    for line in lines:  # a piece of a line broken by a mistake names no declared metric
        name = line[7:].split(" ")[0] if line[:7] in ("# HELP ", "# TYPE ") else (
            re.split(r"[{ ]", line, maxsplit=1)[0])
        if name in declared and (not blocks or blocks[-1] != name):
            blocks.append(name)
    rule = ("the text format allows one HELP and one TYPE line per metric name, before its "
            "first sample, and all of that metric's samples in one group after them - write "
            "each family's HELP and TYPE once, then all of its samples, then the next family")
    for (kind, name), count in metadata.items():
        if count > 1:
            return f"render() wrote {count} '# {kind} {name}' lines, expected one: {rule}"
    split = sorted({n for n in blocks if blocks.count(n) > 1})
    if split:
        return (f"render() wrote the lines of {', '.join(split)} in {blocks.count(split[0])} "
                f"groups with other families' lines between them (in order: "
                f"{' '.join(blocks)}): {rule}")
    return None


def _float64(value: float) -> float:
    """A sample's value as Prometheus stores it: prometheus_client's parser gives digits
    back as a Python int (exact), Prometheus reads every value as a float64."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def test_the_parser_reads_back_what_was_written(learner: Any) -> None:
    text = _rendered(learner, FAMILIES)
    for family in FAMILIES:
        name = _sample_name(family)
        for kind in ("HELP", "TYPE"):
            mine = [line for line in text.splitlines() if line.startswith(f"# {kind} ")
                    and line.split(" ")[2:3] in ([name], [family["name"]])]
            assert any(line.split(" ")[2] == name for line in mine), (
                f"no '# {kind} {name} ...' line; the {kind} line(s) written for "
                f"{family['name']}: {mine}. "
                + ("A counter's HELP, TYPE and samples are all named <name>_total"
                   if family["type"] == "counter" else "HELP and TYPE name the metric")
                + f" ({name}): Prometheus files the type and help under the samples' name, "
                "and a TYPE for another name leaves the samples untyped")
    mistake = _grouping_mistake(text)
    if mistake:
        pytest.fail(mistake, pytrace=False)
    try:
        parsed = {f.name: f for f in text_string_to_metric_families(text)}
    except Exception as exc:  # noqa: BLE001 - the parser's complaint is the message
        pytest.fail(_label_escaping(learner) or
                    f"prometheus_client's parser rejects the exposition: {exc}\n{text}",
                    pytrace=False)
    for family in FAMILIES:
        name = family["name"]
        assert name in parsed, (
            f"no family {name!r} parsed back (saw {sorted(parsed)}): write '# HELP', "
            f"'# TYPE' and the samples of {name}")
        got = parsed[name]
        assert got.type == family["type"], (
            f"{name} parsed back as a {got.type}, expected a {family['type']}: its "
            f"'# TYPE {_sample_name(family)} {family['type']}' line")
        assert got.documentation == family["help"], (
            f"{name}'s HELP parsed back as {got.documentation!r}, expected "
            f"{family['help']!r}: " + _help_why(got.documentation, family["help"]))
        samples = [(s.name, s.labels, _float64(s.value)) for s in got.samples]
        want = [(_sample_name(family), s["labels"], float(s["value"]))
                for s in family["samples"]]
        for wanted in want:
            same = [v for n, labels, v in samples if (n, labels) == wanted[:2]]
            assert wanted in samples, (
                f"sample {wanted[0]}{wanted[1]} = {wanted[2]!r} parsed back as {same[0]!r}: "
                "write the value exactly (an integer without a fraction, any other float as "
                "repr() writes it) - fixed decimals or %g round tiny values and fractions away"
                if same else
                f"sample {wanted[0]}{wanted[1]} = {wanted[2]} did not parse back"
                + "".join(f" (the sample of that value came back as {n}{labels})"
                          for n, labels, v in samples if v == wanted[2])[:300]
                + ": label values escape ONLY the backslash (\\\\), the double quote (\\\") "
                "and the line feed (\\n) - other escapes (JSON's or repr()'s \\t, \\u00e9) "
                "are not undone; a counter's samples are named <name>_total. Parsed: "
                f"{samples}")
        assert len(samples) == len(want), f"{name}: parsed {samples}, expected {want}"
    assert text.endswith("\n"), "the exposition must end with a line feed"


# Values a gauge really takes that are no finite number - a hit ratio of 0 hits in 0 lookups
# (NaN), a bucket bound or a division by zero (+Inf, -Inf) - and how the format writes them.
# Each: the sample's label, the value given, the float the format must carry. An integer past
# float64's range (a counter summed in Python ints) is the float it rounds to: +-Inf.
SPECIAL = (("+Inf", math.inf, math.inf), ("-Inf", -math.inf, -math.inf),
           ("NaN", math.nan, math.nan), ("10**400", 10**400, math.inf),
           ("-10**400", -(10**400), -math.inf))


def test_nan_and_infinities_are_written(learner: Any) -> None:
    render = learner.function("exposition", "render")
    family = {"name": "cache_hit_ratio", "type": "gauge", "help": "Hits per lookup.",
              "samples": [{"labels": {"cache": name}, "value": value}
                          for name, value, _ in SPECIAL]}
    how = ("\nA gauge can be NaN (0 hits / 0 lookups) or infinite (a bucket bound, a rate "
           "divided by zero), and the exposition format has words for them: NaN, +Inf, -Inf. "
           "int() raises on them (OverflowError for an infinity, ValueError for NaN), so a "
           "value == int(value) test must come after math.isnan()/math.isinf(); one such "
           "sample would otherwise break the whole /metrics page and every metric on it "
           "goes missing. An integer past float64's range (10**400) is no number the "
           "format can carry either: float() of it raises OverflowError, and its digits "
           "written out fail Prometheus' parser (the whole scrape with them) - write the "
           "float it rounds to, +Inf or -Inf.")
    try:
        text = render([family])
    except Exception as exc:  # noqa: BLE001 - the learner's error is the finding
        problem = (f"render() of a gauge whose samples are +Inf, -Inf, NaN and +-10**400 "
                   f"raised {type(exc).__name__}: {exc}" + how)
        pytest.fail(problem, pytrace=False)
    try:
        parsed = [s for f in text_string_to_metric_families(text) for s in f.samples]
    except Exception as exc:  # noqa: BLE001 - the parser's complaint is the message
        pytest.fail(f"prometheus_client's parser rejects the exposition of +Inf, -Inf and "
                    f"NaN: {exc}\n{text}" + how, pytrace=False)
    values = {s.labels.get("cache"): s.value for s in parsed}
    for name, _, value in SPECIAL:
        got = values.get(name)
        right = got is not None and (math.isnan(got) if math.isnan(value) else got == value)
        assert right, (
            f"the sample cache_hit_ratio{{cache=\"{name}\"}} = {name} parsed back as "
            f"{str(got)[:40]}{'...' if len(str(got)) > 40 else ''} "
            f"(the text render() wrote: {text!r}), expected {value}" + how)
        # Python's float() reads 400 digits as inf; Prometheus' ParseFloat refuses them
        written = next((line.rsplit(" ", 1)[-1] for line in text.splitlines()
                        if f'cache="{name}"' in line), "")
        assert not math.isinf(value) or written.lower().lstrip("+-") in ("inf", "infinity"), (
            f"the sample cache_hit_ratio{{cache=\"{name}\"}} = {name} was written as "
            f"{written[:40]!r}{'...' if len(written) > 40 else ''} ({len(written)} "
            f"characters), expected {'+Inf' if value > 0 else '-Inf'}" + how)


def test_prometheus_ingests_it(learner: Any, prometheus: Any) -> None:
    with _exporter(_rendered(learner, FAMILIES)) as (address, _publish):
        job = prometheus.scrape(address)
        prometheus.wait_for_scrapes(job)
        for family in FAMILIES:
            series = prometheus.query(f'{_sample_name(family)}{{job="{job}"}}')
            if not series:
                names = sorted({r["metric"]["__name__"] for r in prometheus.query(
                    f'{{job="{job}",__name__=~"{family["name"]}.*"}}')})
                pytest.fail(
                    f"Prometheus stored no {_sample_name(family)} series (it has {names}): "
                    + ("a counter's samples are named <name>_total - prometheus_client's "
                       "parser adds the suffix for you, Prometheus stores what you wrote"
                       if family["type"] == "counter" else "write its samples"),
                    pytrace=False)
            seen = sorted((sorted(_own_labels(r["metric"]).items()), float(r["value"][1]))
                          for r in series)
            want = sorted((sorted(s["labels"].items()), float(s["value"]))
                          for s in family["samples"])
            assert seen == want, (
                f"Prometheus stored {_sample_name(family)} as {seen}, expected {want}")


def _help_why(seen: str, want: str) -> str:
    if seen != want and "\n".join(want.splitlines()) in (seen, seen.rstrip("\n")):
        return ("characters other than the line feed became line feeds, or a trailing line "
                "feed was lost: str.splitlines() splits at \\r, \\x0c, \\x85, \\u2028 and "
                "more, and drops the last line feed - in HELP text replace exactly the "
                "backslash and the line feed, and leave every other character as it is")
    if '\\"' in seen:
        return ("a double quote came back with a backslash: in HELP text escape only the "
                "backslash (\\\\) and the line feed (\\n) - a quote is written as it is")
    if seen.replace("\n", "\\n") == want.replace("\n", "\\n") or "\\\\" in seen:
        return ("a backslash in the HELP text was not escaped first, so '\\n' in the text "
                "reads back as a line feed (or an escape was escaped twice): replace the "
                "backslash with \\\\ FIRST, then the line feed with \\n")
    return ("in HELP text escape the backslash (\\\\) first, then the line feed (\\n); "
            "nothing else")


def _own_labels(metric: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metric.items() if k not in ("__name__", "job", "instance")}


def _counters(a: int, b: int) -> list[dict[str, Any]]:
    return [{"name": "http_requests", "type": "counter", "help": "Requests served.",
             "samples": [{"labels": {"worker": "a"}, "value": a},
                         {"labels": {"worker": "b"}, "value": b}]}]


# Jobs named like the test's (checkout.<token>), exporting the same http_requests_total and
# serving their own requests while the workers are counted: a query that selects one of them
# too counts its requests. (name, given the token; how a query selects it too; requests)
LOOK_ALIKES = (
    ("checkout-{}", "a regex matcher (job=~) reads the '.' in the name as any character",
     100000),
    ("checkout.{}-canary", "a regex or prefix match takes every job whose name begins with "
     "the job's", 10000000),
)


def _check_query_shapes(module: Any, window: str) -> None:
    for what in ("total_increase", "per_second"):
        query = getattr(module, what)("checkout_7", window)
        assert isinstance(query, str), f"{what}() returned {type(query).__name__}, not PromQL"
        assert f"[{window}" in query.replace(" ", ""), (
            f"{what}('checkout_7', {window!r}) = {query!r} has no range [{window}]: the "
            "window is the caller's (a dashboard's range), put it in the range selector "
            "instead of a fixed one")
        assert 'job="checkout_7"' in query.replace(" ", "") or "checkout_7" in query, (
            f"{what}('checkout_7', {window!r}) = {query!r} does not select job "
            "\"checkout_7\": every job exports http_requests_total - filter on "
            '{job="<job>"}, or the sum counts every service Prometheus scrapes')


def _counter_text(value: int) -> str:
    return f'# TYPE http_requests_total counter\nhttp_requests_total{{worker="a"}} {value}\n'


def test_queries_count_across_a_counter_reset(learner: Any, prometheus: Any) -> None:
    """Worker a has served 10000 requests, b 5000; each step a serves 100 more and b 50.
    At the seventh step b restarts: its counter starts again from 0 (it served none yet).
    1750 requests in all, and Prometheus holds every value the counters had. Meanwhile
    jobs named like this one (LOOK_ALIKES) serve 100000 and 10000000: the queries are about
    `job` only, selected by its exact name."""
    module = learner.load("exposition")
    window = "317s"  # longer than the test; an odd length, so a fixed window shows
    _check_query_shapes(module, window)
    token = secrets.token_hex(3)
    job, others = f"checkout.{token}", [name.format(token) for name, _, _ in LOOK_ALIKES]
    a, b, served = 10000, 5000, 0
    with ExitStack() as stack:
        address, publish = stack.enter_context(_exporter(_rendered(learner, _counters(a, b))))
        lookalikes = [stack.enter_context(_exporter(_counter_text(0))) for _ in others]
        prometheus.scrape(address, job=job)
        for name, (other, _) in zip(others, lookalikes, strict=True):
            prometheus.scrape(other, job=name)
        for name in (*others, job):
            prometheus.wait_for_scrapes(name)
        for step in range(12):
            a += 100
            b = 0 if step == 6 else b + 50
            served += 100 + (50 if step != 6 else 0)
            publish(module.render(_counters(a, b)))
            prometheus.wait_for_scrapes(job)
        for (_, publish_other), (_, _, requests) in zip(lookalikes, LOOK_ALIKES, strict=True):
            publish_other(_counter_text(requests))
        for name in others:
            prometheus.wait_for_scrapes(name)
        at = time.time()
        for what, query, scale in (
                ("total_increase", module.total_increase(job, window), 1.0),
                ("per_second", module.per_second(job, window), 317.0)):
            result = _evaluated(prometheus, f"{what}({job!r}, {window!r})", query, at)
            assert len(result) == 1, (
                f"{what}({job!r}, {window!r}) = {query!r} gave {len(result)} series, expected "
                "one number for the whole job: "
                + ("it selects no series - the job matcher must name the job it is given, "
                   f'exactly: {{job="{job}"}}' if not result else "sum() across the workers"))
            value = float(result[0]["values"][0][1]) * scale
            # Prometheus extrapolates increase() and rate() a little past the first and last
            # samples of a series that starts inside the window: a few percent here.
            assert math.isfinite(value) and served * 0.95 <= value <= served * 1.35, (
                f"{what}: {query!r} reads {value:.0f} requests over the test, the workers "
                f"of job {job} served {served} (worker b restarted half-way, its counter back "
                "to 0; jobs named like it served 100000 and 10000000 meanwhile): "
                + (_jobs_seen(prometheus, what, value / scale, (job, others, window), at)
                   or _why(query, value, served)))
        _per_second_over_any_window(module, prometheus, job)


def _evaluated(prometheus: Any, call: str, query: str, at: float) -> list[dict[str, Any]]:
    """The query evaluated at ``at``; a query Prometheus cannot parse fails naming why."""
    try:
        return cast(list[dict[str, Any]], prometheus.query_range(query, at, at, 1))
    except pytest.fail.Exception as exc:
        regex = "=~" in query.replace(" ", "")
        pytest.fail(f"{call} = {query!r}: Prometheus cannot parse it - "
                    + ("the job is a regex (job=~) whose escapes (\\.) were pasted between "
                       "quotes as they are, and a PromQL string reads Go's escapes: escape "
                       "the name for the regex (re.escape), THEN write that as a PromQL "
                       "string" if regex else "the job is not written as a PromQL string")
                    + f" ({exc})" + STRING_ESCAPES, pytrace=False)


def _jobs_seen(prometheus: Any, what: str, value: float,
               jobs: tuple[str, list[str], str], at: float) -> str:
    """Which jobs' requests the learner's figure is the sum of, asked of Prometheus at the
    same instant: the job with some of its look-alikes, or every job it scrapes."""
    job, others, window = jobs
    fn = "increase" if what == "total_increase" else "rate"
    for size in range(len(others), 0, -1):
        for chosen in itertools.combinations(range(len(others)), size):
            names = [job, *(others[i] for i in chosen)]
            alternatives = "|".join(re.escape(name) for name in names)
            expr = (f"sum({fn}(http_requests_total"
                    f"{{job=~{json.dumps(alternatives)}}}[{window}]))")
            if _same(prometheus.query_range(expr, at, at, 1), value):
                return (f"that is the sum over jobs {names!r}: it selects "
                        + " and ".join(f"{others[i]!r} ({LOOK_ALIKES[i][1]})" for i in chosen)
                        + f" - select the job's own series, matched by its exact name: "
                        f'{{job="{job}"}}')
    everything = f"sum({fn}(http_requests_total[{window}]))"
    if _same(prometheus.query_range(everything, at, at, 1), value):
        return ("that is the sum over every job Prometheus scrapes (the jobs named like it "
                "too): the query has no job matcher - select the job's series only, "
                'http_requests_total{job="<job>"}')
    return ""


def _same(result: list[dict[str, Any]], value: float) -> bool:
    return len(result) == 1 and bool(result[0]["values"]) and math.isclose(
        float(result[0]["values"][0][1]), value, rel_tol=1e-9)


# PromQL durations a dashboard sends: units concatenated largest first, ms distinct from m.
# (window, its length in seconds)
WINDOWS = (("5m17s", 317), ("317000ms", 317), ("1h5m", 3900), ("2m", 120))


def _per_second_over_any_window(module: Any, prometheus: Any, job: str) -> None:
    """per_second(job, w) must be the job's rate over the WHOLE window w, for every PromQL
    duration: evaluated at one instant beside sum(rate(...[w])), the two agree."""
    at = time.time()
    for window, seconds in WINDOWS:
        try:
            query = module.per_second(job, window)
        except Exception as exc:  # noqa: BLE001 - the learner's, reported
            pytest.fail(f"per_second({job!r}, {window!r}) raised {type(exc).__name__}: {exc}: "
                        f"{window} is a PromQL duration ({seconds} s); durations are "
                        "compound (5m17s, 1h5m) and ms is a unit of its own - let "
                        "Prometheus read the window: sum(rate(...[window]))", pytrace=False)
        rate = f"sum(rate(http_requests_total{{job={json.dumps(job)}}}[{window}]))"
        got, want = _side_by_side(prometheus, query, rate, at)
        value = float(got[0]["values"][0][1]) if len(got) == 1 and got[0]["values"] else None
        expected = float(want[0]["values"][0][1])
        assert value is not None and math.isclose(value, expected, rel_tol=1e-6), (
            f"per_second({job!r}, {window!r}) = {query!r} reads {value} requests/s, while the "
            f"job's rate over the whole {window} ({seconds} s), sum(rate(...[{window}])) at "
            f"the same instant, is {expected:g}"
            + (f" ({value / expected:.3f}x): the window's length was misread - "
               if value and expected else ": ")
            + "a PromQL duration is compound (5m17s is 317 s, 1h5m 3900 s) and ms is not m; "
            "dividing an increase by a length parsed from its first number and unit gets "
            "the rate wrong. Use rate() (summed), which divides by the window Prometheus "
            "itself read")


def _side_by_side(prometheus: Any, query: str, rate: str,
                  at: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``query`` and ``rate`` evaluated at ``at`` in ONE query, so both read the same samples:
    two queries in a row can disagree when a scrape begun before ``at`` lands between them."""
    prometheus.query_range(query, at, at, 1)  # a parse error names the learner's query alone
    both = prometheus.query_range(
        f'label_replace({query}, "lr_side", "learner", "", "") or '
        f'label_replace({rate}, "lr_side", "expected", "", "")', at, at, 1)
    sides: dict[str, list[dict[str, Any]]] = {"learner": [], "expected": []}
    for r in both:
        side = r["metric"].pop("lr_side", "")
        if side in sides:
            sides[side].append(r)
    return sides["learner"], sides["expected"]


def _why(query: str, value: float, served: int) -> str:
    compact = query.replace(" ", "")
    if value > 50000:
        return ("that counts another job's requests too: select the job's series only, "
                'http_requests_total{job="<job>"}')
    if "irate(" in compact:
        return ("irate() is the rate between the last two samples only, not over the window: "
                "use rate() (or increase()) over [window]")
    if "offset" in compact or "max_over_time" in compact or "min_over_time" in compact:
        return ("subtracting an older value reads a restart (the counter back to 0) as "
                "negative traffic: increase() and rate() treat a drop as a reset - use them")
    if "delta(" in compact or "deriv(" in compact:
        return ("delta() is for gauges: on a counter a restart reads as a huge negative "
                "change - use increase() or rate(), which treat a drop as a reset")
    if "increase(sum" in compact or "rate(sum" in compact:
        return ("a sum of counters is no counter: when one worker restarts the sum drops, and "
                "increase()/rate() over the sum take that drop for a reset of the whole - "
                "apply increase()/rate() to each series first, then sum()")
    return ("use increase() (or rate() for per second) on http_requests_total, per series, "
            "then sum()")


# Job names the queries must select exactly, whatever they hold: a PromQL string literal
# reads Go's escapes, so a quote or a backslash pasted between quotes as it is ends the
# string early (a parse error) or becomes another character ('C:\new': a line feed); a
# regex matcher (job=~) reads the name's '.', '(' and '\' as regex syntax. Each: the job
# name, what it adds.
JOB_NAMES = {
    "shop.eu (v2)": ("a dot and parentheses: read as a regex (job=~) unescaped, '.' is any "
                     "character and '(v2)' a group"),
    'say "hi"': "a double quote: unescaped, it ends the string early",
    "C:\\jobs\\new": "backslashes: unescaped, '\\j' is no escape and '\\n' a line feed",
    "ends in \\": "a trailing backslash: unescaped, it escapes the closing quote",
    "café ☕": "non-ASCII, as it is or escaped",
    "no\xa0break": ("a no-break space (U+00A0): Python's repr() writes it \\xa0, which Go "
                    "reads as the byte 0xA0, not the character - write it as it is"),
    "launch \U0001F680": ("a character past U+FFFF: JSON's ASCII escapes write it as two "
                          "\\u surrogate halves, which are no Go escape - keep it as it is"),
    "a `tick` here": ("a backtick: a raw `...` string ends at it (and can hold none), so "
                      "backticks quote no name that may hold one"),
}
JOB_MATCHER = re.compile(
    r"""job\s*(=~|=)\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)""")
STRING_ESCAPES = ("\nA PromQL string is read with Go's escapes: escape the backslash first "
                  '(\\\\), then the double quote (\\") and the line feed (\\n) - '
                  "json.dumps(job, ensure_ascii=False) writes exactly such a literal, quotes "
                  "included.")


def _look_alikes(job: str) -> list[str]:
    """Names one character away from ``job`` (each replaced), with a suffix or prefix, cut
    short, in the other case: what a regex matcher that does not read ``job`` literally
    (an unescaped '.', a '.*' after it, a case-insensitive flag) matches too."""
    names = [job[:i] + ("x" if c != "x" else "y") + job[i + 1:] for i, c in enumerate(job)]
    names += [f"{job}-canary", f"canary-{job}", job[:-1], job.swapcase()]
    return list(dict.fromkeys(n for n in names if n != job))


def _regex_selects(prometheus: Any, regex: str, names: list[str]) -> list[str]:
    """The names among ``names`` that the PromQL string literal ``regex`` matches as a label
    matcher does (anchored), asked of Prometheus' own regex engine with label_replace()."""
    series = " or ".join(
        f'label_replace(vector(1), "job", {json.dumps(n.replace("$", "$$"), ensure_ascii=False)}'
        ', "", "")' for n in names)
    result = prometheus.query(f'label_replace({series}, "hit", "1", "job", {regex})')
    return [r["metric"]["job"] for r in result if r["metric"].get("hit") == "1"]


def _job_selection(prometheus: Any, job: str, query: str) -> str:
    """'' when the query's job matcher selects ``job`` and no other name; else what it
    selects instead. The matcher's string is read by Prometheus (as a string expression),
    a regex's matches by its regex engine."""
    found = JOB_MATCHER.search(query)
    if not found:
        return f"selects no job=\"...\" matcher, expected job {job!r}"
    op, literal = found.groups()
    if op == "=":
        text = prometheus.query(literal)[1]
        return "" if text == job else f"selects job {text!r}, expected job {job!r}"
    hits = _regex_selects(prometheus, literal, [job, *_look_alikes(job)])
    if hits == [job]:
        return ""
    others = [name for name in hits if name != job]
    return (f"has a regex matcher job=~{literal} that "
            + ("does not match the job's own name " + repr(job) if job not in hits else
               "matches " + repr(job))
            + (f" and matches other jobs {others[:4]!r}" if others else "")
            + (": job=~ selects every job whose whole name the regex matches - the name "
               "escaped (re.escape) and nothing added" if others else
               ": job=~ reads the name as a regular expression - escape it (re.escape) "
               "before quoting it")
            + ", or match it exactly with job=\"...\"")


def test_queries_select_the_job_whatever_its_name(learner: Any, prometheus: Any) -> None:
    module = learner.load("exposition")
    for job, adds in JOB_NAMES.items():
        for what in ("total_increase", "per_second"):
            query = getattr(module, what)(job, "5m")
            call = f"{what}({job!r}, '5m') = {query!r}"
            regex = "=~" in query.replace(" ", "")
            try:
                prometheus.query(query)
            except pytest.fail.Exception as exc:
                pytest.fail(f"{call}: Prometheus cannot parse it - the job name holds {adds} "
                            f"({exc})" + ("\nThe name is read as a regular expression "
                                          "(job=~): escape it for the regex (re.escape) "
                                          "first, then as a PromQL string" if regex else "")
                            + STRING_ESCAPES, pytrace=False)
            mistake = _job_selection(prometheus, job, query)
            assert not mistake, (
                f"{call} {mistake} (the name holds {adds}): the query is about that job "
                "only" + STRING_ESCAPES)
