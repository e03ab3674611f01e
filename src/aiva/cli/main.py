"""``aiva``: the command line, a thin layer over the engine.

Every user mistake arrives here as an :class:`AivaError` and leaves as one line (plus a
hint) on stderr with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Annotated, Any

import typer

from aiva import progress
from aiva.cli import output
from aiva.cli.daemon_cmd import daemon_app
from aiva.cli.dashboard_cmd import dashboard
from aiva.errors import AivaError, InvalidValue
from aiva.models import parse_runtime

app = typer.Typer(
    name="aiva",
    help="Isolated machines for AI agents and MCP servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
image_app = typer.Typer(help="Build and list sandbox images (no registry needed).",
                        no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(daemon_app, name="daemon")
app.command("dashboard")(dashboard)

Format = Annotated[output.Fmt, typer.Option("--format", "-o", help="table, json or yaml")]


def _version(value: bool) -> None:
    if value:
        from aiva import __version__

        print(f"aiva {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", "-V", help="print aiva's version and exit", callback=_version,
        is_eager=True)] = False) -> None:
    """Isolated machines for AI agents and MCP servers."""


def _engine() -> Any:
    from aiva.engine import default_engine

    return default_engine()


def _kv(pairs: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidValue(f"'{pair}' is not {what} KEY=VALUE")
        out[key] = value
    return out


# ---------------------------------------------------------------------- lifecycle


CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU cores (fractions allowed)")]
MemOpt = Annotated[str | None, typer.Option("--memory", "-m", help="e.g. 512MB, 2GB")]
DiskOpt = Annotated[str | None, typer.Option("--disk", help="e.g. 20GB")]
PortOpt = Annotated[list[str] | None, typer.Option(
    "--port", "-p", help=output.PORT_HELP)]
MountOpt = Annotated[list[str] | None, typer.Option(
    "--mount", help="DIR[:GUEST_PATH][:ro]: a host directory in the sandbox (default: at the "
    "same path; ro: read-only)")]
ImageOpt = Annotated[str | None, typer.Option("--image", help="template or any local image")]
TemplateOpt = Annotated[str | None, typer.Option(
    "--template", "-t", help="minimal, python or desktop")]
ProfileOpt = Annotated[str | None, typer.Option(
    "--profile", help="minimal, standard or performance")]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")]
LabelOpt = Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE")]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", help="seconds of life, then --on-timeout (needs the daemon)")]
IdleOpt = Annotated[float | None, typer.Option(
    "--idle-timeout", help="seconds without a command, then --on-timeout")]
OnTimeoutOpt = Annotated[str | None, typer.Option(
    "--on-timeout", help="stop (default), pause or destroy")]
RestartOpt = Annotated[str | None, typer.Option(
    "--restart", help="no, on-failure[:N] or always (the daemon restarts it)")]
NetworkOpt = Annotated[str, typer.Option(
    "--network", help="nat (default), none (no network at all), or allow=HOST[:PORT][,...]: "
    "only those (names, IPv4 addresses or CIDRs; names resolved on the host and pinned)")]
BackendOpt = Annotated[str | None, typer.Option(
    "--backend", help="docker, qemu or firecracker (default: auto, which picks docker)")]
RuntimeOpt = Annotated[str | None, typer.Option(
    "--runtime", help="runc (default) or gvisor: Docker sandboxes under gVisor's own "
    "kernel, for untrusted code (set up by scripts/setup.sh)")]


def _spec(**kw: Any) -> Any:
    """The spec the options ask for; what it gives away of the host goes to stderr."""
    from aiva.engine.spec_rules import spec_warnings

    env = _kv(kw.pop("env"), "an env")
    labels = _kv(kw.pop("label"), "a label")
    spec = _engine().build_spec(env=env, labels=labels, **kw)
    for text in spec_warnings(spec):
        output.warning(text)
    return spec


@app.command()
def init(
    name: str,
    template: TemplateOpt = None,
    image: ImageOpt = None,
    cpus: CpusOpt = None,
    memory: MemOpt = None,
    disk: DiskOpt = None,
    port: PortOpt = None,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    label: LabelOpt = None,
    backend: BackendOpt = None,
    network: NetworkOpt = "nat",
    timeout: TimeoutOpt = None,
    idle_timeout: IdleOpt = None,
    on_timeout: OnTimeoutOpt = None,
    restart: RestartOpt = None,
    mount: MountOpt = None,
    runtime: RuntimeOpt = None,
) -> None:
    """Create a sandbox without starting it."""
    from aiva.models import check_name

    check_name(name)  # before the spec: a bad name is the one thing to say
    spec = _spec(template=template, image=image, cpus=cpus, memory=memory, disk=disk,
                 ports=port, profile=profile, env=env, label=label, backend=backend,
                 network=network, timeout=timeout, idle_timeout=idle_timeout,
                 on_timeout=on_timeout, restart=restart, mounts=mount,
                 runtime=parse_runtime(runtime))
    sb = _engine().create(name, spec, start=False)
    output.ok(f"created {sb.name} ({sb.spec.image}); start it with `aiva start {sb.name}`")


@app.command()
def start(
    name: str,
    template: TemplateOpt = None,
    image: ImageOpt = None,
    cpus: CpusOpt = None,
    memory: MemOpt = None,
    disk: DiskOpt = None,
    port: PortOpt = None,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    label: LabelOpt = None,
    backend: BackendOpt = None,
    network: NetworkOpt = "nat",
    timeout: TimeoutOpt = None,
    idle_timeout: IdleOpt = None,
    on_timeout: OnTimeoutOpt = None,
    restart: RestartOpt = None,
    mount: MountOpt = None,
    runtime: RuntimeOpt = None,
    from_snapshot: Annotated[str | None, typer.Option(
        "--from-snapshot", help="SOURCE:TAG: a new sandbox from a snapshot (fork)")] = None,
) -> None:
    """Start a sandbox, creating it first if there is none by that name."""
    from aiva.models import check_name

    check_name(name)
    engine = _engine()
    given = [template, image, cpus, memory, disk, port, profile, env, label, backend,
             network != "nat", timeout, idle_timeout, on_timeout, restart, mount, runtime]
    if from_snapshot:
        source, sep, tag = from_snapshot.partition(":")
        fixed = [template, image, disk, profile, label, backend, idle_timeout, on_timeout,
                 restart, mount, runtime]  # what a snapshot fixes
        if not sep or not source or not tag or any(fixed):
            raise InvalidValue(
                "--from-snapshot takes SOURCE:TAG, and of the creation options only -p, "
                "--cpus, --memory, --env, --network and --timeout",
                hint=f"aiva start {name} --from-snapshot box:s1 -p 8081:80")
        with output.status(f"starting {name} from {from_snapshot} ..."):
            sb = engine.fork(name, source, tag, ports=port, cpus=cpus, memory=memory,
                             env=_kv(env, "an env") or None,
                             network=None if network == "nat" else network, timeout=timeout)
        ports = ", ".join(sb.runtime.get("ports") or [])
        output.ok(f"{name} is running, forked from {from_snapshot}"
                  + (f" (ports {ports})" if ports else ""))
        return
    if engine.exists(name):
        if any(v for v in given):
            raise InvalidValue(
                f"sandbox '{name}' already exists; creation options do not apply to it",
                hint=f"change limits with `aiva config {name} set KEY VALUE`, "
                "or pick a new name",
            )
        sb = engine.start(name)
    else:
        spec = _spec(template=template, image=image, cpus=cpus, memory=memory, disk=disk,
                     ports=port, profile=profile, env=env, label=label, backend=backend,
                     network=network, timeout=timeout, idle_timeout=idle_timeout,
                     on_timeout=on_timeout, restart=restart, mounts=mount,
                     runtime=parse_runtime(runtime))
        with output.status(f"starting {name} ...") as st, \
                progress.reporting(lambda msg: st.update(f"starting {name}: {msg}")):
            sb = engine.create(name, spec)
    ports = ", ".join(sb.runtime.get("ports") or [])
    output.ok(f"{sb.name} is running" + (f" (ports {ports})" if ports else ""))


@app.command()
def snapshot(
    name: str,
    tag: Annotated[str | None, typer.Argument(help="default: a timestamp")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the snapshots instead")] = False,
    fmt: Format = output.Fmt.table,
) -> None:
    """Save a sandbox: disk and memory on VMs, the filesystem on Docker."""
    engine = _engine()
    if list_:
        output.snapshots(engine.snapshots(name), fmt)
        return
    with output.status(f"saving {name} ..."):
        snap = engine.snapshot(name, tag)
    what = "disk and memory" if snap.get("memory") else "filesystem only, no processes"
    output.ok(f"{name}: snapshot {snap['tag']} ({what})")


@app.command()
def restore(name: str, tag: str) -> None:
    """Put a sandbox back to a snapshot, in place."""
    with output.status(f"restoring {name} to {tag} ..."):
        engine = _engine()
        engine.restore(name, tag)
    output.ok(f"{name} restored to {tag}")


@app.command()
def stop(
    name: str,
    force: Annotated[bool, typer.Option("--force", "-f", help="kill at once")] = False,
) -> None:
    """Stop a sandbox (gracefully, or at once with --force). Its data is kept."""
    with output.status(f"stopping {name} ..."):
        _engine().stop(name, force=force)
    output.ok(f"{name} stopped")


@app.command()
def extend(
    name: str,
    seconds: Annotated[float | None, typer.Argument(help="default: one more full timeout")]
    = None,
) -> None:
    """Push a sandbox's timeout back (and count as activity for its idle timeout)."""
    from aiva.engine import Engine, lifetimes

    engine = Engine()  # the state db directly: a running daemon reads it on its next tick
    try:
        sb = lifetimes.extend(engine, name, seconds)
    finally:
        engine.close()
    deadline = sb.runtime.get("deadline")
    output.ok(f"{name}: deadline in {deadline - time.time():.0f}s" if deadline
              else f"{name}: idle time reset")


