"""GitOps mode: instead of applying, write the re-rendered tree into a git working copy and commit.

For teams whose CI applies Terraform: `skyhedge watch SPEC --gitops REPO_DIR` keeps reacting to
preemptions, but its output is a commit on the checked-out branch of REPO_DIR (push it, or let a
CI job pick it up). The tree goes to `REPO_DIR/infra/` (the layout of examples/gitops); when the
state dir is inside the repository too, its `state.json` is committed with the tree, and so is
the spec file when it lies in the repository: each commit holds everything CI needs to render
that very tree again. The commit message says what changed since the last commit that landed
(replicas created and removed, what was preempted, a spec reload), the new layout and the cost
change. A plan that changes nothing writes an identical tree, so git sees no change and no
commit is made.

Replicas are recorded as provisioned (and, by the controller's `assume_ready`, READY) once
committed: the watcher cannot probe what CI has not applied yet, and counting them as missing
would make the policy buy on-demand fallback on every tick. The state records the mode
(`service.set_gitops`), so that `compute_plan` (the watcher's, and `plan`/`render` in CI) runs the
policy without on-demand fallback and lets the policy and a rolling update count a committed
replica as READY only once the readiness probe's initial delay has passed. A root a commit
empties stays rendered for a while (`apply.roots_with_resources`): nothing tells the watcher when
CI has applied it.
Preemptions still arrive from the clouds' event sources.

The user shares the working copy: while HEAD is detached or a rebase, merge, cherry-pick or
revert waits for them (`git pull --rebase` stopped on a conflict), the watcher neither writes
the tree nor commits; the commit it owes is made at the first pass after that.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from skyhedge.apply import Workspace, instance_types, roots_with_resources
from skyhedge.controller.ports import ExecResult
from skyhedge.errors import RenderError, SkyhedgeError, StateError
from skyhedge.planner import CREATE, DELETE, Plan, replica_order
from skyhedge.render import render_tree, write_tree
from skyhedge.render.tree import TREE_MANIFEST, RenderedTree, git_repository_in, holds_only_litter
from skyhedge.service import GITOPS_KEY, Placement, resolve_placement
from skyhedge.spec import ServiceSpec, load_spec, spec_changes
from skyhedge.state import STATE_FILE, ServiceState, save_state

DEFAULT_SUBDIR = "infra"  # examples/gitops: infra/ holds the tree, state/ the state dir
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
_GIT_TIMEOUT = 60.0
#: What the state dir holds besides state.json, none of which belongs in a commit: the lock,
#: the running watcher's record (pid, absolute spec path), Terraform's and the local cloud's files,
#: and nginx's (`router/`: only where the state was ever used to apply, not under GitOps).
UNCOMMITTED = "state.lock, watcher.json, tf/, local/ and router/"
#: What git keeps in its dir while an operation waits for the user (a conflict to resolve).
_IN_PROGRESS = (
    ("rebase-merge", "a rebase"),
    ("rebase-apply", "a rebase (or `git am`)"),
    ("MERGE_HEAD", "a merge"),
    ("CHERRY_PICK_HEAD", "a cherry-pick"),
    ("REVERT_HEAD", "a revert"),
)
#: `state.extra["gitops"]` keys describing the last commit that landed (the next message's base).
_COMMIT_KEYS = ("committed_at", "hourly_cost", "layout")


def _subcommand(args: Sequence[str]) -> str:
    """The git subcommand in `args` (after any `-c key=value`). An error names it and nothing
    else of the command line, which holds the whole commit message."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "-c":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return "?"


