"""The docs say what the code does, as a new user reads them.

- every `skyhedge ...` command line README.md and docs/*.md show (and every `plan --json`-style
  mention of one) names a command, subcommand and flags the CLI has;
- the reverse: every command and flag the CLI has, and every spec field, is documented somewhere;
- every relative link and `#anchor` between the docs resolves;
- the JSON fields docs/terraform.md shows for `status --json`, and docs/simulate.md lists for
  `simulate --json`, are the fields those commands print (README's `plan --json` example is
  checked against real output in test_cli_errors.py);
- docs/controller.md's table of `state.json`'s `extra` keys names every key the code keeps there,
  and only those; its metrics table, every metric the watcher serves, and only those;
- README.md lists every benchmark script (DESIGN.md says it does).

Found by walking the docs: docs/terraform.md named a `skyhedge routing status --json` that never
existed (the router status is what `routing up --json` and `routing reload --json` print).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import click
from click.testing import CliRunner

from skyhedge import spec as spec_module
from skyhedge.cli import main
from skyhedge.cli.apply import autoscaler_status, live_rows, quota_status, status_json
from skyhedge.clouds import builtin_clouds
from skyhedge.controller.loop import RootOutage
from skyhedge.controller.presence import WatcherRecord
from skyhedge.spec import load_spec
from skyhedge.state import _EXTRA_RULES, ReplicaRecord, load_state

REPO = Path(__file__).resolve().parents[1]
#: What a user reads for the command line and the spec.
USER_DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
#: Every Markdown file whose links must resolve.
LINKED_DOCS = (*USER_DOCS, REPO / "DESIGN.md", *sorted((REPO / "examples").glob("**/*.md")))

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")
#: Where a shown command line ends: a pipe, a second command, a comment, the end of a code span.
END_OF_COMMAND = {"|", "||", "&&", ";", "#", "&"}


def _ctx() -> click.Context:
    return click.Context(main)


def _commands(
    group: click.Group = main, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every leaf command of the CLI with its path (`("routing", "up")`)."""
    for name in group.list_commands(_ctx()):
        cmd = group.get_command(_ctx(), name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def code_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a fenced block and every inline code span of `path`;
    a table's escaped `\\|` read as the `|` it stands for."""
    text = path.read_text(encoding="utf-8")
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        for offset, line in enumerate(block[1].splitlines()):
            yield first + offset, line.replace("\\|", "|")
    prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    for span in INLINE.finditer(prose.replace("\\|", "\x00")):
        yield prose.count("\n", 0, span.start()) + 1, span[1].replace("\x00", "|")


def shown_command_lines() -> Iterator[tuple[str, tuple[str, bool]]]:
    """(`file:line`, (words after `skyhedge`, whether they start the line)) of every command line
    the user docs show: each
    `skyhedge WORD...` in a code span or block, and each span that starts with a top-level
    command and a flag (`plan --json`, `routing status --json`)."""
    top = "|".join(re.escape(n) for n in main.list_commands(_ctx()))
    starts_with_command = re.compile(rf"^(?:{top})(?: [a-z][\w|-]*)* --?[a-z]")
    for doc in USER_DOCS:
        for line, text in code_texts(doc):
            where = f"{doc.relative_to(REPO)}:{line}"
            if starts_with_command.match(text):
                text = "skyhedge " + text
            # (a line may show two: "`skyhedge up S` finishes them, `skyhedge destroy S` ...")
            for n, words in enumerate(re.split(r"(?<![\w./-])skyhedge\s+", text)[1:]):
                at_start = n == 0 and re.match(r"^\s*(\$ )?(python3? -m )?skyhedge\s", text) is not None
                yield where, (words.split("`")[0], at_start)


def resolve(words: str) -> tuple[list[click.Command], list[str], str | None]:
    """The command(s) `words` name (`routing up|reload` names two), the words after them, and
    what is wrong with the command path (None: nothing)."""
    tokens = words.replace("[", " ").replace("]", " ").split()
    for i, token in enumerate(tokens):
        if token in END_OF_COMMAND:
            tokens = tokens[:i]
            break
    cmds: list[click.Command] = [main]
    while tokens and all(isinstance(c, click.Group) for c in cmds):
        names = tokens[0].split("|")
        found = [c.get_command(_ctx(), n) for c in cmds for n in names]  # type: ignore[attr-defined]
        if any(f is None for f in found):
            if cmds == [main] or not re.fullmatch(r"[a-z][\w|-]*", tokens[0]):
                return [], tokens, None  # not a command at all: prose that says "skyhedge"
            return [], tokens, f"no subcommand {tokens[0]!r}"
        cmds, tokens = [f for f in found if f is not None], tokens[1:]
    return cmds, tokens, None


def test_every_command_line_the_docs_show_names_commands_and_flags_that_exist():
    wrong = []
    for where, (words, at_start) in shown_command_lines():
        cmds, rest, problem = resolve(words)
        if problem:
            wrong.append(f"{where}: `skyhedge {words}`: {problem}")
            continue
        if not cmds:
            if at_start and rest and re.fullmatch(r"[a-z][\w-]*", rest[0]):
                wrong.append(f"{where}: `skyhedge {words}`: no command {rest[0]!r}")
            continue
        if any(isinstance(c, click.Group) for c in cmds):
            continue  # a group named alone (`skyhedge catalog`)
        known = set().union(*(_options(c) for c in cmds)) | {"--help"}
        wrong += [
            f"{where}: `skyhedge {words}`: no {flag}"
            for token in rest
            for flag in FLAG.findall(token)
            if flag not in known
        ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_command_or_flag_that_does_not_exist():
    """The test above can fail: what it reads of a made-up line is wrong where it should be."""
    assert resolve("routing status SPEC --json")[2] == "no subcommand 'status'"
    cmds, rest, problem = resolve("routing up|reload SPEC [--probe] [--json] | jq .pid")
    assert (
        problem is None
        and [c.name for c in cmds] == ["up", "reload"]
        and rest == ["SPEC", "--probe", "--json"]
    )
    cmds, rest, _ = resolve("logs SPEC r-0001 -f/--follow --tail all")
    assert {f for t in rest for f in FLAG.findall(t)} - _options(cmds[0]) == set()
    cmds, rest, _ = resolve("plan SPEC --jsn")
    assert {f for t in rest for f in FLAG.findall(t)} - _options(cmds[0]) == {"--jsn"}
    # and it reads the docs' command lines at all: every user doc but policy.md shows some
    read = {where.split(":")[0] for where, _ in shown_command_lines()}
    assert read >= {str(doc.relative_to(REPO)) for doc in USER_DOCS if doc.name != "policy.md"}


def test_every_command_and_flag_of_the_cli_is_documented():
    text = "\n".join(doc.read_text(encoding="utf-8") for doc in USER_DOCS).replace("\\|", "|")
    missing = []
    for path, cmd in _commands():
        # `skyhedge routing up`, or among alternatives: `skyhedge routing up|reload`
        shown = (
            rf"skyhedge {' '.join(path[:-1])}{' ' if len(path) > 1 else ''}(?:[\w-]+\|)*{path[-1]}(?![\w-])"
        )
        if not re.search(shown, text):
            missing.append(f"skyhedge {' '.join(path)}")
        missing += [
            f"skyhedge {' '.join(path)} {opt}"
            for opt in sorted(_options(cmd))
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text)
        ]
    missing += [f"skyhedge {opt}" for opt in sorted(_options(main)) if opt not in text]
    assert not missing, "documented nowhere in README.md or docs/: " + ", ".join(missing)


def _spec_sections() -> dict[str, type]:
    """Spec section path -> its dataclass, found from ServiceSpec down (`service.router` too), and
    each built-in cloud's own section (`aws`, `gcp`), which its cloud folder owns."""
    found: dict[str, type] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if cls is spec_module.ServiceSpec and f.name == "cloud_sections":
                for key, section in spec_module.cloud_spec_sections().items():
                    if key in builtin_clouds():  # (a plug-in a test left registered is not ours to document)
                        found[key] = section.config
                        walk(section.config, f"{key}.")
                continue
            inner = next(
                (
                    c
                    for c in vars(spec_module).values()
                    if isinstance(c, type)
                    and dataclasses.is_dataclass(c)
                    and re.search(rf"\b{c.__name__}\b", str(f.type))
                ),
                None,
            )
            if inner is not None:
                found[f"{prefix}{f.name}"] = inner
                walk(inner, f"{prefix}{f.name}.")

    walk(spec_module.ServiceSpec, "")
    return found


def documented_spec_fields() -> set[str]:
    """The field paths docs/spec.md's table names: `a.b`, and `a.b`, `c` for a row naming two."""
    names = set()
    for row in re.findall(r"^\| (`[^|]*`) \|", (REPO / "docs/spec.md").read_text(encoding="utf-8"), re.M):
        prefix = ""
        for name in re.findall(r"`([^`]+)`", row):
            if "." in name:
                prefix = name.rsplit(".", 1)[0] + "."
                names.add(name)
            else:
                names.add(prefix + name)
    return names


def test_every_spec_field_is_in_the_spec_reference_and_every_documented_one_exists():
    sections = _spec_sections()
    documented = documented_spec_fields()
    fields = {
        f.name
        for f in dataclasses.fields(spec_module.ServiceSpec)
        if f.name not in {"source", "cloud_sections"}
    }
    fields |= {f"{path}.{f.name}" for path, cls in sections.items() for f in dataclasses.fields(cls)}
    fields -= set(sections)  # a section is documented through its fields
    assert fields - documented == set(), "spec fields docs/spec.md does not document"
    assert documented - fields - set(sections) == set(), "docs/spec.md documents fields the spec lacks"
    assert {"service.router.status_port", "service.tls.keyfile", "aws.public_ip", "gcp.project"} <= fields


def github_anchor(heading: str) -> str:
    """The `#anchor` GitHub gives a heading: lowercase, punctuation dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, re.M):
        slug = github_anchor(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in LINKED_DOCS:
        text = FENCE.sub(lambda m: "\n" * m[0].count("\n"), doc.read_text(encoding="utf-8"))
        for link in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = link[1]
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            where = f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, link.start()) + 1}"
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file) if file else doc
            if not dest.exists():
                broken.append(f"{where}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: {target}: no such heading in {dest.name}")
    assert not broken, "\n".join(broken)


def test_anchors_are_the_ones_github_makes():
    assert github_anchor("HTTPS (`service.tls`)") == "https-servicetls"
    assert github_anchor("When `state.json` is written") == "when-statejson-is-written"
    assert github_anchor("### `skyhedge up SPEC`".lstrip("# ")) == "skyhedge-up-spec"


def _json_example(doc: str, after: str) -> dict:
    text = (REPO / doc).read_text(encoding="utf-8")
    block = re.search(rf"{re.escape(after)}\s*```json\n(.*?)```", text, re.S)
    assert block, f"{doc}: no JSON example after {after!r}"
    return json.loads(block[1].replace("[...]", "[]"))


def test_the_status_json_example_has_the_fields_status_json_prints(tmp_path):
    example = _json_example("docs/terraform.md", "`status --json` prints one object:")
    spec = load_spec(REPO / "examples/local-echo/service.yaml")  # autoscaling on
    state = load_state(tmp_path, spec.name)
    state.replicas["r-0001"] = ReplicaRecord("r-0001", "local", "local", "local-a", "spot", 0.0)
    printed = status_json(spec.name, live_rows(state), None, None, None, None, autoscaler_status(spec, state))
    assert set(example) == set(printed)
    assert set(example["replicas"][0]) == set(printed["replicas"][0])
    assert set(example["autoscaler"]) == set(printed["autoscaler"])
    assert set(example["watcher"]) == {f.name for f in dataclasses.fields(WatcherRecord)}
    assert set(example["watcher"]["last_reload"]) == {"at", "outcome", "text", "requests"}


QUOTA_SPEC = """
name: svc
placement: {clouds: [aws], zones: [usw2-az1, usw2-az2]}
resources: {instance_type: {aws: g5.xlarge}}
replica_policy: {min_replicas: 2}
run: {command: "true"}
"""


def test_the_status_json_examples_failing_root_and_quota_have_the_fields_the_watcher_keeps(
    tmp_path, write_spec
):
    """The entries of `failing_roots` and `quota` are the watcher's own records: a root's
    `RootOutage`, and the quota entry a launch refused over quota leaves (over the fakes)."""
    from controller_fakes import Clock, FakeExecutor, clocked_controller

    example = _json_example("docs/terraform.md", "`status --json` prints one object:")
    (root,) = example["failing_roots"].values()
    assert set(root) == set(RootOutage(0.0, 1, 0.0, "x").to_json())
    clock, ex = Clock(), FakeExecutor()
    ex.quota = {("us-west-2", "spot"): 0}
    ctl = clocked_controller(load_spec(write_spec(QUOTA_SPEC)), tmp_path / "state", clock, executor=ex)
    for _ in range(5):
        clock.advance(max(0.05, ctl.tick()))
    printed = quota_status(ctl.state)
    assert printed, "the fakes refused no launch over quota"
    assert [set(e) for e in example["quota"]] == [set(printed[0])]


def _field_table(doc: str, heading: str) -> set[str]:
    """The backticked names in the first column of the first table under `heading`."""
    text = (REPO / doc).read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    table = re.search(r"^\|.*?(?=\n\n)", section, re.S | re.M)
    assert table, f"{doc}: no table under {heading}"
    rows = re.findall(r"^\| ([^|]*) \|", table[0], re.M)
    return {name for row in rows for name in re.findall(r"`([\w]+)`", row)}


def test_simulate_json_prints_exactly_the_fields_docs_simulate_lists(tmp_path):
    trace = tmp_path / "calm.csv"
    trace.write_text(
        "seconds,us-east-1a,us-east-1b\n" + "".join(f"{i * 300},{i % 7 and 4},4\n" for i in range(40))
    )
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({z: {"spot": 1.0, "ondemand": 3.0} for z in ("us-east-1a", "us-east-1b")}))
    args = ["simulate", "--trace", str(trace), "--policy", "spothedge,skyhedge,optimal", "--repeats", "2"]
    args += ["--ticks", "60", "--latency", "--prices", str(prices), "--json"]
    result = CliRunner().invoke(main, args, prog_name="skyhedge")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    printed = set().union(*rows)
    assert printed == _field_table("docs/simulate.md", "## JSON output")
    judged = [row["vs_spothedge"] for row in rows if "vs_spothedge" in row]
    assert judged and set(judged[0]) == _field_table("docs/simulate.md", "## The SpotHedge bar")


def _extra_keys_the_code_keeps() -> set[str]:
    """Every key skyhedge reads or writes in a state's `extra`: `state.extra[...]`,
    `.get(...)`, `.pop(...)`, `.setdefault(...)` with a literal or a `*_KEY` constant."""
    sources = {p: p.read_text(encoding="utf-8") for p in (REPO / "skyhedge").rglob("*.py")}
    names: dict[str, str] = {}
    for text in sources.values():
        names.update(re.findall(r'^([A-Z][A-Z0-9_]*_KEY)(?:: \w+)? = "([\w-]+)"', text, re.M))
    for text in sources.values():  # an alias: `EXTRA_KEY = TERRAFORM_KEY`
        for alias, name in re.findall(r"^([A-Z][A-Z0-9_]*_KEY) = ([A-Z][A-Z0-9_]*_KEY)$", text, re.M):
            names.setdefault(alias, names[name])
    access = re.compile(
        r'\b(?:state|st)\.extra(?:\.get|\.pop|\.setdefault)?[\[(]\s*(?:"([\w-]+)"|([A-Z]\w*))'
    )
    keys, unknown = set(), set()
    for path, text in sources.items():
        for literal, constant in access.findall(text):
            if literal or constant in names:
                keys.add(literal or names[constant])
            else:
                unknown.add(f"{path.relative_to(REPO)}: {constant}")
    assert not unknown, f"extra keys this test cannot resolve: {sorted(unknown)}"
    return keys


def test_the_state_extra_table_names_every_key_the_code_keeps_and_only_those():
    documented = _field_table("docs/controller.md", "## State the controller keeps") - {"extra"}  # (header)
    kept = _extra_keys_the_code_keeps()
    assert set(_EXTRA_RULES) <= kept  # (the scan sees every key the loader checks)
    assert documented == kept, (
        f"undocumented: {sorted(kept - documented)}; no such key: {sorted(documented - kept)}"
    )


def test_the_metrics_table_names_every_metric_the_watcher_serves_and_only_those():
    documented = _field_table("docs/controller.md", "## Metrics")
    source = (REPO / "skyhedge" / "controller" / "metrics.py").read_text(encoding="utf-8")
    served = set(re.findall(r'"(skyhedge_[a-z_]+)"', source))
    assert "skyhedge_root_failing" in served  # (the scan sees the families)
    assert documented == served, (
        f"undocumented: {sorted(served - documented)}; no such metric: {sorted(documented - served)}"
    )


def test_readme_lists_every_benchmark():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert scripts and not {s for s in scripts if f"{s}`" not in readme}