@app.command()
def pause(name: str) -> None:
    """Freeze every process in a sandbox."""
    _engine().pause(name)
    output.ok(f"{name} paused")


@app.command()
def resume(name: str) -> None:
    """Thaw a paused sandbox."""
    _engine().resume(name)
    output.ok(f"{name} resumed")


@app.command()
def rm(
    name: str,
    volumes: Annotated[bool, typer.Option("--volumes", "-v", help="also its data (disk or "
                                          "volume) and snapshots")] = False,
) -> None:
    """Remove a sandbox (stopping it). Its data stays unless --volumes; `rm NAME
    --volumes` also removes the data a sandbox removed earlier kept."""
    from aiva.errors import SandboxNotFound

    engine = _engine()
    if volumes and not engine.exists(name):
        if _remove_kept(name):
            return
        raise SandboxNotFound(name)
    with output.status(f"removing {name} ..."):
        engine.delete(name, volumes=volumes)
    output.ok(f"{name} removed" + ("" if volumes else " (its data is kept: `aiva volume rm "
                                   f"{name}` or `aiva rm {name} --volumes` removes it)"))


def _remove_kept(ref: str) -> bool:
    """Remove the kept data of removed sandbox ``ref`` (name or id); False if none."""
    from aiva.engine import Engine, leftovers

    engine = Engine()  # local files and Docker objects: in-process beside any daemon
    try:
        kept = leftovers.kept_data(engine, ref)
        for item in kept:
            item.remove()
            output.ok(f"removed the kept {item.kind} of {item.sandbox or ref}: {item.name}")
        return bool(kept)
    finally:
        engine.close()