def _reason(output: str) -> str:
    """The line of git's output that says what went wrong: its first `fatal:` or `error:` line
    (without the prefix), else its first line (a hook's own words). Git follows it with lines of
    advice, and an error here is one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        for prefix in ("fatal:", "error:"):
            if line.startswith(prefix):
                return line[len(prefix) :].strip()[:300]
    return lines[0][:300] if lines else "no output"


def git(
    repo: Path, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run git in `repo`; with `check`, a failure is a one-line StateError naming the subcommand."""
    env = {**os.environ, **_GIT_ENV}
    sub = _subcommand(args)
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=_GIT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:  # its text is the whole command line: the commit message too
        raise StateError(f"gitops: git {sub} in {repo}: no answer within {_GIT_TIMEOUT:g} s") from None
    except (OSError, subprocess.SubprocessError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise StateError(f"gitops: git {sub} in {repo}: {why}") from exc
    if check and done.returncode != 0:
        raise StateError(f"gitops: git {sub} in {repo} failed: {_reason(done.stderr or done.stdout)}")
    return done


def check_repo(repo: Path) -> Path:
    """REPO_DIR must be a git working copy (its top level or a folder inside one)."""
    if not repo.is_dir():
        raise StateError(f"{repo}: --gitops expects a git working copy (directory not found)")
    done = git(repo, "rev-parse", "--show-toplevel", check=False)
    if done.returncode != 0:
        raise StateError(
            f"{repo}: --gitops expects a git working copy (`git init` it or clone your repository)"
        )
    return Path(done.stdout.strip())


def branch_problem(top: Path) -> str | None:
    """Why no commit may be made in `top` now (None: one may). A commit goes to the checked-out
    branch: not onto a detached HEAD, and not while a rebase, merge, cherry-pick or revert waits
    for the user (writing the tree would replace a conflicted `infra/`, and `git add` would mark
    the conflict resolved without anyone resolving it)."""
    args = [a for name, _ in _IN_PROGRESS for a in ("--git-path", name)]
    done = git(top, "rev-parse", *args, check=False)
    if done.returncode == 0:
        for (_, what), path in zip(_IN_PROGRESS, done.stdout.splitlines(), strict=False):
            if (top / path).exists():
                return f"{what} is in progress"
    if git(top, "symbolic-ref", "-q", "HEAD", check=False).returncode != 0:
        return "HEAD is detached"
    return None


def _check_tree_dir(out: Path, where: str, state_dir: Path, service: str) -> None:
    """`--gitops-path` must name a folder the tree may own, checked at start: found only when
    the first tree was written, it failed every pass as "apply failed" (with backoff, for ever)
    while each pass still recorded its plan. A folder that is absent, empty or a skyhedge tree of
    this service may be replaced by the tree; a file, the state dir, or any other folder not."""
    flag = f"--gitops-path {where}"
    if out == state_dir or out.is_relative_to(state_dir) or state_dir.is_relative_to(out):
        raise StateError(
            f"{flag}: {out} is, holds or lies in the state dir {state_dir}: the tree needs a "
            f"folder of its own (default: {DEFAULT_SUBDIR})"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise StateError(f"{flag}: {out} is a file, not a folder: name a folder for the tree")
    try:
        empty = holds_only_litter(out)  # (a `.DS_Store` Finder left: still a new folder)
    except OSError as exc:
        raise StateError(f"{flag}: {out}: cannot read the folder ({exc.strerror or exc})") from exc
    if empty:
        return
    manifest = out / TREE_MANIFEST
    if not manifest.is_file():
        raise StateError(
            f"{flag}: {out} is not empty and holds no skyhedge-rendered tree (no {TREE_MANIFEST}): "
            "name a new or empty folder for the tree"
        )
    repo = git_repository_in(out)
    if repo is not None:
        raise StateError(f"{flag}: {repo}; name a folder of its own for the tree")
    try:
        owner = json.loads(manifest.read_text(encoding="utf-8")).get("service")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner is not None and owner != service:
        raise StateError(
            f"{flag}: {out} holds the tree of service {owner!r}, not {service!r}: give each "
            "service a folder of its own"
        )


def layout_of(plan: Plan) -> dict[str, list[str]]:
    """The replicas a tree of `plan` holds: ID -> [location, market]. Recorded with each commit,
    so the next message says what changed since the last commit that landed, whatever passes
    ran (and commits failed) in between."""
    return {r.id: [r.location.key, r.market.value] for r in plan.desired}


def commit_message(
    service: str,
    plan: Plan,
    state: ServiceState,
    since: float | None,
    before: float | None,
    *,
    committed: Mapping[str, Sequence[str]] | None = None,
    reloads: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """Subject: what the commit changes; body: spec reloads, zone events, the new layout and
    the cost change, all since the last commit that landed.

    `committed` is that commit's layout (`layout_of`): created and removed replicas are the
    difference with `plan.desired` (without one, the plan's own actions). The subject follows
    them, not the zone events: a spec edit after an unrelated preemption is not a move off the
    preempted zone. `reloads` are the spec changes taken since (named in the body)."""
    lost = [
        h
        for h in state.history
        if h.get("event") in {"preempted", "launch_failed"}
        and (since is None or float(h.get("at", 0)) > since)
    ]
    if committed is None:
        creates = [(r.id, r.location.key, r.market.value) for r in plan.replicas if r.action == CREATE]
        deletes = [(r.id, r.location.key, r.market.value) for r in plan.replicas if r.action == DELETE]
    else:
        desired = {r.id: r for r in plan.desired}
        creates = [
            (rid, desired[rid].location.key, desired[rid].market.value)
            for rid in sorted(desired, key=replica_order)
            if rid not in committed
        ]
        deletes = [
            (rid, str(where[0]), str(where[1]))
            for rid in sorted(committed, key=replica_order)
            if rid not in desired and isinstance(where := committed[rid], (list, tuple)) and len(where) == 2
        ]
    s = plan.summary()
    # taken by the cloud: named by a zone event since the last commit, or recorded so (an event
    # dated before that commit but delivered after it, as a late SQS message may be)
    taken = {str(h["replica_id"]) for h in lost if h.get("replica_id")}
    taken |= {d[0] for d in deletes if getattr(state.replicas.get(d[0]), "reason", None) == "preempted"}
    lost_at = {str(h.get("location")) for h in lost}
    replaced = [d[0] for d in deletes if d[0] in taken]
    moved_off = sorted({d[1] for d in deletes if d[0] not in taken and d[1] in lost_at})
    if creates and replaced:
        subject = f"replace preempted {', '.join(replaced)}"
    elif creates and moved_off:
        subject = f"move off preempted {', '.join(moved_off)}"
    elif creates and not deletes:
        subject = f"scale to {len(plan.desired)} replicas"
    elif deletes and not creates:
        subject = f"remove {', '.join(d[0] for d in deletes)}"
    elif creates:
        subject = f"replace {', '.join(d[0] for d in deletes)}"
    else:
        subject = f"re-render ({s['spot']} spot / {s['on_demand']} on-demand)"
    lines = [f"skyhedge: {service}: {subject}", ""]
    if reloads:
        lines += [f"Spec reloaded: {'; '.join(reloads)}", ""]
    if notes:
        lines += [*notes, ""]
    if lost:
        lines.append("Preempted:")
        for h in lost:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(h.get("at", 0))))
            what = "launch refused" if h.get("event") == "launch_failed" else "preempted"
            lines.append(f"  {h.get('replica_id') or 'zone'} in {h.get('location', '?')} ({what} at {when})")
        lines.append("")
    zones = Counter((r.location.key, r.market.value) for r in plan.desired)
    zones_used = f"{s['zones_used']} zone{'' if s['zones_used'] == 1 else 's'}"
    lines.append(f"New layout ({s['spot']} spot, {s['on_demand']} on-demand, {zones_used}):")
    for (where, market), n in sorted(zones.items()):
        lines.append(f"  {n} x {market} in {where}")
    for rid, where, market in creates:
        lines.append(f"  + {rid} {where} {market}")
    for rid, where, market in deletes:
        lines.append(f"  - {rid} {where} {market}")
    lines.append("")
    after = float(s["hourly_cost"])
    if before is None:
        lines.append(f"Cost: ${after:.4f}/h (on-demand only: ${s['ondemand_only_hourly_cost']:.4f}/h)")
    else:
        lines.append(
            f"Cost: ${before:.4f}/h -> ${after:.4f}/h ({after - before:+.4f}; on-demand only: "
            f"${s['ondemand_only_hourly_cost']:.4f}/h)"
        )
    return "\n".join(lines) + "\n"


def _root_of(name: str, rel: str) -> str | None:
    """The root (`cloud/region`) a changed file of the tree at `rel` belongs to, if any."""
    parts = name[len(rel) + 1 :].split("/")
    return "/".join(parts[:2]) if len(parts) == 3 and parts[0] != "modules" else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class GitOpsExecutor:
    """`Executor` that renders into `repo/subdir` and commits instead of running Terraform.

    `apply` renders and stages the tree and records the layout CI will apply in the state;
    `finish`, called by the controller once the pass has saved the state, commits the tree
    together with that final `state.json` (and the spec file, when it lies in the repository),
    so the working copy is clean right after a commit and CI re-renders from exactly what the
    watcher ended the pass with. What the message compares with (`_COMMIT_KEYS`) is recorded
    only for a commit that lands: a failed commit is retried by the next pass with everything
    that changed since the last one that did.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        state_dir: Path,
        repo: Path,
        *,
        subdir: str | None = None,
        placement: Placement | None = None,
        clock: Callable[[], float] = time.time,
        at_start: bool = True,
    ) -> None:
        """`at_start`: refuse a detached HEAD or an operation in progress (the watcher's start).
        A spec reload builds its executor with False: `apply` and `finish` wait those out, and a
        reload refused for them was never retried once the branch was back (the file had not
        changed again), so an edit pulled in by `git pull --rebase` was silently never taken."""
        self.spec = spec
        self.top = check_repo(Path(repo))
        where = subdir if subdir is not None else DEFAULT_SUBDIR
        self.out = (Path(repo) / where).resolve()
        if self.out == self.top:
            raise StateError(
                f"{repo}: --gitops writes the tree into a folder of the repository, not its top level"
            )
        if not self.out.is_relative_to(self.top) or self.out.is_relative_to(self.top / ".git"):
            raise StateError(
                f"--gitops-path {where}: must name a folder inside the repository {self.top} "
                "(and not inside .git)"
            )
        self.workspace = Workspace(spec, state_dir)
        _check_tree_dir(self.out, where, self.workspace.state_dir, spec.name)
        blocked = branch_problem(self.top) if at_start else None
        if blocked == "HEAD is detached":
            raise StateError(
                f"{self.top}: HEAD is detached; check out the branch the watcher should commit to"
            )
        if blocked is not None:
            raise StateError(f"{self.top}: {blocked}; finish or abort it first")
        self.state_file = self.workspace.state_dir / STATE_FILE
        # the state's path in the repository (None: kept outside it, so never committed)
        state_path = self.state_file.resolve()
        inside = state_path.is_relative_to(self.top)
        self.state_rel = str(state_path.relative_to(self.top)) if inside else None
        if inside and git(self.top, "check-ignore", "-q", "--", str(state_path), check=False).returncode == 0:
            raise StateError(
                f"{state_path}: the state is ignored by git, so CI could not "
                f"re-render the committed tree from it; ignore only {UNCOMMITTED} of "
                "the state dir, or keep the state dir outside the repository"
            )
        self.spec_rel = self._spec_rel()
        self.placement = placement or resolve_placement(spec)
        self.clock = clock
        self.commits: list[str] = []
        #: the last commit that landed, as an apply (`applied`: the roots it changed); the
        #: controller counts it as the pass's apply (`skyhedge_applies_total`)
        self.last_commit: ExecResult | None = None
        self._owed = False  # a staged (or deferred) tree waits for its commit
        self._plan: Plan | None = None  # the plan of the tree owed
        self._unwritten: RenderedTree | None = None  # rendered while a commit had to wait
        self._files: list[str] = []  # the tree's files, as repository paths
        self._reloads: list[str] = []  # spec changes taken since the last commit

    @property
    def _rel(self) -> str:
        return str(self.out.relative_to(self.top))

    def _spec_rel(self) -> str | None:
        """The spec file's path in the repository, or None when the commit cannot carry it (it
        lies outside the repository, in .git or the tree's folder, or git ignores it)."""
        try:
            path = Path(self.spec.source).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not path.is_file() or not path.is_relative_to(self.top):
            return None
        if path.is_relative_to(self.top / ".git") or path.is_relative_to(self.out):
            return None
        if git(self.top, "check-ignore", "-q", "--", str(path), check=False).returncode == 0:
            return None
        return str(path.relative_to(self.top))

    def take_over(self, previous: GitOpsExecutor) -> None:
        """Carry on for the executor of the spec a reload replaced: the commit it owed, and the
        spec changes since the last commit, which the next commit's message names."""
        self._owed = self._owed or previous._owed
        if self._plan is None:
            self._plan = previous._plan
        if self._unwritten is None and previous._unwritten is not None:
            self._unwritten, self._files = previous._unwritten, previous._files
        self._reloads = [*previous._reloads, *spec_changes(previous.spec, self.spec)]
        self.commits = [*previous.commits, *self.commits]
        self.last_commit = self.last_commit or previous.last_commit

    def _stage(self, tree: RenderedTree) -> None:
        """Write `tree` and stage it; whether it differs from HEAD's is what a commit is owed for."""
        write_tree(tree, self.out)
        rel = self._rel
        self._unwritten = None
        self._files = [f"{rel}/{name}" for name, _ in tree.files]
        try:
            git(self.top, "add", "-A", "--", rel)
        except StateError:
            # a repository ignoring the whole folder (`infra/`) fails the add itself, with "The
            # following paths are ignored..." and the path on a later line: the one-line error
            # named neither the file nor the rule. Say that, as a commit would (`finish`).
            self._check_not_ignored()
            raise
        self._owed = git(self.top, "diff", "--cached", "--quiet", "--", rel, check=False).returncode != 0

    def apply(self, state: ServiceState, plan: Plan, now: float) -> ExecResult:
        tree = render_tree(
            self.spec,
            plan,
            context=self.workspace.context(tree_dir=self.out),
            instance_types=instance_types(state, self.placement),
            extra_roots=roots_with_resources(state, now),
        )
        self._plan = plan
        if branch_problem(self.top) is not None:
            # the user's rebase or merge owns the working copy: `finish` says so, and writes
            # and commits the tree at the first pass after it
            self._unwritten, self._owed = tree, True
        else:
            try:
                self._stage(tree)
            except RenderError as exc:  # the tree could not be written: no replica's doing
                return ExecResult(errors=(str(exc),), failed_replicas=())
        info = state.extra.setdefault(GITOPS_KEY, {})
        # What CI will apply: roots emptied by this commit stay rendered a while (roots_with_resources)
        before = info.get("roots") if isinstance(info.get("roots"), dict) else {}
        roots: dict[str, dict[str, Any]] = {}
        for root in tree.roots:
            if root.replicas:
                roots[root.path] = {"replicas": list(root.replicas)}
            else:
                emptied = (before.get(root.path) or {}).get("emptied_at")
                roots[root.path] = {"replicas": [], "emptied_at": now if emptied is None else emptied}
        info["roots"] = roots
        done = self.clock()
        for r in plan.replicas:  # CI applies what was committed: record it as the new layout
            rec = state.replicas.get(r.id)
            if rec is None or rec.gone_at is not None:
                continue
            if r.action == DELETE:
                rec.gone_at, rec.reason, rec.draining = done, "terminated", False
            elif rec.provisioned_at is None:
                rec.provisioned_at = done
        return ExecResult()

    def _check_not_ignored(self) -> None:
        """Every file of the tree must be in the commit: `git add -A` skips ignored ones
        silently, and a tree without its tfvars or manifest is one CI cannot apply."""
        listed = "".join(f"{path}\n" for path in self._files)
        done = git(self.top, "check-ignore", "-v", "--stdin", check=False, stdin=listed)
        hits = [line for line in done.stdout.splitlines() if "\t" in line]
        if done.returncode != 0 or not hits:
            return
        source, path = hits[0].split("\t", 1)
        m = re.fullmatch(r"(.*?):(\d+):(.*)", source)
        rule = f"{m[1]} line {m[2]}: {m[3]}" if m else source
        more = f" (and {len(hits) - 1} more of the tree's files)" if len(hits) > 1 else ""
        where = m[1] if m else "the .gitignore"
        self._unstage()  # the rest of the tree is not left staged: a commit of the user's own would
        # take a tree without the ignored files, one CI cannot apply
        raise StateError(
            f"gitops: {path} is ignored by git ({rule}){more}, so the commit would lack it and "
            f"CI could not apply the tree; stop ignoring the tree's files in {where}"
        )

    def _unstage(self) -> None:
        """Take the tree's staged changes out of the index (back to HEAD's, or out of an index
        with no commit yet); the files stay written in the working copy."""
        rel = self._rel
        if git(self.top, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0:
            git(self.top, "reset", "-q", "--", rel, check=False)
        else:
            git(self.top, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", rel, check=False)

    def _spec_for_commit(self) -> tuple[str | None, str]:
        """The spec file's repository path when this commit carries it, else None and what the
        message should say. Only a file that reads as the spec the watcher runs is committed: an
        edit it has not taken (or refused) would make the commit render another tree."""
        if self.spec_rel is None:
            return None, ""
        try:
            on_disk: ServiceSpec | None = load_spec(self.top / self.spec_rel)
        except SkyhedgeError:
            on_disk = None
        if on_disk is None or spec_changes(self.spec, on_disk):
            return None, (
                f"Spec: {self.spec_rel} is not in this commit: it differs from the spec the watcher "
                "runs (an edit not taken yet, or refused)"
            )
        return self.spec_rel, ""

    def finish(self, state: ServiceState) -> str:
        """Commit the staged tree with the saved state; returns a note ('' when nothing to commit).
        While a commit must wait (`branch_problem`) the note says why, and the next pass retries.
        A failed commit raises (StateError, one line) and is retried by the next pass."""
        if not self._owed or self._plan is None:
            return ""
        blocked = branch_problem(self.top)
        if blocked is not None:
            return f"gitops: no commit in {self.top} while {blocked}; it is made at the first pass after that"
        if self._unwritten is not None:
            try:
                self._stage(self._unwritten)
            except RenderError as exc:
                raise StateError(f"gitops: {exc}") from exc
            if not self._owed:
                return ""
        self._check_not_ignored()
        rel = self._rel
        info = state.extra.setdefault(GITOPS_KEY, {})
        last = {key: copy.deepcopy(info[key]) for key in _COMMIT_KEYS if key in info}
        committed = info.get("layout")
        spec_rel, spec_note = self._spec_for_commit()
        message = commit_message(
            self.spec.name,
            self._plan,
            state,
            _number(info.get("committed_at")),
            _number(info.get("hourly_cost")),
            committed=committed if isinstance(committed, dict) else None,
            reloads=self._reloads,
            notes=[spec_note] if spec_note else [],
        )
        # recorded before the commit so the committed state.json holds it; undone if it fails
        info.update(
            committed_at=self.clock(), hourly_cost=self._plan.hourly_cost, layout=layout_of(self._plan)
        )
        paths = [rel]
        try:
            save_state(self.workspace.state_dir, state)
            if self.state_rel is not None and self.state_file.is_file():
                paths.append(self.state_rel)  # same commit: CI re-rendering from it gets this tree
            if spec_rel is not None:
                paths.append(spec_rel)  # and the spec it was rendered from
            git(self.top, "add", "-A", "--", *paths)
            changed = git(self.top, "diff", "--cached", "--name-only", "--", rel).stdout.splitlines()
            identity: list[str] = []
            for key, default in (("user.name", "skyhedge"), ("user.email", "skyhedge@localhost")):
                if git(self.top, "config", key, check=False).returncode != 0:
                    identity += ["-c", f"{key}={default}"]
            git(self.top, *identity, "commit", "-q", "-m", message, "--", *paths)
        except StateError:
            for key in _COMMIT_KEYS:
                info.pop(key, None)
            info.update(last)
            with contextlib.suppress(StateError):
                save_state(self.workspace.state_dir, state)
            raise
        sha = git(self.top, "rev-parse", "--short", "HEAD").stdout.strip()
        self.commits.append(sha)
        roots = sorted({root for name in changed if (root := _root_of(name, rel)) is not None})
        self.last_commit = ExecResult(applied=tuple(roots) or (rel,))
        self._owed, self._reloads = False, []
        subject = message.splitlines()[0]
        return f"gitops: committed {sha} in {self.top}: {subject}"