volume_app = typer.Typer(help="Data kept by removed sandboxes (rm without --volumes).",
                         no_args_is_help=True)
app.add_typer(volume_app, name="volume")


@volume_app.command("ls")
def volume_ls(fmt: Format = output.Fmt.table) -> None:
    """Kept disks and volumes of sandboxes that are gone."""
    from aiva.engine import Engine, leftovers

    engine = Engine()
    try:
        output.leftovers(leftovers.kept_data(engine), fmt, empty="no kept data")
    finally:
        engine.close()


@volume_app.command("rm")
def volume_rm(ref: Annotated[str, typer.Argument(help="the removed sandbox's name or id")]
              ) -> None:
    """Remove the data a removed sandbox kept."""
    from aiva.errors import InvalidValue as Invalid

    if not _remove_kept(ref):
        raise Invalid(f"no kept data of '{ref}'", hint="`aiva volume ls` lists it")


@app.command()
def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="only list them")] = False,
    fmt: Format = output.Fmt.table,
) -> None:
    """Remove everything of this AIVA_HOME no sandbox owns: kept data, snapshot images
    and volumes, networks, orphan containers, VM and run directories. Nothing without
    aiva's labels (or outside AIVA_HOME) is touched."""
    from aiva.engine import Engine, leftovers

    engine = Engine()
    try:
        found = leftovers.find(engine)
        output.leftovers(found, fmt, empty="nothing to prune")
        if dry_run or not found:
            return
        failed = 0
        for item in found:
            try:
                item.remove()
            except AivaError as exc:
                failed += 1
                output.error(f"cannot remove {item.kind} {item.name}: {exc.message}", exc.hint)
        output.ok(f"pruned {len(found) - failed} of {len(found)}")
        if failed:
            raise typer.Exit(1)
    finally:
        engine.close()


@app.command()
def status(name: Annotated[str | None, typer.Argument()] = None,
           fmt: Format = output.Fmt.table) -> None:
    """Show one sandbox in detail, or all of them."""
    engine = _engine()
    if name is None:
        output.sandboxes(engine.list_all(), fmt)
        return
    from aiva.models import State

    sb = engine.status(name)
    try:  # figures are a bonus: a sandbox that cannot report them still shows
        figures = engine.metrics(name) if sb.state == State.RUNNING else None
    except AivaError:
        figures = None
    output.sandbox(sb, fmt, figures)


@app.command(name="ls")
def ls_(fmt: Format = output.Fmt.table) -> None:
    """List sandboxes."""
    output.sandboxes(_engine().list_all(), fmt)


# ---------------------------------------------------------------------- inside


EXEC_FORM = "aiva exec NAME [-i] [-e K=V] [--cwd DIR] [--user U] [--timeout S] -- CMD ARGS..."
_EXEC_VALUED = {"-e": "env", "--env": "env", "-w": "cwd", "--cwd": "cwd", "-u": "user",
                "--user": "user", "--timeout": "timeout"}
_EXEC_FLAGS = {"-i": "interactive", "--interactive": "interactive"}


def split_exec_args(words: list[str]) -> tuple[dict[str, Any], list[str]]:
    """exec's own options given after NAME, and the command: options are read up to
    ``--`` or the first word that is not one; everything after is the command, verbatim.
    An unknown ``-x`` before the command is refused (it may be a typo of an option)."""
    opts: dict[str, Any] = {"env": []}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            return opts, words[i + 1:]
        if not word.startswith("-") or word == "-":
            return opts, words[i:]
        key, eq, value = word.partition("=")
        if key in _EXEC_FLAGS and not eq:
            opts[_EXEC_FLAGS[key]] = True
        elif key in _EXEC_VALUED:
            if not eq:
                if i + 1 >= len(words):
                    raise InvalidValue(f"{key} needs a value", hint=EXEC_FORM)
                i += 1
                value = words[i]
            dest = _EXEC_VALUED[key]
            if dest == "env":
                opts["env"].append(value)
            else:
                opts[dest] = value
        else:
            raise InvalidValue(f"'{word}' is not an option of aiva exec",
                               hint=f"put the command after --: {EXEC_FORM}")
        i += 1
    return opts, []


@app.command(name="exec", context_settings={"allow_interspersed_args": False,
                                            "ignore_unknown_options": True})
def exec_(
    name: str,
    command: Annotated[list[str] | None, typer.Argument(
        help="exec's options, then -- and the command with its arguments")] = None,
    env: EnvOpt = None,
    cwd: Annotated[str | None, typer.Option("--cwd", "-w")] = None,
    user: Annotated[str | None, typer.Option("--user", "-u")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="seconds")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i",
                                              help="send stdin to the command")] = False,
) -> None:
    """Run a command in a sandbox: aiva exec NAME [OPTIONS] -- CMD ARGS... (exits with
    its code). Options may come before or after NAME."""
    engine = _engine()
    late, argv = split_exec_args(list(command or []))
    env = [*(env or []), *late.pop("env")]
    cwd = late.get("cwd", cwd)
    user = late.get("user", user)
    interactive = late.get("interactive", interactive)
    if "timeout" in late:
        try:
            timeout = float(late["timeout"])
        except ValueError:
            raise InvalidValue(f"--timeout must be a number of seconds, not "
                               f"{late['timeout']!r}", hint=EXEC_FORM) from None
    if not argv:
        raise InvalidValue("no command given", hint=EXEC_FORM)

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    erofs = _ReadOnlyRootSeen()

    def err(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()
        erofs.feed(text)

    res = engine.exec(name, argv, env=_kv(env, "an env"), cwd=cwd, user=user, timeout=timeout,
                      stdin=sys.stdin.buffer if interactive else None,
                      on_stdout=out, on_stderr=err)
    if res.timed_out:
        output.error(f"the command timed out after {timeout}s; its process group was killed")
        raise typer.Exit(124)
    code = res.exit_code
    if code != 0 and erofs.seen:
        sb = engine.get(name)
        if sb.spec.backend == "docker" and "disk" in sb.runtime:
            sys.stderr.write(f"hint: {READ_ONLY_ROOT_HINT.format(workdir=sb.spec.workdir)}\n")
    raise typer.Exit(code if code >= 0 else 128 - code)


READ_ONLY_ROOT_HINT = (
    "the system image of a Docker sandbox is read-only, so --disk holds; it writes to "
    "{workdir}, /root, /home, /tmp, /var/tmp, /usr/local, /opt and /app. For system packages "
    "(apt-get) make an image: aiva image derive TAG --from IMAGE --run 'apt-get install "
    "-y PKG', then create the sandbox with --image TAG")


class _ReadOnlyRootSeen:
    """Whether a command's stderr said EROFS, or apt that its lock is read-only (kept: a
    short tail, for split chunks)."""

    SIGNS = ("Read-only file system", "read only lock file")

    def __init__(self) -> None:
        self.seen = False
        self._tail = ""

    def feed(self, text: str) -> None:
        if not self.seen:
            window = self._tail + text
            self.seen = any(sign in window for sign in self.SIGNS)
            self._tail = window[-32:]


def _split_target(text: str) -> tuple[str | None, str]:
    head, sep, rest = text.partition(":")
    if sep and head and "/" not in head:
        return head, rest
    return None, text


@app.command()
def cp(src: str, dst: str) -> None:
    """Copy files in or out: aiva cp ./local NAME:/path  |  aiva cp NAME:/path ./local."""
    engine = _engine()
    s_name, s_path = _split_target(src)
    d_name, d_path = _split_target(dst)
    if (s_name is None) == (d_name is None):
        raise InvalidValue("exactly one side of cp must be NAME:PATH",
                           hint="aiva cp ./file box:/workspace/ or aiva cp box:/etc/hosts .")
    if d_name is not None:
        n = engine.copy_in(d_name, s_path, d_path)
    else:
        assert s_name is not None
        n = engine.copy_out(s_name, s_path, d_path)
    output.ok(f"copied {output.size(n)}")


@app.command()
def data(
    name: str,
    operation: Annotated[str, typer.Argument(help="sync, push or pull")],
    first: Annotated[str, typer.Argument(help="LOCAL (sync, push) or REMOTE (pull)")],
    second: Annotated[str, typer.Argument(help="REMOTE (sync, push) or LOCAL (pull)")],
    delete: Annotated[bool, typer.Option("--delete", help="propagate deletions")] = False,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="gitignore pattern")
                       ] = None,
    prefer: Annotated[str | None, typer.Option(
        "--prefer", help="resolve conflicts: local, remote or newer")] = None,
    litter: Annotated[bool, typer.Option(
        "--include-litter", help="also carry build litter, which stays put by default: "
        "__pycache__/, *.pyc, .pytest_cache/, .mypy_cache/, *.egg-info/ ...")] = False,
    fmt: Format = output.Fmt.table,
) -> None:
    """Sync a directory with a sandbox: only changed files cross (build litter stays)."""
    if operation not in ("sync", "push", "pull"):
        raise InvalidValue(f"unknown data operation '{operation}'", hint="use sync, push or pull")
    local, remote = (second, first) if operation == "pull" else (first, second)
    direction = "both" if operation == "sync" else operation
    with output.transfer_progress() as progress:
        report = _engine().sync(name, local, remote, direction=direction, delete=delete,
                                exclude=exclude, prefer=prefer, progress=progress,
                                litter=litter)
    output.sync_report(report, fmt)


@app.command()
def logs(
    name: str,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n")] = None,
    source: Annotated[str | None, typer.Option(
        "--source", help="only commands, engine, syslog (the guest's) or aiva (aiva.log "
        "lines naming the sandbox), or one of cmd, stdout, stderr, exit")] = None,
) -> None:
    """Command output, the engine's log and the guest's syslog, ordered by time."""
    from aiva.backends.base import LogLine
    from aiva.observe.logquery import line_sources, query_logs

    engine = _engine()
    wanted = line_sources(source)  # an unknown source fails here, with the choices
    if source is None:
        for line in engine.logs(name, tail=tail):
            output.log_line(line)
    else:
        for entry in query_logs(engine, name, source=source, limit=tail):
            output.log_line(LogLine(entry.ts, entry.source, entry.text))
    if follow:
        for line in engine.follow_logs(name):
            if line.source in wanted:
                output.log_line(line)


@app.command()
def config(
    name: str,
    action: Annotated[str, typer.Argument(help="get or set")],
    key: str,
    value: Annotated[str | None, typer.Argument()] = None,
) -> None:
    """Read or change one setting of a sandbox (cpus, memory, env.NAME, labels.NAME ...)."""
    engine = _engine()
    if action == "get":
        output.value(engine.get_setting(name, key))
    elif action == "set":
        if value is None:
            raise InvalidValue("set needs a value", hint=f"aiva config {name} set {key} VALUE")
        engine.set_setting(name, key, value)
        output.ok(f"{name}: {key} = {value}")
    else:
        raise InvalidValue(f"unknown config action '{action}'", hint="use get or set")


# ---------------------------------------------------------------------- images


@image_app.command("ls")
def image_ls(fmt: Format = output.Fmt.table) -> None:
    """Images aiva built."""
    from aiva.images import build as images

    output.image_table(images.list_images(_engine().backend("docker").client), fmt)


@image_app.command("derive")
def image_derive(
    tag: Annotated[str, typer.Argument(help="the new image, e.g. mytools or mytools:1")],
    base: Annotated[str, typer.Option("--from", help="a template or a local image")],
    run: Annotated[list[str], typer.Option(
        "--run", help="a shell command to run in the build (repeat, in order)")],
    force: Annotated[bool, typer.Option("--force", help="rebuild even if cached")] = False,
) -> None:
    """A new image: BASE plus what the --run commands install (pip, npm, apt ...).

    The build has network access and trusts the host's CA bundle; it is cached by the
    base image and the commands.
    """
    from aiva.images import derive

    client = _engine().backend("docker").client
    with output.status(f"deriving {tag} from {base} ...") as st:
        info = derive.derive(tag, base=base, run=run, client=client, force=force,
                             progress=lambda msg: st.update(f"{tag}: {msg}"))
    output.ok(f"image {info.tag} is ready ({output.size(info.size)})")


@image_app.command("build")
def image_build(
    template: Annotated[str, typer.Argument(help="minimal, python or desktop")],
    force: Annotated[bool, typer.Option("--force", help="rebuild even if cached")] = False,
    container: Annotated[bool, typer.Option(
        "--container/--no-container", help="the Docker image")] = True,
    vm: Annotated[bool, typer.Option(
        "--vm/--no-vm", help="also the microVM files: kernel, initramfs, system image "
        "(otherwise built the first time a VM of the template starts)")] = False,
) -> None:
    """Build a template from Debian packages, for containers and for microVMs alike.

    One rootfs tar (mmdebstrap) feeds both: `docker import` makes the container image,
    `mkfs.ext4 -d` the VMs' read-only system image.
    """
    from aiva.errors import BackendUnavailable
    from aiva.images import build as images

    images.check_template(template)  # an unknown one is an error before anything runs
    if not container and not vm:
        raise InvalidValue("nothing to build: --no-container without --vm",
                           hint=f"aiva image build {template} [--vm]")
    if container:
        try:
            client = _engine().backend("docker").client
        except BackendUnavailable as exc:
            if not vm:
                raise
            output.error(f"skipping the container image: {exc.message}", exc.hint)
        else:
            with output.status(f"building {template} ...") as st:
                info = images.build_image(template, client=client, force=force,
                                          progress=lambda msg: st.update(f"{template}: {msg}"))
            output.ok(f"image {info.tag} is ready ({output.size(info.size)})")
    if vm:
        from aiva.vm.artifacts import ensure_vm_artifacts

        with output.status(f"building VM files for {template} ...") as st:
            art = ensure_vm_artifacts(template,
                                      progress=lambda msg: st.update(f"{template} VM: {msg}"))
        output.ok(f"VM files for {template} are ready: kernel {art.modules_version}, "
                  f"system image {output.size(art.rootfs.stat().st_size)}")


# ---------------------------------------------------------------------- observe

from aiva.cli import observe_cmd  # noqa: E402

app.command()(observe_cmd.events)
app.command()(observe_cmd.metrics)
app.command()(observe_cmd.cost)

from aiva.cli import desktop_cmd  # noqa: E402

app.command()(desktop_cmd.vnc)

from aiva.cli import deploy_cmd  # noqa: E402

app.command()(deploy_cmd.deploy)

from aiva.cli import mcp_run_cmd  # noqa: E402
from aiva.cli.mcp_cmd import mcp_app  # noqa: E402

mcp_app.command("run", context_settings=mcp_run_cmd.RUN_SETTINGS)(mcp_run_cmd.run)
mcp_app.command("audit")(mcp_run_cmd.audit)
app.add_typer(mcp_app, name="mcp")

from aiva.cli.pool_cmd import pool_app  # noqa: E402

app.add_typer(pool_app, name="pool")

from aiva.cli.task_cmd import eval_app, task_app  # noqa: E402

app.add_typer(task_app, name="task")
app.add_typer(eval_app, name="eval")


# ---------------------------------------------------------------------- entry


def run() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _log_to_file()
    try:
        app()
    except AivaError as exc:
        output.error(exc.message, exc.hint)
        sys.exit(2 if isinstance(exc, InvalidValue) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


def _log_to_file() -> None:
    """aiva's own log goes to AIVA_HOME/aiva.log (queryable with the others); warnings
    still reach the terminal."""
    from aiva.observe.logquery import log_handler

    log = logging.getLogger("aiva")
    log.setLevel(logging.INFO)
    log.addHandler(log_handler())
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    log.addHandler(console)


if __name__ == "__main__":
    run()

